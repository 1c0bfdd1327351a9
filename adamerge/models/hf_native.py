"""A transformers ``CLIPModel`` as a backbone, merged in its own layout (no conversion to open_clip).

FusionBench runs AdaMerging on the transformers ``CLIPVisionModel``: q, k and v are separate tensors, so
layer-wise AdaMerging learns one λ per task for each of them (199 columns for ViT-B/32, where open_clip's
fused ``in_proj_weight`` gives 152) — a different optimisation problem. This backbone merges exactly that
tower: its state dict is the ``CLIPVisionModel``'s (``vision_model.*``), its output the pooled features
through the pre-trained ``visual_projection`` (not merged: a ``CLIPVisionModel`` has none). Zero-shot
heads come from the model's own text tower, tokenizer and image processor, read from the folder, so any
CLIP shape or vocabulary described by its ``config.json`` works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from adamerge.models.backbone import Backbone

#: Tensors of a CLIPModel outside its vision tower and text transformer: what the official AdaMerging code's
#: ImageEncoder (CLIP minus ``transformer``) would hold beside the tower, in transformers names.
_IMAGE_ENCODER_EXTRA = ("text_model.embeddings.", "text_model.final_layer_norm.", "text_projection.",
                        "logit_scale", "visual_projection.")


class HFVisionTower(nn.Module):
    """``CLIPVisionModel``'s tower with the fixed image projection: ``f(x) = pooler_output(x) · Pᵀ``."""

    def __init__(self, vision_model: nn.Module, projection: torch.Tensor):
        super().__init__()
        self.vision_model = vision_model
        self.register_buffer("projection", projection.detach().clone(), persistent=False)
        self.image_size = int(vision_model.config.image_size)
        self.output_dim = int(projection.shape[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=images).pooler_output
        return pooled @ self.projection.T


class HFImageTransform:
    """PIL image → pixel tensor through the model's own ``CLIPImageProcessor`` (FusionBench's preprocessing);
    its ``repr`` is the processor's settings, so decoded-image caches key on them."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({json.dumps(self.processor.to_dict(), sort_keys=True, default=str)})"


@dataclass
class HFClipBackbone(Backbone):
    """``clip`` is a transformers ``CLIPModel``; ``tower`` its vision tower as merged (see module docstring)."""

    tower: HFVisionTower | None = field(default=None)
    source: str = ""

    @property
    def visual(self) -> nn.Module:
        return self.tower

    def encode_text(self, tokens) -> torch.Tensor:
        return self.clip.get_text_features(**tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def text_state(self):
        return ((k, v) for k, v in self.clip.state_dict().items() if not k.startswith("vision_model."))

    def image_encoder_extra(self) -> int:
        return sum(v.numel() for k, v in self.clip.state_dict().items()
                   if k.startswith(_IMAGE_ENCODER_EXTRA) and v.is_floating_point())

    @property
    def image_size(self) -> int:
        return self.tower.image_size


class HFBackboneError(ValueError):
    """A transformers CLIP folder that cannot serve as a backbone, with what is missing and how to add it."""


def _tokenizer(folder: Path, source: str) -> Callable[[list[str]], dict]:
    from transformers import AutoTokenizer

    advice = (f"{source} has no usable tokenizer files (tokenizer.json, or vocab.json + merges.txt): zero-shot heads "
              f"need the model's own tokenizer. Download them with the weights (hf download <id> --include '*.json' "
              f"'*.txt' '*.safetensors') or save the CLIPProcessor/CLIPTokenizer into {folder}")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise HFBackboneError(advice + ".")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise HFBackboneError(f"{advice} ({type(err).__name__}: {err}).") from err

    def tokenize(texts: list[str]) -> dict:
        out = tok(list(texts), padding=True, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    tokenize.tokenizer = tok
    return tokenize


def _image_processor(folder: Path, image_size: int):
    from transformers import CLIPImageProcessor

    if (folder / "preprocessor_config.json").exists():
        return CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    # transformers' CLIP defaults at the model's resolution: shortest edge, bicubic, centre crop, CLIP mean/std
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def load_hf_clip_native(source: str | Path, hub_cache_dir: str | None = None, download: bool = False) -> HFClipBackbone:
    """A :class:`HFClipBackbone` from a saved ``CLIPModel`` folder or a Hub id in the local cache.

    The architecture comes from its ``config.json`` (any shape, vocabulary, activation); weights only from
    safetensors; tokenizer and image processor from the same folder.
    """
    from transformers import CLIPModel

    from adamerge.models.hf_clip import HFCheckpointError, read_hf_state_dict, resolve_hf_source

    folder = resolve_hf_source(source, hub_cache_dir, download)
    if not (folder / "config.json").exists():
        raise HFBackboneError(f"{source}: no config.json in {folder}; a backbone needs the saved CLIPModel's config.")
    config = json.loads((folder / "config.json").read_text())
    if "text_config" not in config or "vision_config" not in config:
        raise HFBackboneError(
            f"{source} is not a whole CLIPModel (its config.json has no text_config/vision_config): the backbone "
            f"needs the text tower for zero-shot heads. Use the pre-trained CLIPModel (e.g. "
            f"openai/clip-vit-base-patch32), and the fine-tuned CLIPVisionModels in pool=huggingface.")
    state = read_hf_state_dict(folder)  # safetensors only: refuses pickles with the conversion command
    from transformers import CLIPConfig

    model = CLIPModel(CLIPConfig.from_pretrained(str(folder), local_files_only=True))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        raise HFCheckpointError(f"{source}: the weights do not fit its config.json — missing {missing[:8]}, "
                                f"unexpected {unexpected[:8]}")
    model.eval().requires_grad_(False)
    tower = HFVisionTower(model.vision_model, model.visual_projection.weight)
    transform = HFImageTransform(_image_processor(folder, tower.image_size))
    return HFClipBackbone(name=f"hf:{Path(str(source)).name}", clip=model, tokenizer=_tokenizer(folder, str(source)),
                          preprocess=transform, preprocess_train=None, tower=tower, source=str(source))


def open_clip_config(config) -> dict:
    """The open_clip model config with the shapes and activation of a transformers ``CLIPConfig``."""
    v, t = config.vision_config, config.text_config
    return {
        "embed_dim": int(config.projection_dim),
        "quick_gelu": v.hidden_act == "quick_gelu",
        "vision_cfg": {"image_size": int(v.image_size), "layers": int(v.num_hidden_layers), "width": int(v.hidden_size),
                       "head_width": int(v.hidden_size // v.num_attention_heads), "patch_size": int(v.patch_size),
                       "mlp_ratio": v.intermediate_size / v.hidden_size},
        "text_cfg": {"context_length": int(t.max_position_embeddings), "vocab_size": int(t.vocab_size),
                     "width": int(t.hidden_size), "heads": int(t.num_attention_heads), "layers": int(t.num_hidden_layers),
                     "mlp_ratio": t.intermediate_size / t.hidden_size},
    }


def register_open_clip_twin(folder: Path, cache_dir: str | Path) -> str:
    """Register (once) the open_clip architecture matching ``folder/config.json``; returns its name."""
    import hashlib

    import open_clip
    from transformers import CLIPConfig

    cfg = open_clip_config(CLIPConfig.from_pretrained(str(folder), local_files_only=True))
    text = json.dumps(cfg, sort_keys=True)
    name = "hf-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    target = Path(cache_dir) / "open_clip_architectures"
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{name}.json").write_text(text)
    open_clip.add_model_config(target / f"{name}.json")
    return name


OPENAI_VOCAB_SIZE = 49408


def hf_clip_backbone(source: str, native: bool = True, arch: str | None = None, hub_cache_dir: str | None = None,
                     download: bool = False, cache_dir: str | None = None) -> Backbone:
    """``model=hf_clip``: the transformers CLIP as it is (``native``), or renamed to open_clip (``native=false``;
    ``arch`` null derives the open_clip architecture from ``config.json``)."""
    if native:
        return load_hf_clip_native(source, hub_cache_dir, download)
    from transformers import CLIPConfig

    from adamerge.models.hf_clip import load_hf_clip, resolve_hf_source

    folder = resolve_hf_source(source, hub_cache_dir, download)
    vocab = CLIPConfig.from_pretrained(str(folder), local_files_only=True).text_config.vocab_size
    if vocab != OPENAI_VOCAB_SIZE:
        raise HFBackboneError(
            f"{source} has a text vocabulary of {vocab} tokens, not OpenAI CLIP's {OPENAI_VOCAB_SIZE}: renamed to "
            f"open_clip it would be tokenised with open_clip's vocabulary (wrong heads). Use model.native=true "
            f"(the transformers model with its own tokenizer).")
    if arch is None:
        if cache_dir is None:
            raise HFBackboneError("model.arch=null derives the open_clip architecture from config.json and needs "
                                  "model.cache_dir to register it (or give model.arch explicitly)")
        arch = register_open_clip_twin(folder if folder.is_dir() else folder.parent, cache_dir)
    return load_hf_clip(str(folder), arch)
