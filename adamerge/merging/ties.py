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

from typing import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import torch

from adamerge.merging.sort_prefix import first_k_mask
from adamerge.merging.task_vectors import add_scaled

MERGE_FUNCTIONS = ("mean", "sum")
ZERO_SIGNS = ("majority", "positive")
TRIM_SCOPES = ("vector", "tensor")
TRIM_RULES = ("official", "exact_k")


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


def check_trim(scope: str, rule: str) -> None:
    if scope not in TRIM_SCOPES:
        raise ValueError(f"unknown TIES trim_scope {scope!r}; valid: {', '.join(TRIM_SCOPES)} "
                         "(vector: the official code and FusionBench; tensor: mergekit)")
    if rule not in TRIM_RULES:
        raise ValueError(f"unknown TIES trim_rule {rule!r}; valid: {', '.join(TRIM_RULES)} (official: |τ| ≥ the "
                         "threshold, ties kept; exact_k: exactly max(1, int(n·keep)) entries, mergekit)")
    if rule == "exact_k" and scope != "tensor":
        raise ValueError("TIES trim_rule=exact_k is mergekit's per-tensor rule (argsort order among tied magnitudes); "
                         "use it with trim_scope=tensor")


_DIGIT = 16  # bits per radix pass


def kth_smallest_magnitude(chunks: Callable[[], Iterable[torch.Tensor]], rank: int) -> torch.Tensor:
    """The ``rank``-th smallest ``|x|`` (1-based) over every entry the iterables from ``chunks()`` yield, exactly
    ``torch.cat(...).abs().kthvalue(rank)``, in the memory of one chunk: a radix select over the IEEE bit
    pattern (non-negative floats order as their bits), one pass over the data per 16 bits of the dtype.
    This is how a global TIES trim of a multi-billion-entry task vector fits in host memory."""
    dtype = None
    prefix, found_bits = 0, 0
    int_of = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
              torch.bfloat16: torch.int16}
    while True:
        counts = None
        for chunk in chunks():
            if dtype is None:
                dtype = chunk.dtype
                if dtype not in int_of:
                    raise TypeError(f"kth_smallest_magnitude needs float tensors, got {dtype}")
                width = torch.finfo(dtype).bits
            elif chunk.dtype != dtype:
                raise TypeError(f"mixed dtypes in one trim: {dtype} and {chunk.dtype}")
            shift = width - found_bits - _DIGIT
            for piece in chunk.reshape(-1).split(1 << 24):  # int64 bits of 16 M entries at a time
                bits = piece.abs().view(int_of[dtype]).to(torch.int64)
                if found_bits:
                    bits = bits[(bits >> (width - found_bits)) == prefix]
                part = torch.bincount((bits >> shift) & ((1 << _DIGIT) - 1), minlength=1 << _DIGIT)
                counts = part if counts is None else counts + part
                del bits
        if counts is None:
            raise ValueError("kth_smallest_magnitude over no entries")
        total = int(counts.sum())
        if not 1 <= rank <= total:
            raise ValueError(f"rank {rank} outside 1..{total}")
        cumulative = counts.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)))
        rank -= int(cumulative[digit - 1]) if digit else 0
        prefix, found_bits = (prefix << _DIGIT) | digit, found_bits + _DIGIT
        if found_bits == width:
            return torch.tensor(prefix, dtype=torch.int64).to(int_of[dtype]).view(dtype)


def _threshold(magnitudes: Callable[[], Iterable[torch.Tensor]], n: int, keep: float, extra_zeros: int,
               low_memory: bool) -> torch.Tensor | None:
    rank = threshold_rank(n + int(extra_zeros), keep) - int(extra_zeros)
    if rank <= 0:  # the threshold falls among the zero entries: |τ| ≥ 0 keeps everything
        return None
    if low_memory:
        return kth_smallest_magnitude(magnitudes, rank)
    flat = torch.cat([m.reshape(-1).abs() for m in magnitudes()])
    return flat.kthvalue(rank).values


def trim_thresholds(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float, extra_zeros: int = 0,
                    uncounted: Sequence[Collection[str]] | None = None, low_memory: bool = False
                    ) -> list[torch.Tensor | None]:
    """Each vector's threshold: entries with ``|τ| ≥`` it survive (None: all do); see the module docstring.

    One vector is flattened at a time, so the [K, P] matrix never exists: for ViT-L/14 × 8 that matrix and
    its trimmed copies were tens of GB of host memory. ``low_memory`` never flattens even one vector (a
    radix select, :func:`kth_smallest_magnitude`; the same threshold), for vectors of billions of entries."""
    thresholds: list[torch.Tensor | None] = []
    for vector, keys in zip(vectors, _domains(vectors, uncounted)):
        n = sum(vector[k].numel() for k in keys)
        thresholds.append(_threshold(lambda: (vector[k] for k in keys), n, keep, extra_zeros, low_memory))
    return thresholds


def exact_k_mask(value: torch.Tensor, keep: float) -> torch.Tensor:
    """mergekit's magnitude trim of one tensor: exactly max(1, int(n·keep)) entries, the first of
    ``argsort(|τ| as float32, descending)`` (its order decides among tied magnitudes; the set is found
    without the sort, :mod:`adamerge.merging.sort_prefix`)."""
    if check_keep(keep) >= 1.0:
        return torch.ones_like(value, dtype=torch.bool)
    k = max(1, int(keep * value.numel()))
    return first_k_mask(value.abs().reshape(-1).float(), k).view(value.shape)


def trimmer(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float, *, scope: str = "vector",
            rule: str = "official", extra_zeros: int = 0, uncounted: Sequence[Collection[str]] | None = None,
            low_memory: bool = False) -> Callable[[int, str], torch.Tensor]:
    """``trimmed(k, key)``: τₖ[key] with the entries the trim drops set to 0. ``scope='vector'`` trims each τₖ
    as one flattened vector (n: every counted entry, plus ``extra_zeros``); ``'tensor'`` trims every tensor on
    its own (mergekit). Tensors in ``uncounted[k]`` are neither counted nor kept."""
    check_trim(scope, rule)
    domains = [set(d) for d in _domains(vectors, uncounted)]
    thresholds = trim_thresholds(vectors, keep, extra_zeros, uncounted, low_memory) if scope == "vector" else None

    cache: dict[int, torch.Tensor] = {}  # the K trimmed rows of the key read last: TIES reads each row 2–3 times
    current: list[str | None] = [None]

    def trim(k: int, key: str) -> torch.Tensor:
        value = vectors[k][key]
        if key not in domains[k]:
            return torch.zeros_like(value)
        if rule == "exact_k":
            return value * exact_k_mask(value, keep)
        thr = thresholds[k] if thresholds is not None else _threshold(lambda: [value], value.numel(), keep, 0, False)
        return value if thr is None else value * (value.abs() >= thr)

    def trimmed(k: int, key: str) -> torch.Tensor:
        if current[0] != key:
            cache.clear()
            current[0] = key
        if k not in cache:
            cache[k] = trim(k, key)
        return cache[k]

    return trimmed


def _majority(trimmed: Callable[[int, str], torch.Tensor], keys: Sequence[str], count: int) -> float:
    """sign(Σ over entries of the elected signs): the official code's sign for entries whose Σₖ τₖ is 0."""
    votes = 0
    for key in keys:
        total = trimmed(0, key).clone()
        for k in range(1, count):
            total += trimmed(k, key)
        votes += int(torch.sign(total).sum(dtype=torch.int64))
    return float((votes > 0) - (votes < 0))


def ties_by_key(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2, *, zero_sign: str = "majority",
                extra_zeros: int = 0, uncounted: Sequence[Collection[str]] | None = None,
                trim_scope: str = "vector", trim_rule: str = "official"
                ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(key, trimmed [K, …], agreeing mask [K, …])`` tensor by tensor; the same numbers as trimming,
    electing and masking the flattened [K, P] matrix, in the memory of one tensor of K vectors. ``vectors``
    may compute their entries on access (e.g. θₖ − θ₀ per tensor): each is read twice."""
    check_zero_sign(zero_sign)
    keys = list(vectors[0])
    trim = trimmer(vectors, keep, scope=trim_scope, rule=trim_rule, extra_zeros=extra_zeros, uncounted=uncounted)
    stack = lambda key: torch.stack([trim(k, key) for k in range(len(vectors))])  # noqa: E731

    if trim_scope == "vector" and zero_sign == "majority":  # the tie-break needs the majority over *all* entries first
        majority = _majority(trim, keys, len(vectors))
    for key in keys:
        t = stack(key)
        if trim_scope == "tensor" and zero_sign == "majority":
            majority = _majority(trim, [key], len(vectors))
        elif zero_sign == "positive":
            majority = 1.0
        sign = torch.sign(t.sum(0))
        sign = torch.where(sign == 0, torch.tensor(majority, dtype=t.dtype), sign)
        yield key, t, agreeing(t, sign)


def ties_directions(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float = 0.2, merge: str = "mean", *,
                    zero_sign: str = "majority", trim_scope: str = "vector", trim_rule: str = "official",
                    keys: Sequence[str] | None = None) -> Callable[[str], torch.Tensor]:
    """``direction(key)``: one tensor of :func:`ties_vector` without a [K, …] stack — the trimmed rows are
    summed, the sign elected, and the agreeing entries accumulated row by row (each τₖ[key] read twice). The
    global thresholds (radix select) and the majority sign are computed up front, one tensor in memory at a
    time: the form a model-directory merge of billions of entries streams through."""
    check_zero_sign(zero_sign)
    if merge not in MERGE_FUNCTIONS:
        raise ValueError(f"unknown TIES merge function {merge!r}; valid: {', '.join(MERGE_FUNCTIONS)}")
    keys = list(vectors[0]) if keys is None else list(keys)
    trim = trimmer(vectors, keep, scope=trim_scope, rule=trim_rule, low_memory=True)
    count = len(vectors)
    global_majority = (_majority(trim, keys, count) if trim_scope == "vector" and zero_sign == "majority" else 1.0)

    def direction(key: str) -> torch.Tensor:
        total = trim(0, key).clone()
        for k in range(1, count):
            total += trim(k, key)
        majority = (_majority(trim, [key], count) if trim_scope == "tensor" and zero_sign == "majority"
                    else global_majority)
        sign = torch.sign(total)
        sign = torch.where(sign == 0, torch.tensor(majority, dtype=total.dtype), sign)
        merged, agree = torch.zeros_like(total), torch.zeros_like(total)
        for k in range(count):
            row = trim(k, key)
            mask = agreeing(row, sign)
            merged += row * mask
            agree += mask
        del total, sign
        return merged / agree.clamp(min=1) if merge == "mean" else merged

    return direction


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
