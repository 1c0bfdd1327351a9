"""Methods with one global scaling λ of one merged direction: task arithmetic and TIES.

λ is fixed, or chosen on the validation split from a grid (the protocol of both papers); the
direction is computed once and only rescaled per λ.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch

from adamerge.merging import add_scaled, sum_vectors, ties_vector
from adamerge.merging.task_vectors import TaskVectorView
from adamerge.merging.ties import MERGE_FUNCTIONS, check_keep, check_trim, check_zero_sign, ties_directions
from adamerge.methods.base import (TRIM_COUNTS, MergeContext, MergeResult, Method, StateDict, TensorMerge,
                                   no_evaluation, one, require_label)
from adamerge.search.edges import edge_warnings

log = logging.getLogger(__name__)

Direction = Callable[[str], torch.Tensor]


class _Scaled(Method):
    def __init__(self, lam: float, lam_grid: Sequence[float] | None):
        self.lam, self.lam_grid = float(lam), [float(x) for x in lam_grid] if lam_grid else None

    def direction(self, ctx: MergeContext) -> StateDict:  # pragma: no cover - interface
        raise NotImplementedError

    def direction_by_key(self, vectors: Sequence[Mapping[str, torch.Tensor]], keys: list[str],
                         seed: int) -> Direction:  # pragma: no cover - interface
        raise NotImplementedError

    def weights_merger(self, base, models, seed: int = 0) -> TensorMerge:
        """θ₀ + λ · direction, tensor by tensor (λ fixed: a grid needs an evaluation)."""
        no_evaluation(lam_grid=self.lam_grid)
        self.check_models(len(models))
        keys = list(base)
        direction = self.direction_by_key([TaskVectorView(m, base, keys=keys) for m in models], keys, seed)
        return lambda key: base[key] + self.lam * direction(key)

    def run(self, ctx: MergeContext) -> MergeResult:
        direction = self.direction(ctx)
        if self.lam_grid is None:
            return MergeResult(params=add_scaled(ctx.pretrained, direction, self.lam), extra={"lambda": self.lam})
        curve = {}
        for lam in self.lam_grid:
            acc = ctx.evaluate(add_scaled(ctx.pretrained, direction, lam), split="val")
            curve[lam] = sum(acc.values()) / len(acc)
        best = max(curve, key=curve.get)
        edges = edge_warnings({"λ": best}, [{"λ": lam} for lam in curve], {})
        log.info("%s: λ=%g chosen on val (val avg %.1f) from %s", self.label, best, 100 * curve[best],
                 ", ".join(f"{lam:g}" for lam in curve))
        for warning in edges:
            log.warning("%s: %s", self.label, warning)
        return MergeResult(params=add_scaled(ctx.pretrained, direction, best),
                           extra={"lambda": best, "val_avg": curve[best], "val_avg_by_lambda": curve,
                                  "search_warnings": edges})


class TaskArithmetic(_Scaled):
    """θ = θ₀ + λ Σₖ τₖ."""

    def __init__(self, lam: float = 0.3, lam_grid: Sequence[float] | None = None, label: str | None = None):
        super().__init__(lam, lam_grid)
        self.label = "TaskArithmetic" if label is None else require_label(label, {
            "it names a fixed λ, λ is chosen on val (lam_grid)": "λ=" in label and bool(self.lam_grid),
            "it says tuned, λ is fixed": "tuned" in label and not self.lam_grid,
        }, "λ chosen on val is method=task_arithmetic_tuned; or set method.label.")

    def direction(self, ctx: MergeContext) -> StateDict:
        return sum_vectors(ctx.vectors)

    def direction_by_key(self, vectors, keys, seed):
        return lambda key: sum_vectors([one(key, v[key]) for v in vectors])[key]


class Ties(_Scaled):
    """θ = θ₀ + λ · disjoint_merge(trim_k(τ₁..τ_K)); the trimming rule of adamerge/merging/ties.py, with n counted
    as ``trim_count`` says ('image_encoder': the official AdaMerging code; 'tower': FusionBench) over the whole
    vector, or per tensor (``trim_scope='tensor'``, mergekit; ``trim_rule='exact_k'``: its exact-k trim). Merging
    weights alone (model directories), n counts every floating-point tensor given."""

    def __init__(self, keep: float = 0.2, merge: str = "sum", lam: float = 0.3,
                 lam_grid: Sequence[float] | None = None, trim_count: str = "image_encoder",
                 zero_sign: str = "majority", trim_scope: str = "vector", trim_rule: str = "official",
                 label: str | None = None):
        super().__init__(lam, lam_grid)
        self.keep, self.merge_function = check_keep(keep), merge
        if merge not in MERGE_FUNCTIONS:
            raise ValueError(f"unknown TIES merge function {merge!r}; valid: {', '.join(MERGE_FUNCTIONS)}")
        if trim_count not in TRIM_COUNTS:
            raise ValueError(f"unknown TIES trim_count {trim_count!r}; valid: {', '.join(TRIM_COUNTS)}")
        check_trim(trim_scope, trim_rule)
        self.trim_count, self.zero_sign = trim_count, check_zero_sign(zero_sign)
        self.trim_scope, self.trim_rule = trim_scope, trim_rule
        self.label = "Ties" if label is None else label

    def direction(self, ctx: MergeContext) -> StateDict:
        return ties_vector(ctx.vectors, keep=self.keep, merge=self.merge_function, trim_scope=self.trim_scope,
                           trim_rule=self.trim_rule, **ctx.ties_rule(self.trim_count, self.zero_sign))

    def direction_by_key(self, vectors, keys, seed):
        return ties_directions(vectors, self.keep, self.merge_function, zero_sign=self.zero_sign,
                               trim_scope=self.trim_scope, trim_rule=self.trim_rule, keys=keys)
