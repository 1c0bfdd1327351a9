"""The merge methods that ``adamerge-merge-models`` offers, applied one tensor at a time.

Each entry calls the pure functions of :mod:`adamerge.merging` on one-tensor state dicts, so a model
directory merge is the same math as a state-dict merge, tensor by tensor. Two consequences, stated
where they matter: TIES trims each *tensor* to its top-``keep`` fraction (mergekit's convention for
LLMs; a global top-k over billions of entries would need every task vector in memory at once), and
DARE draws each tensor's drop mask from a seed derived from (``--seed``, tensor name), so the masks do
not depend on sharding or on the order tensors are visited.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from adamerge.merging.averaging import weight_average
from adamerge.merging.dare import dare_merge
from adamerge.merging.extrapolation import expo, extrapolation_merge
from adamerge.merging.task_arithmetic import task_arithmetic
from adamerge.merging.task_vectors import task_vector
from adamerge.merging.ties import ties_merge

TensorMerge = Callable[[str, torch.Tensor, Sequence[torch.Tensor], dict], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    title: str
    formula: str
    reference: str
    merge: TensorMerge
    defaults: dict = field(default_factory=dict)  # parameter → default; None means the user must give it
    n_models: tuple[int, int | None] = (1, None)  # (min, max) number of --models

    def resolve(self, given: dict) -> dict:
        """The method's parameters: ``given`` over the defaults; unknown, missing or out-of-range ones raise."""
        unknown = sorted(k for k, v in given.items() if v is not None and k not in self.defaults)
        if unknown:
            accepted = ", ".join(f"--{k}" for k in self.defaults) or "none"
            raise ValueError(f"{', '.join('--' + k for k in unknown)} does not apply to --method {self.name} "
                             f"(its parameters: {accepted})")
        params = {k: (given[k] if given.get(k) is not None else d) for k, d in self.defaults.items()}
        missing = [k for k, v in params.items() if v is None]
        if missing:
            raise ValueError(f"--method {self.name} needs {', '.join('--' + k for k in missing)} ({self.formula})")
        if "keep" in params and not 0.0 < params["keep"] <= 1.0:
            raise ValueError(f"--keep must be in (0, 1] (the fraction of each task vector TIES keeps), "
                             f"got {params['keep']}")
        if "p" in params and not 0.0 <= params["p"] < 1.0:
            raise ValueError(f"--p must be in [0, 1) (DARE's drop rate), got {params['p']}")
        return params

    def check_count(self, n: int) -> None:
        low, high = self.n_models
        if n < low or (high is not None and n > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            noun = "directory" if wanted.endswith(" 1") else "directories"
            raise ValueError(f"--method {self.name} takes {wanted} --models {noun}, got {n} ({self.formula})")


def _one(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: tensor}


def _vectors(key: str, base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [task_vector(_one(key, m), _one(key, base)) for m in models]


def tensor_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one tensor's DARE masks: a hash of the run seed and the tensor name."""
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _weight_averaging(key, base, models, params):
    return weight_average([_one(key, m) for m in models])[key]


def _task_arithmetic(key, base, models, params):
    return task_arithmetic(_one(key, base), _vectors(key, base, models), lam=params["lam"])[key]


def _ties(key, base, models, params):
    return ties_merge(_one(key, base), _vectors(key, base, models), keep=params["keep"], lam=params["lam"])[key]


def _expo(key, base, models, params):
    return expo(_one(key, models[0]), _one(key, base), alpha=params["alpha"])[key]


def _extrapolation(key, base, models, params):
    first, second = models
    return extrapolation_merge(_one(key, first), _one(key, second), _one(key, base),
                               alpha=params["alpha"], beta=params["beta"])[key]


def _dare(base_method: str):
    def merge(key, base, models, params):
        return dare_merge(_one(key, base), _vectors(key, base, models), p=params["p"],
                          seed=tensor_seed(params["seed"], key), base=base_method, lam=params["lam"],
                          keep=params.get("keep", 0.2))[key]
    return merge


METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("weight_averaging", "Weight averaging (model soups)", "θ = (1/K) Σₖ θₖ",
                "Wortsman et al., ICML 2022", _weight_averaging),
    MergeMethod("task_arithmetic", "Task arithmetic", "θ = θ₀ + λ Σₖ (θₖ − θ₀)",
                "Ilharco et al., ICLR 2023", _task_arithmetic, {"lam": 0.3}),
    MergeMethod("ties", "TIES-merging",
                "θ = θ₀ + λ · disjoint_mean(elect_sign(trim_keep(τ₁..τ_K))), per tensor",
                "Yadav et al., NeurIPS 2023", _ties, {"keep": 0.2, "lam": 1.0}),
    MergeMethod("expo", "ExPO (model extrapolation)", "θ = θ_ft + α (θ_ft − θ₀), one --models directory",
                "Zheng et al., arXiv 2404.16792", _expo, {"alpha": None}, (1, 1)),
    MergeMethod("extrapolation", "Extrapolation Merging",
                "θ = β ExPO(θ₁, α) + (1 − β) ExPO(θ₂, α), two checkpoints",
                "Lin et al., arXiv 2503.04834", _extrapolation, {"alpha": None, "beta": None}, (2, 2)),
    MergeMethod("dare_task_arithmetic", "DARE + task arithmetic",
                "θ = θ₀ + λ Σₖ DARE_p(τₖ), DARE_p(τ) = τ ⊙ Bernoulli(1 − p) / (1 − p)",
                "Yu et al., ICML 2024", _dare("task_arithmetic"), {"p": 0.9, "lam": 0.3, "seed": 0}),
    MergeMethod("dare_ties", "DARE + TIES", "θ = θ₀ + λ · TIES_keep(DARE_p(τ₁..τ_K)), per tensor",
                "Yu et al., ICML 2024", _dare("ties"), {"p": 0.9, "keep": 0.2, "lam": 1.0, "seed": 0}),
]}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose from {', '.join(METHODS)}") from None
