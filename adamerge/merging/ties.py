"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

Each task vector is flattened over *all* its tensors; trimming keeps its top-k fraction by magnitude
over that whole vector. The sign of every entry is elected by the sum of the trimmed vectors (the
paper's "mass"), and only entries that agree with it are merged.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from adamerge.merging.task_vectors import add_scaled

MERGE_FUNCTIONS = ("mean", "sum")


def flatten(vectors: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, list[str], list[torch.Size]]:
    """Stack K task vectors as a [K, P] matrix, remembering how to cut it back into tensors."""
    keys = list(vectors[0])
    shapes = [vectors[0][k].shape for k in keys]
    flat = torch.stack([torch.cat([v[k].reshape(-1) for k in keys]) for v in vectors])
    return flat, keys, shapes


def unflatten(flat: torch.Tensor, keys: list[str], shapes: list[torch.Size]) -> dict[str, torch.Tensor]:
    sizes = [s.numel() for s in shapes]
    return {k: part.view(shape) for k, part, shape in zip(keys, flat.split(sizes), shapes)}


def trim_top_k(flat: torch.Tensor, keep: float) -> torch.Tensor:
    """Zero all but the ``keep`` fraction of largest-magnitude entries in each row (exactly that many when
    magnitudes are distinct; the official code keeps one entry more)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if keep == 1.0:
        return flat.clone()
    n = flat.shape[1]
    n_drop = n - max(1, int(round(n * keep)))
    if n_drop <= 0:
        return flat.clone()
    threshold = flat.abs().kthvalue(n_drop, dim=1, keepdim=True).values
    return flat * (flat.abs() > threshold)


def elect_sign(flat: torch.Tensor) -> torch.Tensor:
    """Per-entry sign of Σₖ τₖ; entries whose sum is exactly 0 take the overall majority sign."""
    sign = torch.sign(flat.sum(0))
    majority = torch.sign(sign.sum()) or torch.tensor(1.0, dtype=flat.dtype)
    return torch.where(sign == 0, majority.to(flat.dtype), sign)


def agreeing(flat: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mask of the non-zero entries whose sign matches the elected one."""
    return torch.where(sign > 0, flat > 0, flat < 0)


def ties_task_vectors(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2) -> list[dict[str, torch.Tensor]]:
    """Trimmed, sign-agreeing task vectors kept separate per task: the inputs of AdaMerging++."""
    flat, keys, shapes = flatten(vectors)
    trimmed = trim_top_k(flat, keep)
    selected = trimmed * agreeing(trimmed, elect_sign(trimmed))
    return [unflatten(row, keys, shapes) for row in selected]


def ties_vector(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2,
                merge: str = "mean") -> dict[str, torch.Tensor]:
    """disjoint_merge(trim(τ₁..τ_K)): the merged task vector that λ scales; ``merge`` is 'mean' (paper) or 'sum'."""
    if merge not in MERGE_FUNCTIONS:
        raise ValueError(f"unknown TIES merge function {merge!r}; valid: {', '.join(MERGE_FUNCTIONS)}")
    flat, keys, shapes = flatten(vectors)
    trimmed = trim_top_k(flat, keep)
    mask = agreeing(trimmed, elect_sign(trimmed))
    total = (trimmed * mask).sum(0)
    if merge == "mean":
        total = total / mask.sum(0).clamp(min=1)
    return unflatten(total, keys, shapes)


def ties_merge(pretrained: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
               keep: float = 0.2, lam: float = 1.0, merge: str = "mean") -> dict[str, torch.Tensor]:
    """θ = θ₀ + λ · ties_vector(τ₁..τ_K)."""
    return add_scaled(pretrained, ties_vector(vectors, keep, merge), lam)
