"""Fisher merging (Matena & Raffel, NeurIPS 2022) of the fine-tuned vision towers.

Fₖ is the diagonal Fisher of θₖ under task k's frozen zero-shot head, on unlabelled images of task k;
then θ = Σₖ Fₖ θₖ / Σₖ Fₖ entry by entry (:func:`adamerge.merging.fisher_merge`).
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call

from adamerge.merging import mergeable_keys
from adamerge.merging.fisher import FALLBACKS, FISHER_MODES, diagonal_fisher, fisher_merge
from adamerge.methods.base import MergeContext, MergeResult, Method
from adamerge.methods.unlabelled import unlabelled_images
from adamerge.models.heads import logits
from adamerge.runtime.progress import progress


class FisherMerging(Method):
    def __init__(self, split: str = "test", num_examples: int = 64, batch_size: int = 16, mode: str = "expected",
                 epsilon: float = 1e-6, normalize: bool = False, fallback: str = "average", chunk_size: int = 16,
                 label: str = "Fisher Merging"):
        if mode not in FISHER_MODES:
            raise ValueError(f"unknown Fisher mode method.mode={mode!r}; valid: {', '.join(FISHER_MODES)}")
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown method.fallback={fallback!r}; valid: {', '.join(FALLBACKS)}")
        self.split, self.num_examples, self.batch_size = split, int(num_examples), int(batch_size)
        self.mode, self.epsilon, self.normalize, self.fallback = mode, float(epsilon), bool(normalize), fallback
        self.chunk_size, self.label = int(chunk_size), label

    def batches_per_task(self, ctx: MergeContext, index: int) -> int:
        return math.ceil(min(self.num_examples, len(ctx.tasks[index].split(self.split))) / self.batch_size)

    def fisher(self, ctx: MergeContext, index: int, bar=None) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of task ``index``'s fine-tuned tower on its own unlabelled images (on ctx.device);
        ``bar`` (a progress bar) advances by each batch."""
        task = ctx.tasks[index]
        visual = ctx.backbone.visual.to(ctx.device).eval()
        head = ctx.heads[task.name].to(ctx.device)
        theta = ctx.finetuned[task.name]
        params = {k: theta[k].to(ctx.device) for k in mergeable_keys(theta)}

        def log_probs(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(logits(functional_call(visual, p, (x,)), head), dim=-1)

        seed = ctx.seed * 1_000_003 + index
        batches = unlabelled_images(task, self.split, self.num_examples, self.batch_size, seed, ctx.device)
        if bar is not None:
            bar.set_postfix(task=task.name, refresh=False)
            batches = _counted(batches, bar)
        fisher = diagonal_fisher(log_probs, params, batches, self.mode, torch.Generator().manual_seed(seed),
                                 self.chunk_size)
        return {k: v.cpu() for k, v in fisher.items()}

    def run(self, ctx: MergeContext) -> MergeResult:
        names = ctx.task_names
        total = sum(self.batches_per_task(ctx, i) for i in range(len(names)))
        with progress(total=total, desc="Fisher", unit="batch") as bar:  # one bar over tasks × batches
            fishers = [self.fisher(ctx, i, bar) for i in range(len(names))]
        params = fisher_merge([ctx.finetuned[n] for n in names], fishers, epsilon=self.epsilon,
                              normalize=self.normalize, fallback=self.fallback, pretrained=ctx.pretrained)
        mass = {n: float(sum(f.sum() for f in fisher.values())) for n, fisher in zip(names, fishers)}
        return MergeResult(params=params, extra={"fisher_total_per_task": mass, "fisher_mode": self.mode,
                                                 "examples_per_task": self.num_examples, "split": self.split})


def _counted(batches, bar):
    """``batches``, advancing ``bar`` once each has been used (the Fisher pass of a batch is the slow part)."""
    for batch in batches:
        yield batch
        bar.update(1)
