"""Extrapolate each task's model, then merge across tasks with any other method.

ExPO (Zheng et al., arXiv 2404.16792): θₖ' = θₖ + α (θₖ − θ₀).
Extrapolation Merging (Lin et al., arXiv 2503.04834): θₖ' = β ExPO(θₖ¹, α) + (1 − β) ExPO(θₖ², α) for two
checkpoints of task k (the best two kept by fine-tuning), (α, β) chosen per task by a budgeted local search.

α (ExPO) or (α, β) is fixed or searched per task, on that task's validation accuracy (labels) or on the mean
prediction entropy of its unlabelled test images (no labels, AdaMerging's signal). The θₖ' then replace θₖ and
``merge`` — any method of ``conf/method/`` (task arithmetic, TIES, AdaMerging, …) — merges them across tasks.
The math lives in :mod:`adamerge.merging.extrapolation`, the search in :mod:`adamerge.search`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Callable, Mapping

import torch
from torch.func import functional_call

from adamerge.evaluation.accuracy import batches, accuracy
from adamerge.merging import entropy_loss
from adamerge.merging.extrapolation import expo, extrapolation_merge
from adamerge.merging.views import LazyState
from adamerge.methods.base import (MergeContext, MergeResult, Method, StateDict, TensorMerge, no_evaluation, one,
                                   require_label)
from adamerge.models.heads import logits
from adamerge.search import local_search

log = logging.getLogger(__name__)

OBJECTIVES = ("val", "entropy")


@torch.no_grad()
def mean_entropy(visual: torch.nn.Module, params: Mapping[str, torch.Tensor], head: torch.Tensor, dataset,
                 batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Mean prediction entropy of a tower (with ``params``) over ``dataset``'s images; labels are never read."""
    visual = visual.to(device).eval()
    params = {k: v.to(device) for k, v in params.items()}
    head = head.to(device)
    total, count = 0.0, 0
    for images, _ in batches(dataset, batch_size):
        out = logits(functional_call(visual, params, (images.to(device),)), head)
        total += float(entropy_loss(out)) * len(images)
        count += len(images)
    if count == 0:
        raise ValueError("cannot measure prediction entropy on an empty dataset")
    return total / count


def task_score(ctx: MergeContext, name: str, objective: str) -> Callable[[StateDict], float]:
    """Higher is better: task ``name``'s val accuracy, or minus the mean entropy on its unlabelled test images."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown search objective {objective!r}; valid: {', '.join(OBJECTIVES)} "
                         f"(val: labelled validation accuracy, entropy: unlabelled test images)")
    task = next(t for t in ctx.tasks if t.name == name)
    visual, head = ctx.backbone.visual, ctx.heads[name]
    if objective == "val":
        return lambda params: accuracy(visual, params, head, task, "val", ctx.eval_batch_size, ctx.device)
    test = task.split("test")
    return lambda params: -mean_entropy(visual, params, head, test, ctx.eval_batch_size, ctx.device)


class _ExtrapolateThenMerge(Method):
    """Per task: build θₖ' (fixed or searched point); then ``merge`` merges the θₖ' across tasks."""

    def __init__(self, merge: Method | None, objective: str | None, budget: int, min_step: float, label: str | None):
        if merge is not None and not isinstance(merge, Method):
            raise TypeError(
                f"method.merge must be a merge method config, got {merge!r}. Choose it as a config group: "
                f"method@method.merge=ties (not method.merge=ties); tune it with method.merge.<key>=…")
        if objective is not None and objective not in OBJECTIVES:
            raise ValueError(f"unknown search objective {objective!r}; valid: {', '.join(OBJECTIVES)} or null (fixed)")
        self.merge, self.objective, self.budget, self.min_step = merge, objective, int(budget), float(min_step)
        self.label = type(self).__name__ if label is None else require_label(
            label, self.misleading(label, objective),
            "Searched per task: method=expo_searched / extrapolation_merging; fixed: objective=null; or set method.label.")

    @staticmethod
    def misleading(label: str, objective: str | None) -> dict[str, bool]:  # pragma: no cover - interface
        raise NotImplementedError

    def model(self, ctx: MergeContext, name: str, point: Mapping[str, float]) -> StateDict:  # pragma: no cover
        raise NotImplementedError

    def fixed_point(self) -> dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError

    def search_space(self) -> tuple[dict, dict, dict]:  # pragma: no cover - interface: start, step, bounds
        raise NotImplementedError

    def prepare(self, ctx: MergeContext) -> None:
        """Load whatever the per-task models need (e.g. further checkpoints) before any search."""

    def fixed_at(self, point: Mapping[str, float]) -> "_ExtrapolateThenMerge":
        """A copy fixed at ``point`` (no search): what a search found, to evaluate or to write out."""
        fixed = copy.copy(self)
        fixed.objective = None
        fixed._set_point(dict(point))
        return fixed

    def _set_point(self, point: dict[str, float]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, ctx: MergeContext) -> MergeResult:
        self.prepare(ctx)
        models, chosen, searches = {}, {}, {}
        for name in ctx.task_names:
            if self.objective is None:
                point = self.fixed_point()
            else:
                score = task_score(ctx, name, self.objective)
                start, step, bounds = self.search_space()
                found = local_search(lambda p: score(self.model(ctx, name, p)), start, step, bounds,
                                     budget=self.budget, min_step=self.min_step, desc=f"{self.label}: {name}")
                point = found.best
                for warning in found.warnings:
                    log.warning("%s on %s: %s", self.label, name, warning)
                searches[name] = {"score": found.value, "evaluations": found.evaluations, "warnings": found.warnings,
                                  "history": [{**p, "score": v} for p, v in found.history]}
            models[name], chosen[name] = self.model(ctx, name, point), point
        if self.merge is None:  # the paper's own claim: each task's fine-tuned model improved, nothing merged
            inner = MergeResult(per_task=models)
        else:
            inner = self.merge.run(replace(ctx, finetuned=models))  # a new context: its task vectors are recomputed
        extra = dict(inner.extra)  # the inner method's record (λ, coefficients file, steps, …) stays top-level
        extra["merge_method"] = None if self.merge is None else self.merge.label
        extra["search_objective"] = self.objective or "fixed"
        for key in next(iter(chosen.values()), {}):
            extra[f"{key}_per_task"] = {name: point[key] for name, point in chosen.items()}
        if searches:
            extra["search"] = searches
        return MergeResult(params=inner.params, per_task=inner.per_task, extra=extra, steps=inner.steps,
                           figures=inner.figures)


class ExPO(_ExtrapolateThenMerge):
    """θₖ' = θₖ + α (θₖ − θ₀), then ``merge``. α fixed, or per task by local search (start ``alpha``).

    With task arithmetic inside and one fixed α this is task arithmetic with λ(1 + α); per-task α, or a
    non-linear inner method (TIES, AdaMerging), is where it differs.
    """

    @staticmethod
    def misleading(label, objective):
        return {"it says α per task, α is fixed": "α per task" in label and objective is None,
                "it names a fixed α, α is searched": "α=" in label and objective is not None}

    def __init__(self, merge: Method, alpha: float = 0.5, objective: str | None = None, step: float = 0.25,
                 bounds: tuple[float, float] = (0.0, 1.0), budget: int = 8, min_step: float = 0.05,
                 label: str | None = None):
        super().__init__(merge, objective, budget, min_step, label)
        self.alpha, self.step, self.bounds = float(alpha), float(step), tuple(float(b) for b in bounds)

    def fixed_point(self) -> dict[str, float]:
        return {"alpha": self.alpha}

    def _set_point(self, point):
        self.alpha = float(point["alpha"])

    def search_space(self):
        return {"alpha": self.alpha}, {"alpha": self.step}, {"alpha": self.bounds}

    def model(self, ctx: MergeContext, name: str, point: Mapping[str, float]) -> StateDict:
        return expo(ctx.finetuned[name], ctx.pretrained, point["alpha"])

    def weights_merger(self, base, models, seed: int = 0) -> TensorMerge:
        """One model: θ + α (θ − θ₀) itself. Several: each extrapolated, then ``merge`` across them."""
        no_evaluation(objective=self.objective)
        self.check_models(len(models))
        extrapolated = [LazyState(list(base), lambda key, m=m: expo(one(key, m[key]), one(key, base[key]),
                                                                    self.alpha)[key]) for m in models]
        if len(models) == 1:
            return extrapolated[0].__getitem__
        if self.merge is None:
            raise ValueError(f"{self.label} keeps each model apart (merge: null): give one model to extrapolate")
        return self.merge.weights_merger(base, extrapolated, seed)


class ExtrapolationMerging(_ExtrapolateThenMerge):
    """θₖ' = β ExPO(θₖ¹, α) + (1 − β) ExPO(θₖ², α) from the pool's two checkpoints of task k, then ``merge``.

    (α, β) per task by a local search from ``start`` (``objective``: val | entropy), or fixed at
    ``start`` (``objective=None``).
    """

    models_taken = (2, 2)  # merging weights alone: the two checkpoints of one fine-tuning run
    option_paths = {"alpha": "start.alpha", "beta": "start.beta"}  # adamerge-merge-models --alpha/--beta

    @staticmethod
    def misleading(label, objective):
        return {"it says fixed, (α, β) are searched": "fixed" in label and objective is not None,
                "it names a search, (α, β) are fixed": objective is None and ("(val)" in label or "(entropy)" in label)}

    def __init__(self, merge: Method, objective: str | None = "val", start: Mapping[str, float] | None = None,
                 step: Mapping[str, float] | None = None, bounds: Mapping[str, tuple[float, float]] | None = None,
                 budget: int = 12, min_step: float = 0.05, label: str | None = None):
        super().__init__(merge, objective, budget, min_step, label)
        self.start = {k: float(v) for k, v in (start or {"alpha": 0.0, "beta": 0.5}).items()}
        self.step = {k: float(v) for k, v in (step or {"alpha": 0.25, "beta": 0.25}).items()}
        self.bounds = {k: tuple(float(b) for b in v) for k, v in (bounds or {"alpha": (0.0, 1.0), "beta": (0.0, 1.0)}).items()}
        if set(self.start) != {"alpha", "beta"}:
            raise ValueError(f"method.start must give alpha and beta, got {sorted(self.start)}")
        self._candidates: dict[str, list[StateDict]] = {}

    def fixed_point(self) -> dict[str, float]:
        return dict(self.start)

    def _set_point(self, point):
        self.start = {"alpha": float(point["alpha"]), "beta": float(point["beta"])}

    def search_space(self):
        return self.start, self.step, self.bounds

    def prepare(self, ctx: MergeContext) -> None:
        if ctx.pool is None or not hasattr(ctx.pool, "load_candidates"):
            raise ValueError("Extrapolation Merging needs a checkpoint pool that lists two checkpoints per task "
                             "(pool.candidates.<task>=[a.safetensors,b.safetensors]); this context has none")
        self._candidates = {name: ctx.pool.load_candidates(name, ctx.pretrained, need=2) for name in ctx.task_names}

    def run(self, ctx: MergeContext) -> MergeResult:
        try:
            return super().run(ctx)
        finally:
            self._candidates = {}  # 2K checkpoints: not kept alive by the method object

    def model(self, ctx: MergeContext, name: str, point: Mapping[str, float]) -> StateDict:
        first, second = self._candidates[name]
        return extrapolation_merge(first, second, ctx.pretrained, point["alpha"], point["beta"])

    def weights_merger(self, base, models, seed: int = 0) -> TensorMerge:
        """Two checkpoints of one fine-tuning run, at the fixed point ``start``: β ExPO(θ¹, α) + (1 − β) ExPO(θ², α)."""
        no_evaluation(objective=self.objective)
        self.check_models(len(models))
        first, second = models
        alpha, beta = self.start["alpha"], self.start["beta"]
        return lambda key: extrapolation_merge(one(key, first[key]), one(key, second[key]), one(key, base[key]),
                                               alpha, beta)[key]
