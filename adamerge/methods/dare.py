"""DARE (Yu et al., ICML 2024) as a preset of the scaled merges: sparsify each τₖ, then task arithmetic or TIES."""

from __future__ import annotations

from typing import Sequence

from adamerge.merging import dare_vector
from adamerge.merging.dare import BASE_METHODS
from adamerge.methods.base import TRIM_COUNTS, MergeContext, StateDict, require_label
from adamerge.methods.scaled import _Scaled


class Dare(_Scaled):
    """θ = θ₀ + λ · base(DARE_p(τ₁), …, DARE_p(τ_K)); masks drawn from ``seed`` (the run's seed when null)."""

    def __init__(self, p: float = 0.5, base: str = "task_arithmetic", lam: float = 0.3,
                 lam_grid: Sequence[float] | None = None, keep: float = 0.2, merge: str = "mean",
                 rescale: bool = True, seed: int | None = None, trim_count: str = "image_encoder",
                 zero_sign: str = "majority", label: str | None = None):
        if base not in BASE_METHODS:
            raise ValueError(f"unknown DARE base method {base!r}; valid: {', '.join(BASE_METHODS)}")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"DARE drop rate method.p must be in [0, 1), got {p}")
        super().__init__(lam, lam_grid)
        self.p, self.base, self.keep, self.merge_function = float(p), base, float(keep), merge
        self.rescale, self.seed = bool(rescale), seed
        if trim_count not in TRIM_COUNTS:
            raise ValueError(f"unknown TIES trim_count {trim_count!r}; valid: {', '.join(TRIM_COUNTS)}")
        self.trim_count, self.zero_sign = trim_count, zero_sign
        self.label = "Dare" if label is None else require_label(label, {
            "it says TIES, the base is task arithmetic": "TIES" in label and base != "ties",
            "it says task arithmetic, the base is TIES": "Task Arithmetic" in label and base != "task_arithmetic",
        }, "Use method=dare_ties or dare_task_arithmetic, or set method.label.")

    def direction(self, ctx: MergeContext) -> StateDict:
        seed = ctx.seed if self.seed is None else int(self.seed)
        rule = ctx.ties_rule(self.trim_count, self.zero_sign) if self.base == "ties" else {}
        return dare_vector(ctx.vectors, self.p, seed, self.base, self.keep, self.merge_function, self.rescale, **rule)
