"""DARE — Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario").

Each entry of each task vector is dropped (set to 0) with probability p and the survivors are
rescaled by 1/(1−p), so E[DARE(τ)] = τ entry by entry: the sparsified vectors are an unbiased
estimate of the originals, which is why a merge of them (task arithmetic or TIES) stays close to
the merge of the dense vectors even at p = 0.9. Pure functions; randomness only through an explicit
seed (one ``torch.Generator`` walked over tasks in order, then tensors in state-dict order; or, for
model directories, one seed per tensor and task, :func:`tensor_seed`, so that masks do not depend on the
order tensors are read or on sharding).

``rescale``: ``True`` scales survivors by 1/(1−p) (the paper); ``"l1"`` rescales each tensor to its own L1 norm
(mergekit's ``rescale: true``); ``False`` drops only (the paper's ablation).
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import torch

from adamerge.merging.task_arithmetic import sum_vectors
from adamerge.merging.task_vectors import add_scaled
from adamerge.merging.ties import MERGE_FUNCTIONS, ties_vector
from adamerge.merging.views import LazyState

BASE_METHODS = ("task_arithmetic", "ties")
RESCALES = (True, False, "l1")
L1_EPS = 1e-7  # mergekit's guard: a tensor (or its survivors) with L1 norm below this is not rescaled


def check_rescale(rescale) -> bool | str:
    if rescale not in RESCALES or (rescale in (0, 1) and not isinstance(rescale, bool)):
        raise ValueError(f"unknown DARE rescale {rescale!r}; valid: true (1/(1−p), the paper), l1 (each tensor back "
                         "to its L1 norm, mergekit), false (drop only)")
    return rescale


def tensor_seed(seed: int, key: str, task: int = 0) -> int:
    """A 63-bit seed for one tensor of one task vector: a hash of the run seed, the tensor name and the task."""
    digest = hashlib.sha256(f"{int(seed)}\0{key}\0{int(task)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rescaled(value: torch.Tensor, keep: torch.Tensor, p: float, rescale) -> torch.Tensor:
    """The survivors ``value * keep``, scaled as ``rescale`` says."""
    dropped = value * keep
    if rescale is True:
        return dropped / (1.0 - p)
    if rescale == "l1":
        before, after = value.abs().sum(), dropped.abs().sum()
        if before < L1_EPS or after < L1_EPS:
            return dropped
        return dropped * (before / after)
    return dropped


def dare_tensor(value: torch.Tensor, p: float, seed: int, rescale=True) -> torch.Tensor:
    """DARE of one tensor with its own generator seeded by ``seed`` (see :func:`tensor_seed`)."""
    p, rescale = _check_p(p), check_rescale(rescale)
    if p == 0.0:
        return value.clone()
    keep = torch.rand(value.shape, generator=_generator(seed, value.device), device=value.device) >= p
    return rescaled(value, keep, p, rescale)


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

    ``rescale=False`` gives the paper's ablation (drop only), which shrinks the vector by (1−p) on average;
    ``"l1"`` rescales each tensor to its L1 norm (mergekit).
    """
    p, rescale = _check_p(p), check_rescale(rescale)
    if p == 0.0:
        return {k: v.clone() for k, v in vector.items()}
    out = {}
    for key, value in vector.items():
        keep = torch.rand(value.shape, generator=generator, device=value.device) >= p
        out[key] = rescaled(value, keep, p, rescale)
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


def dare_views(vectors: Sequence[Mapping[str, torch.Tensor]], p: float, seed: int, rescale=True) -> list:
    """The DARE-sparsified vectors, computed on access: τₖ[key]'s mask is seeded by ``tensor_seed(seed, key, k)``,
    so every read of a tensor gives the same mask, whatever the order or the sharding."""
    def view(k: int, vector: Mapping[str, torch.Tensor]) -> LazyState:
        return LazyState(list(vector), lambda key: dare_tensor(vector[key], p, tensor_seed(seed, key, k), rescale))
    return [view(k, v) for k, v in enumerate(vectors)]
