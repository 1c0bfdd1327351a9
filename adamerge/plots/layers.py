"""Tensor names in network depth order, and the few tensors worth following during an adaptation.

State-dict order is not depth order (open_clip lists ``proj`` before ``conv1``) and alphabetical order puts
``ln_post`` before block 0, so the λ heatmap and the logged per-layer λ both read these pure functions.
"""

from __future__ import annotations

import re
from typing import Sequence

# Module names in depth order, each with its aliases (open_clip first, then Hugging Face CLIP).
STEM = (("conv1", "patch_embedding"), ("class_embedding",), ("positional_embedding", "position_embedding"),
        ("ln_pre", "pre_layrnorm"))                                        # before the first block
BLOCK = (("ln_1", "layer_norm1"), ("attn", "self_attn"), ("ln_2", "layer_norm2"), ("mlp",))  # inside each block
HEAD = (("ln_post", "post_layernorm"), ("proj", "visual_projection"))    # after the last block
_INDEX = re.compile(r"^\d+$")
_PARAMETER = re.compile(r"[._](weight|bias)$")


def block_index(key: str) -> int | None:
    """The block a tensor belongs to (``transformer.resblocks.3.attn…`` → 3; HF ``encoder.layers.3…`` → 3)."""
    for part in key.split("."):
        if _INDEX.match(part):
            return int(part)
    return None


def _first(parts: list[str], names: tuple[tuple[str, ...], ...]) -> int | None:
    return next((i for i, aliases in enumerate(names) if any(a in parts for a in aliases)), None)


def _rank(key: str) -> tuple[int, int, int]:
    """(stem 0 | block 1 | head 2, block number, place inside the stem/block/head)."""
    parts = key.split(".")
    index = block_index(key)
    if index is not None:
        inside = _first(parts, BLOCK)
        return 1, index, len(BLOCK) if inside is None else inside
    head = _first(parts, HEAD)
    if head is not None:
        return 2, 0, head
    stem = _first(parts, STEM)
    return 0, 0, len(STEM) if stem is None else stem  # an unknown tensor outside the blocks: stem, after the known


def depth_order(layers: Sequence[str]) -> list[int]:
    """Indices that put ``layers`` in depth order: stem (conv1, class/positional embedding, ln_pre), blocks
    0 … N numerically (each: ln_1, attn, ln_2, mlp), then ln_post and proj; a module's weight before its bias;
    other ties keep their given order."""
    module = [_PARAMETER.sub("", key) for key in layers]
    first = {m: i for i, m in reversed(list(enumerate(module)))}
    return sorted(range(len(layers)), key=lambda i: (*_rank(layers[i]), first[module[i]], layers[i].endswith("bias")))


def tracked_layers(layers: Sequence[str]) -> list[str]:
    """The first attention weight (open_clip's ``in_proj_weight``) of the first, middle and last block: three λ curves per task say whether depth matters, where hundreds would say nothing.
    Without numbered blocks: the first, middle and last tensor in depth order."""
    ordered = [layers[i] for i in depth_order(layers)]
    blocks = sorted({b for b in map(block_index, ordered) if b is not None})
    if not blocks:
        picks = [ordered[0], ordered[len(ordered) // 2], ordered[-1]] if ordered else []
        return list(dict.fromkeys(picks))
    chosen = []
    for block in dict.fromkeys([blocks[0], blocks[len(blocks) // 2], blocks[-1]]):
        members = [k for k in ordered if block_index(k) == block]
        attention = [k for k in members if "attn" in k and k.endswith("weight") and "out_proj" not in k]
        chosen.append((attention or members)[0])
    return chosen


def short_layer_name(key: str) -> str:
    """``transformer.resblocks.3.attn.in_proj_weight`` → ``3.attn.in_proj_weight``: columns stay legible."""
    return key.replace("transformer.resblocks.", "")
