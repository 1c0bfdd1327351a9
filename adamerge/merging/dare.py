"""DARE — Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario").

Each entry of each task vector is dropped (set to 0) with probability p and the survivors are
rescaled by 1/(1−p), so E[DARE(τ)] = τ entry by entry: the sparsified vectors are an unbiased
estimate of the originals, which is why a merge of them (task arithmetic or TIES) stays close to
the merge of the dense vectors even at p = 0.9. Pure functions; randomness only through an explicit
seed (one ``torch.Generator`` walked over tasks in order, then tensors in state-dict order).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from adamerge.merging.task_arithmetic import sum_vectors
from adamerge.merging.task_vectors import add_scaled
from adamerge.merging.ties import MERGE_FUNCTIONS, ties_vector

BASE_METHODS = ("task_arithmetic", "ties")


def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p} (p = 1 would drop every entry)")
    return p


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def dare_drop(vector: Mapping[str, torch.Tensor], p: float, generator: torch.Generator,
              rescale: bool = True) -> dict[str, torch.Tensor]:
    """One task vector with each entry kept with probability 1−p (independently) and scaled by 1/(1−p).

    ``rescale=False`` gives the paper's ablation (drop only), which shrinks the vector by (1−p) on average.
    """
    p = _check_p(p)
    if p == 0.0:
        return {k: v.clone() for k, v in vector.items()}
    out = {}
    for key, value in vector.items():
        keep = torch.rand(value.shape, generator=generator, device=value.device) >= p
        dropped = value * keep
        out[key] = dropped / (1.0 - p) if rescale else dropped
    return out


def dare_task_vectors(vectors: Sequence[Mapping[str, torch.Tensor]], p: float, seed: int = 0,
                      rescale: bool = True) -> list[dict[str, torch.Tensor]]:
    """DARE applied to every task vector; the same ``seed`` gives the same masks (on the same device)."""
    if not vectors:
        raise ValueError("DARE needs at least one task vector")
    first = next(iter(vectors[0].values()))
    gen = _generator(seed, first.device)
    return [dare_drop(v, p, gen, rescale) for v in vectors]


def dare_vector(vectors: Sequence[Mapping[str, torch.Tensor]], p: float = 0.9, seed: int = 0,
                base: str = "task_arithmetic", keep: float = 0.2, merge: str = "mean",
                rescale: bool = True, **ties_rule) -> dict[str, torch.Tensor]:
    """The merged direction that λ scales: Σₖ DARE_p(τₖ) (task arithmetic) or ties_vector(DARE_p(τ₁..τ_K));
    ``ties_rule``: the TIES keyword arguments (``zero_sign``, ``extra_zeros``, ``uncounted``)."""
    if base not in BASE_METHODS:
        raise ValueError(f"unknown DARE base method {base!r}; valid: {', '.join(BASE_METHODS)}")
    if base == "ties" and merge not in MERGE_FUNCTIONS:
        raise ValueError(f"unknown TIES merge function {merge!r}; valid: {', '.join(MERGE_FUNCTIONS)}")
    sparse = dare_task_vectors(vectors, p, seed, rescale)
    return sum_vectors(sparse) if base == "task_arithmetic" else ties_vector(sparse, keep=keep, merge=merge, **ties_rule)


def dare_merge(pretrained: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
               p: float = 0.9, seed: int = 0, base: str = "task_arithmetic", lam: float = 0.3,
               keep: float = 0.2, merge: str = "mean", rescale: bool = True) -> dict[str, torch.Tensor]:
    """θ = θ₀ + λ · dare_vector(τ₁..τ_K): task arithmetic or TIES on the DARE-sparsified task vectors.

    With p = 0 the result equals :func:`task_arithmetic` / :func:`ties_merge` exactly.
    """
    return add_scaled(pretrained, dare_vector(vectors, p, seed, base, keep, merge, rescale), lam)
