"""DARE (Yu et al., ICML 2024) as a preset of the scaled merges: sparsify each τₖ, then task arithmetic or TIES."""

from __future__ import annotations

from typing import Sequence

from adamerge.merging import dare_vector, sum_vectors
from adamerge.merging.dare import BASE_METHODS, check_rescale, dare_views
from adamerge.merging.ties import check_trim, ties_directions
from adamerge.methods.base import TRIM_COUNTS, MergeContext, StateDict, one, require_label
from adamerge.methods.scaled import _Scaled


class Dare(_Scaled):
    """θ = θ₀ + λ · base(DARE_p(τ₁), …, DARE_p(τ_K)); masks drawn from ``seed`` (the run's seed when null).

    ``rescale``: true (1/(1−p)), "l1" (each tensor back to its L1 norm, mergekit) or false. Merging weights alone
    (model directories), each tensor of each task has its own seed (``tensor_seed``), so masks do not depend
    on sharding or reading order; in an experiment one generator walks the tasks and their tensors."""

    def __init__(self, p: float = 0.5, base: str = "task_arithmetic", lam: float = 0.3,
                 lam_grid: Sequence[float] | None = None, keep: float = 0.2, merge: str = "mean",
                 rescale: bool | str = True, seed: int | None = None, trim_count: str = "image_encoder",
                 zero_sign: str = "majority", trim_scope: str = "vector", trim_rule: str = "official",
                 label: str | None = None):
        if base not in BASE_METHODS:
            raise ValueError(f"unknown DARE base method {base!r}; valid: {', '.join(BASE_METHODS)}")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"DARE drop rate method.p must be in [0, 1), got {p}")
        super().__init__(lam, lam_grid)
        self.p, self.base, self.keep, self.merge_function = float(p), base, float(keep), merge
        self.rescale, self.seed = check_rescale(rescale), seed
        check_trim(trim_scope, trim_rule)
        self.trim_scope, self.trim_rule = trim_scope, trim_rule
        if trim_count not in TRIM_COUNTS:
            raise ValueError(f"unknown TIES trim_count {trim_count!r}; valid: {', '.join(TRIM_COUNTS)}")
        self.trim_count, self.zero_sign = trim_count, zero_sign
        self.label = "Dare" if label is None else require_label(label, {
            "it says TIES, the base is task arithmetic": "TIES" in label and base != "ties",
            "it says task arithmetic, the base is TIES": "Task Arithmetic" in label and base != "task_arithmetic",
        }, "Use method=dare_ties or dare_task_arithmetic, or set method.label.")

    def direction(self, ctx: MergeContext) -> StateDict:
        seed = ctx.seed if self.seed is None else int(self.seed)
        rule = ({**ctx.ties_rule(self.trim_count, self.zero_sign), "trim_scope": self.trim_scope,
                 "trim_rule": self.trim_rule} if self.base == "ties" else {})
        return dare_vector(ctx.vectors, self.p, seed, self.base, self.keep, self.merge_function, self.rescale, **rule)

    def direction_by_key(self, vectors, keys, seed):
        dropped = dare_views(vectors, self.p, seed if self.seed is None else int(self.seed), self.rescale)
        if self.base == "task_arithmetic":
            return lambda key: sum_vectors([one(key, v[key]) for v in dropped])[key]
        return ties_directions(dropped, self.keep, self.merge_function, zero_sign=self.zero_sign,
                               trim_scope=self.trim_scope, trim_rule=self.trim_rule, keys=keys)
