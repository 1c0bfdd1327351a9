"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

The rule is the one of the official AdaMerging code (``src/ties_merging_utils.py``) and FusionBench, which
share it: each task vector is flattened over all its tensors; with n entries, k = int(n·keep) and the
entries kept are those with ``|τ| ≥ kthvalue(|τ|, n − k)`` — the k largest, the threshold entry itself and
any entry tied with it (so at least k + 1; many more on half-precision vectors, whose magnitudes repeat).
The sign of every entry is elected by the sum of the trimmed vectors (the paper's "mass"); an entry whose
sum is exactly 0 takes the majority sign, ``sign(Σ elected signs)``, and when that majority is itself 0 the
official code leaves the sign at 0, which keeps the entry's *negative* values (``zero_sign='majority'``).
mergekit gives such entries +1 (``zero_sign='positive'``). Only entries that agree with the elected sign
are merged, by their mean (the TIES paper) or their sum (the official AdaMerging code's ``dis-sum``).

What n counts decides how much survives: ``extra_zeros`` counts entries outside the tensors given whose task
vector is 0 — the official code flattens the whole ``ImageEncoder`` (CLIP without its text transformer), so
the token embedding, ``ln_final``, ``text_projection`` and ``logit_scale`` are in its n and ViT-B/32 keeps
25.8 % of its vision tower at "top 20 %" — and ``uncounted`` names tensors outside the trimming domain (e.g.
a projection filled in from θ₀ because the fine-tuned file never had one): they are neither counted nor
merged.
"""

from __future__ import annotations

from typing import Collection, Iterator, Mapping, Sequence

import torch

from adamerge.merging.task_vectors import add_scaled

MERGE_FUNCTIONS = ("mean", "sum")
ZERO_SIGNS = ("majority", "positive")


def flatten(vectors: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, list[str], list[torch.Size]]:
    """Stack K task vectors as a [K, P] matrix, remembering how to cut it back into tensors."""
    keys = list(vectors[0])
    shapes = [vectors[0][k].shape for k in keys]
    flat = torch.stack([torch.cat([v[k].reshape(-1) for k in keys]) for v in vectors])
    return flat, keys, shapes


def unflatten(flat: torch.Tensor, keys: list[str], shapes: list[torch.Size]) -> dict[str, torch.Tensor]:
    sizes = [s.numel() for s in shapes]
    return {k: part.view(shape) for k, part, shape in zip(keys, flat.split(sizes), shapes)}


def check_keep(keep: float) -> float:
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        hint = f" — a percentage? use {keep / 100:g}" if 1.0 < keep <= 100.0 else ""
        raise ValueError(f"TIES keep fraction must be in (0, 1], got {keep:g}{hint} (0.2 keeps the top 20 %)")
    return keep


def check_zero_sign(zero_sign: str) -> str:
    if zero_sign not in ZERO_SIGNS:
        raise ValueError(f"unknown TIES zero_sign {zero_sign!r}; valid: {', '.join(ZERO_SIGNS)} "
                         f"(majority: the official AdaMerging code and FusionBench; positive: mergekit)")
    return zero_sign


def threshold_rank(n: int, keep: float) -> int:
    """1-based rank, in ascending |τ|, of the trimming threshold among n entries; 0 means keep everything."""
    keep = check_keep(keep)
    if keep == 1.0 or n == 0:
        return 0
    return n - int(n * keep)


def trim_top_k(flat: torch.Tensor, keep: float, extra_zeros: int = 0) -> torch.Tensor:
    """Keep, in each row, the entries with ``|τ| ≥ kthvalue(|τ|, n − int(n·keep))`` (n counts ``extra_zeros``)."""
    rank = threshold_rank(flat.shape[1] + extra_zeros, keep) - extra_zeros
    if rank <= 0:
        return flat.clone()
    threshold = flat.abs().kthvalue(rank, dim=1, keepdim=True).values
    return flat * (flat.abs() >= threshold)


def elect_sign(flat: torch.Tensor, zero_sign: str = "majority") -> torch.Tensor:
    """Per-entry sign of Σₖ τₖ; exact zeros take the majority sign (which may itself be 0) or +1."""
    sign = torch.sign(flat.sum(0))
    fill = torch.sign(sign.sum()) if check_zero_sign(zero_sign) == "majority" else torch.ones((), dtype=flat.dtype)
    return torch.where(sign == 0, fill.to(flat.dtype), sign)


def agreeing(flat: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mask of the entries whose sign matches the elected one (a 0 sign selects negative entries, as officially)."""
    return torch.where(sign > 0, flat > 0, flat < 0)


def _domains(vectors, uncounted) -> list[list[str]]:
    if uncounted is None:
        uncounted = [()] * len(vectors)
    elif len(uncounted) != len(vectors):
        raise ValueError(f"{len(uncounted)} uncounted key sets for {len(vectors)} task vectors")
    return [[k for k in v if k not in skip] for v, skip in zip(vectors, uncounted)]


def trim_thresholds(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float, extra_zeros: int = 0,
                    uncounted: Sequence[Collection[str]] | None = None) -> list[torch.Tensor | None]:
    """Each vector's threshold: entries with ``|τ| ≥`` it survive (None: all do); see the module docstring.

    One vector is flattened at a time, so the [K, P] matrix never exists: for ViT-L/14 × 8 that matrix and
    its trimmed copies were tens of GB of host memory."""
    thresholds: list[torch.Tensor | None] = []
    for vector, keys in zip(vectors, _domains(vectors, uncounted)):
        n = sum(vector[k].numel() for k in keys)
        rank = threshold_rank(n + int(extra_zeros), keep) - int(extra_zeros)
        if rank <= 0:  # the threshold falls among the zero entries: |τ| ≥ 0 keeps everything
            thresholds.append(None)
            continue
        magnitudes = torch.cat([vector[k].reshape(-1).abs() for k in keys])
        thresholds.append(magnitudes.kthvalue(rank).values)
        del magnitudes
    return thresholds


def ties_by_key(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2, *, zero_sign: str = "majority",
                extra_zeros: int = 0, uncounted: Sequence[Collection[str]] | None = None
                ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(key, trimmed [K, …], agreeing mask [K, …])`` tensor by tensor; the same numbers as trimming,
    electing and masking the flattened [K, P] matrix, in the memory of one tensor of K vectors. ``vectors``
    may compute their entries on access (e.g. θₖ − θ₀ per tensor): each is read twice."""
    check_zero_sign(zero_sign)
    keys = list(vectors[0])
    thresholds = trim_thresholds(vectors, keep, extra_zeros, uncounted)
    domains = [set(d) for d in _domains(vectors, uncounted)]

    def trimmed(key: str) -> torch.Tensor:
        rows = []
        for v, thr, domain in zip(vectors, thresholds, domains):
            value = v[key]
            if key not in domain:
                value = torch.zeros_like(value)
            elif thr is not None:
                value = value * (value.abs() >= thr)
            rows.append(value)
        return torch.stack(rows)

    majority = 1.0
    if zero_sign == "majority":  # the tie-break needs the majority over *all* entries first
        votes = sum(int(torch.sign(trimmed(k).sum(0)).sum(dtype=torch.int64)) for k in keys)
        majority = float((votes > 0) - (votes < 0))
    for key in keys:
        t = trimmed(key)
        sign = torch.sign(t.sum(0))
        sign = torch.where(sign == 0, torch.tensor(majority, dtype=t.dtype), sign)
        yield key, t, agreeing(t, sign)


def ties_task_vectors(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2,
                      **rule) -> list[dict[str, torch.Tensor]]:
    """Trimmed, sign-agreeing task vectors kept separate per task: the inputs of AdaMerging++."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for key, trimmed, mask in ties_by_key(vectors, keep, **rule):
        for row, selected in zip(out, trimmed * mask):
            row[key] = selected
    return out


def ties_vector(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2, merge: str = "mean",
                **rule) -> dict[str, torch.Tensor]:
    """disjoint_merge(trim(τ₁..τ_K)): the merged task vector that λ scales; ``merge`` is 'mean' (TIES paper) or
    'sum' (the official AdaMerging code's TIES baseline). ``rule``: ``zero_sign``, ``extra_zeros``, ``uncounted``."""
    if merge not in MERGE_FUNCTIONS:
        raise ValueError(f"unknown TIES merge function {merge!r}; valid: {', '.join(MERGE_FUNCTIONS)}")
    out = {}
    for key, trimmed, mask in ties_by_key(vectors, keep, **rule):
        total = (trimmed * mask).sum(0)
        out[key] = total / mask.sum(0).clamp(min=1) if merge == "mean" else total
    return out


def ties_merge(pretrained: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
               keep: float = 0.2, lam: float = 1.0, merge: str = "mean", **rule) -> dict[str, torch.Tensor]:
    """θ = θ₀ + λ · ties_vector(τ₁..τ_K)."""
    return add_scaled(pretrained, ties_vector(vectors, keep, merge, **rule), lam)
