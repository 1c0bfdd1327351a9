"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

Each task vector is flattened over *all* its tensors; trimming keeps its top-k fraction by magnitude
over that whole vector. The sign of every entry is elected by the sum of the trimmed vectors (the
paper's "mass"), and only entries that agree with it are merged.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

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


def trim_thresholds(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float) -> list[torch.Tensor | None]:
    """Each vector's trimming threshold: entries with a larger magnitude survive :func:`trim_top_k` (None: all do).

    One vector is flattened at a time, so the [K, P] matrix never exists: for ViT-L/14 × 8 that matrix and
    its trimmed copies were tens of GB of host memory."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    thresholds: list[torch.Tensor | None] = []
    for vector in vectors:
        n = sum(t.numel() for t in vector.values())
        n_drop = n - max(1, int(round(n * keep)))
        if keep == 1.0 or n_drop <= 0:
            thresholds.append(None)
            continue
        magnitudes = torch.cat([t.reshape(-1).abs() for t in vector.values()])
        thresholds.append(magnitudes.kthvalue(n_drop).values)
        del magnitudes
    return thresholds


def ties_by_key(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2
                ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(key, trimmed [K, …], agreeing mask [K, …])`` tensor by tensor; the same numbers as trimming,
    electing and masking the flattened [K, P] matrix (:func:`trim_top_k`, :func:`elect_sign`,
    :func:`agreeing`), in the memory of one tensor of K vectors. ``vectors`` may compute their entries
    on access (e.g. θₖ − θ₀ per tensor): each is read twice."""
    keys = list(vectors[0])
    thresholds = trim_thresholds(vectors, keep)

    def trimmed(key: str) -> torch.Tensor:
        rows = [v[key] if thr is None else v[key] * (v[key].abs() > thr) for v, thr in zip(vectors, thresholds)]
        return torch.stack(rows)

    # elect_sign's tie-break (entries whose sum is exactly 0) needs the majority over *all* entries first
    votes = sum(int(torch.sign(trimmed(k).sum(0)).sum(dtype=torch.int64)) for k in keys)
    majority = 1.0 if votes >= 0 else -1.0
    for key in keys:
        t = trimmed(key)
        sign = torch.sign(t.sum(0))
        sign = torch.where(sign == 0, torch.tensor(majority, dtype=t.dtype), sign)
        yield key, t, agreeing(t, sign)


def ties_task_vectors(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2) -> list[dict[str, torch.Tensor]]:
    """Trimmed, sign-agreeing task vectors kept separate per task: the inputs of AdaMerging++."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for key, trimmed, mask in ties_by_key(vectors, keep):
        for row, selected in zip(out, trimmed * mask):
            row[key] = selected
    return out


def ties_vector(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2,
                merge: str = "mean") -> dict[str, torch.Tensor]:
    """disjoint_merge(trim(τ₁..τ_K)): the merged task vector that λ scales; ``merge`` is 'mean' (paper) or 'sum'."""
    if merge not in MERGE_FUNCTIONS:
        raise ValueError(f"unknown TIES merge function {merge!r}; valid: {', '.join(MERGE_FUNCTIONS)}")
    out = {}
    for key, trimmed, mask in ties_by_key(vectors, keep):
        total = (trimmed * mask).sum(0)
        out[key] = total / mask.sum(0).clamp(min=1) if merge == "mean" else total
    return out


def ties_merge(pretrained: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
               keep: float = 0.2, lam: float = 1.0, merge: str = "mean") -> dict[str, torch.Tensor]:
    """θ = θ₀ + λ · ties_vector(τ₁..τ_K)."""
    return add_scaled(pretrained, ties_vector(vectors, keep, merge), lam)
