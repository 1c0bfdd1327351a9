"""Rows of the paper's table that need no coefficient: zero-shot, individual models, weight averaging."""

from __future__ import annotations

from adamerge.merging import weight_average
from adamerge.methods.base import MergeContext, MergeResult, Method, TensorMerge, one


class Pretrained(Method):
    """θ₀ with each task's zero-shot head: the floor every merge should beat."""

    def __init__(self, label: str = "Pretrained"):
        self.label = label

    def run(self, ctx: MergeContext) -> MergeResult:
        return MergeResult(params=dict(ctx.pretrained))


class Individual(Method):
    """Each task evaluated with its own fine-tuned model: the ceiling (K models, not one)."""

    def __init__(self, label: str = "Individual"):
        self.label = label

    def run(self, ctx: MergeContext) -> MergeResult:
        return MergeResult(per_task={n: ctx.finetuned[n] for n in ctx.task_names})


class IndividualBest(Method):
    """Each task evaluated with its best fine-tuning checkpoint by validation accuracy (the pool's first
    candidate), not the final one: the baseline Extrapolation Merging's per-task claim is measured against."""

    def __init__(self, label: str = "Individual (best checkpoint)"):
        self.label = label

    def run(self, ctx: MergeContext) -> MergeResult:
        if ctx.pool is None or not hasattr(ctx.pool, "load_candidates"):
            raise ValueError("Individual (best checkpoint) needs a pool that lists each task's checkpoints best first "
                             "(pool.candidates.<task>=[best.safetensors, …]); this context has none")
        return MergeResult(per_task={n: ctx.pool.load_candidates(n, ctx.pretrained, need=1)[0] for n in ctx.task_names})


class WeightAveraging(Method):
    """θ = (1/K) Σₖ θₖ."""

    def __init__(self, label: str = "Weight Averaging"):
        self.label = label

    def run(self, ctx: MergeContext) -> MergeResult:
        return MergeResult(params=weight_average([ctx.finetuned[n] for n in ctx.task_names]))

    def weights_merger(self, base, models, seed: int = 0) -> TensorMerge:
        self.check_models(len(models))
        return lambda key: weight_average([one(key, m[key]) for m in models])[key]
