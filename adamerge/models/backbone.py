"""A CLIP backbone: the open_clip model plus the tokenizer and transform that belong to it.

Only the vision tower (``clip.visual``) is ever merged; the text tower exists to build zero-shot
heads through the same code path real CLIP uses.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)
_ARCH_DIR = Path(__file__).parent / "architectures"
_registered = False


def register_architectures() -> list[str]:
    """Add adamerge's small architectures (``architectures/*.json``) to open_clip's registry."""
    global _registered
    if not _registered:
        import open_clip  # here, not at the top: merging model directories never needs it (seconds of import)

        open_clip.add_model_config(_ARCH_DIR)
        _registered = True
    return sorted(p.stem for p in _ARCH_DIR.glob("*.json"))


@dataclass
class Backbone:
    name: str
    clip: torch.nn.Module  # an open_clip.CLIP (not annotated so: OmegaConf resolves the hints, open_clip loads lazily)
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable  # PIL image -> tensor, open_clip's validation transform
    preprocess_train: Callable | None = None  # open_clip's training transform (random resized crop), for fine-tuning

    @property
    def visual(self) -> torch.nn.Module:
        """The tower that is merged: its state dict is what checkpoints hold and methods combine."""
        return self.clip.visual

    def encode_text(self, tokens) -> torch.Tensor:
        """Projected text features of ``tokenizer(texts)``."""
        return self.clip.encode_text(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def text_state(self):
        """``(key, tensor)`` of everything outside the merged tower: all a zero-shot head depends on."""
        return ((k, v) for k, v in self.clip.state_dict().items() if not k.startswith("visual."))

    def image_encoder_extra(self) -> int:
        """Entries the official AdaMerging code flattens beside the vision tower when it trims: its
        ``ImageEncoder`` is CLIP without the text transformer, so the token and positional embeddings,
        ``ln_final``, ``text_projection`` and ``logit_scale`` stay in the state dict, with task vector 0."""
        return sum(v.numel() for k, v in self.clip.state_dict().items()
                   if not k.startswith(("visual.", "transformer.")) and v.is_floating_point())

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)


class PretrainedWeightsUnavailable(RuntimeError):
    """Raised instead of letting a download hang on an offline machine."""


class _DropRandomInitWarning(logging.Filter):
    """open_clip's "No pretrained weights loaded … initialized randomly" (logged on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _no_random_init_warning(active: bool):
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_open_clip(arch: str, pretrained: str | None = None, cache_dir: str | None = None,
                   weights: str | None = None, weights_follow: bool = False) -> Backbone:
    """Build ``arch`` with open_clip; weights from a pretrained tag, a local file, or none (random).

    ``weights`` (a local ``.safetensors``/open_clip checkpoint of the *full* CLIP model) wins over
    ``pretrained``. With a tag on an offline machine, a missing cached file fails at once and says
    what to download and where to put it. ``weights_follow=True``: the caller loads or trains the weights
    right after (the embedded world's pre-training, a transformers conversion), so open_clip's warning
    that the model is "initialized randomly" would mislead; a debug line says so instead.
    """
    import open_clip

    register_architectures()
    known = open_clip.list_models()
    if arch not in known:
        raise ValueError(f"unknown open_clip architecture {arch!r}; known: {', '.join(known)}")
    source = weights if weights is not None else pretrained
    try:
        with _no_random_init_warning(weights_follow and source is None):
            model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=source, cache_dir=cache_dir)
    except Exception as err:  # open_clip raises several types for "could not fetch"
        if pretrained and weights is None:
            raise PretrainedWeightsUnavailable(
                f"could not load open_clip {arch!r} with pretrained tag {pretrained!r} "
                f"(cache dir: {cache_dir or 'open_clip default'}): {err}\n"
                f"On a machine with internet run once: python -c \"import open_clip; "
                f"open_clip.create_model_and_transforms('{arch}', pretrained='{pretrained}', "
                f"cache_dir='{cache_dir or '~/.cache/clip'}')\" and copy that cache dir here, "
                f"or pass model.weights=/path/to/open_clip_checkpoint."
            ) from err
        raise
    if weights is not None:
        log.info("open_clip %s: weights loaded from %s", arch, weights)
    elif source is None and weights_follow:
        log.debug("open_clip %s: initial weights, to be trained or loaded by the caller", arch)
    model.eval().requires_grad_(False)
    return Backbone(name=arch, clip=model, tokenizer=open_clip.get_tokenizer(arch), preprocess=preprocess,
                    preprocess_train=preprocess_train)
