"""Tiny transformers CLIP folders as FusionBench publishes them, made offline.

θ₀ is a saved ``CLIPModel`` with its ``CLIPProcessor`` (a byte-level CLIP tokenizer of 514 tokens — not
OpenAI's vocabulary — and a ``CLIPImageProcessor``); fine-tuned models are saved ``CLIPVisionModel``s (no
image projection), as ``tanganke/clip-vit-base-patch32_<task>`` are. Test sets are parquet files with
``image`` and ``label`` columns in the layout of a downloaded Hugging Face dataset repository.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch


def char_tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols, their word-final forms and the two
    special tokens, with no merges: it builds without a download."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tiny_clip_config(vocab_size: int, image_size: int = 16, layers: int = 2):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=128, vocab_size=vocab_size),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=24)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        if hasattr(model, "logit_scale"):
            model.logit_scale.fill_(float(torch.log(torch.tensor(30.0))))
    return model.eval()


def save_pretrained_clip(folder: Path, seed: int = 0, image_size: int = 16):
    """A saved CLIPModel + CLIPProcessor (tokenizer and image processor) in ``folder``; returns the model."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = char_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    config = tiny_clip_config(len(tokenizer), image_size)
    config.text_config.bos_token_id = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    config.text_config.eos_token_id = config.text_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = randomize(CLIPModel(config), seed)
    model.save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return model


def save_finetuned_towers(clip, root: Path, tasks, seed: int = 1, scale: float = 0.05) -> dict:
    """One saved CLIPVisionModel per task, moved a little from ``clip``'s vision tower."""
    from transformers import CLIPVisionModel

    gen = torch.Generator().manual_seed(seed)
    towers = {}
    for task in tasks:
        tower = CLIPVisionModel(clip.config.vision_config)
        tower.vision_model.load_state_dict(clip.vision_model.state_dict())
        with torch.no_grad():
            for p in tower.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        tower.eval().save_pretrained(root / task)
        towers[task] = tower
    return towers


def write_parquet_split(folder: Path, split: str, num_classes: int, n: int, size: int = 20, seed: int = 0,
                        label_names=None) -> Path:
    """``folder/data/<split>-00000-of-00001.parquet`` with ``image`` (PNG bytes) and ``label`` columns, as
    ``hf download --repo-type dataset`` leaves a FusionBench test set; returns the file."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % num_classes
        pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        pixels[..., label % 3] = 40 + 50 * label % 200
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(label)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=label_names or [f"c{i}" for i in range(num_classes)])})
    data = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    path = folder / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(path))
    return path
