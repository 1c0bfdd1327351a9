"""RegMean (Jin et al., ICLR 2023) of the fine-tuned vision towers.

Each fine-tuned tower k runs on task k's unlabelled images; forward hooks record the mean input Gram
Gₖ of every linear map (attention in_proj and out_proj, MLP c_fc and c_proj, the final ``proj``).
Then Wᵀ = (Σₖ G̃ₖ)⁻¹ Σₖ G̃ₖ Wₖᵀ per linear map and the average elsewhere
(:func:`adamerge.merging.regmean_merge`).
"""

from __future__ import annotations

import copy

import torch

from adamerge.merging.regmean import OPEN_CLIP_INPUT_MAJOR, collect_input_grams, regmean_merge
from adamerge.methods.base import MergeContext, MergeResult, Method
from adamerge.methods.unlabelled import unlabelled_images


class RegMean(Method):
    def __init__(self, alpha: float = 0.9, split: str = "test", num_examples: int = 64, batch_size: int = 16,
                 label: str = "RegMean"):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"method.alpha (RegMean's off-diagonal ratio) must be in [0, 1], got {alpha}")
        self.alpha, self.split = float(alpha), split
        self.num_examples, self.batch_size, self.label = int(num_examples), int(batch_size), label

    def grams(self, ctx: MergeContext, index: int) -> dict[str, torch.Tensor]:
        """Input Grams of task ``index``'s fine-tuned tower on its own images (a copy: ctx's model is untouched)."""
        task = ctx.tasks[index]
        tower = copy.deepcopy(ctx.backbone.visual)
        tower.load_state_dict(ctx.finetuned[task.name])
        tower.to(ctx.device)
        seed = ctx.seed * 1_000_003 + index
        batches = unlabelled_images(task, self.split, self.num_examples, self.batch_size, seed, ctx.device)
        return {k: v.cpu() for k, v in collect_input_grams(tower, batches).items()}

    def run(self, ctx: MergeContext) -> MergeResult:
        names = ctx.task_names
        grams = [self.grams(ctx, i) for i in range(len(names))]
        params = regmean_merge([ctx.finetuned[n] for n in names], grams, self.alpha, input_major=OPEN_CLIP_INPUT_MAJOR)
        return MergeResult(params=params, extra={"regmean_layers": len(grams[0]), "alpha": self.alpha,
                                                 "examples_per_task": self.num_examples, "split": self.split})
