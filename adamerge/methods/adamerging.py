"""AdaMerging (Yang et al., ICLR 2024): learn λ by entropy minimisation on unlabelled test data.

Task-wise: θ = θ₀ + Σₖ λₖ τₖ. Layer-wise: θˡ = θ₀ˡ + Σₖ λₖˡ τₖˡ for every tensor l. "++": the same on
TIES-trimmed, sign-agreeing task vectors kept separate per task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from adamerge.adaptation.step import FORWARD_MODES
from adamerge.merging import StackedTaskVectors, mergeable_keys
from adamerge.merging.coefficients import check_coefficient_spec
from adamerge.merging.entropy import check_entropy_kind
from adamerge.merging.stacked import resolve_dtype
from adamerge.merging.ties import check_keep, check_zero_sign
from adamerge.methods.base import TRIM_COUNTS, MergeContext, MergeResult, Method, require_label

if TYPE_CHECKING:
    from adamerge.adaptation.spec import CoefficientSpec

class AdaptationOutOfMemory(RuntimeError):
    """Out of memory during adaptation, with the settings that bound memory spelled out."""


class AdaMerging(Method):
    def __init__(self, optimizer: Callable, granularity: str = "layer", init: float = 0.3,
                 clamp: tuple[float, float] | None = (0.0, 1.0), ties_keep: float | None = None,
                 ties_count: str = "image_encoder", ties_zero_sign: str = "majority",
                 batch_size: int = 16, batches_per_task: int = 1, forward_mode: str = "concat",
                 coefficients: str | None = None, label: str | None = None, vector_dtype: str | None = None,
                 entropy: str = "exact"):
        self.optimizer, self.granularity = optimizer, granularity
        self.init, self.clamp = check_coefficient_spec(granularity, init, clamp)
        self.ties_keep = check_keep(ties_keep) if ties_keep is not None else None
        if ties_count not in TRIM_COUNTS:
            raise ValueError(f"unknown TIES trim count method.ties_count={ties_count!r}; valid: {', '.join(TRIM_COUNTS)}")
        self.ties_count, self.ties_zero_sign = ties_count, check_zero_sign(ties_zero_sign)
        for key, value in (("batch_size", batch_size), ("batches_per_task", batches_per_task)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"method.{key}={value!r}: must be an integer ≥ 1")
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"unknown adaptation.forward_mode {forward_mode!r}; valid: {', '.join(FORWARD_MODES)}")
        self.batch_size, self.batches_per_task, self.forward_mode = batch_size, batches_per_task, forward_mode
        self.coefficients_file = coefficients
        self.entropy = check_entropy_kind(entropy)
        self.vector_dtype = resolve_dtype(vector_dtype)  # unknown names fail here, before loading anything
        trimmed = self.ties_keep is not None
        self.label = "AdaMerging" if label is None else require_label(label, {
            "it says task-wise, λ is layer-wise": "Task-wise" in label and granularity != "task",
            "it says layer-wise, λ is task-wise": "Layer-wise" in label and granularity != "layer",
            "it says ++, the task vectors are not TIES-trimmed": "++" in label and not trimmed,
            "the task vectors are TIES-trimmed (AdaMerging++), it lacks ++": trimmed and "AdaMerging" in label
                                                                            and "++" not in label,
        }, "Choose the matching preset (method=adamerging_taskwise|layerwise[_plus]) or set method.label.")

    @property
    def trimming(self) -> dict | None:
        """What made the task vectors λ multiplies (recorded with λ, compared when λ is re-used)."""
        if self.ties_keep is None:
            return None
        return {"keep": self.ties_keep, "count": self.ties_count, "zero_sign": self.ties_zero_sign}

    def spec(self, ctx: MergeContext) -> CoefficientSpec:
        """What λ is in this run (tasks, tensors, granularity, init, clamp, trimming): it creates λ, writes it
        with its meaning, and refuses coefficient files and checkpoints that mean something else."""
        from adamerge.adaptation.spec import CoefficientSpec

        return CoefficientSpec(tuple(ctx.task_names), tuple(mergeable_keys(ctx.pretrained)), self.granularity,
                               self.init, self.clamp, self.trimming, self.label)

    def identity(self, ctx: MergeContext) -> dict:
        return self.spec(ctx).identity()

    def run(self, ctx: MergeContext) -> MergeResult:
        # Lightning loads here, not at import: the registry of weight-only methods (adamerge-merge-models) imports
        # every method class and should not pay seconds of Lightning import for one it never runs
        from adamerge.adaptation.checkpointing import InterruptCheckpoint, RunInterrupted
        from adamerge.adaptation.datamodule import UnlabelledTasksDataModule
        from adamerge.adaptation.module import AdaMergingModule
        from adamerge.plots.coefficients import coefficient_heatmap

        names, spec = ctx.task_names, self.spec(ctx)
        if ctx.ckpt_path and not self.coefficients_file:  # refuse a foreign checkpoint before building anything
            spec.check_resume(ctx.ckpt_path)
        rule = ctx.ties_rule(self.ties_count, self.ties_zero_sign) if self.ties_keep is not None else None
        stacked = StackedTaskVectors.from_state_dicts(ctx.pretrained, [ctx.finetuned[n] for n in names], names,
                                                      ties_keep=self.ties_keep, dtype=self.vector_dtype, ties_rule=rule)
        if self.coefficients_file:  # evaluate learned coefficients without training
            lam = spec.load(self.coefficients_file)
            return MergeResult(params=stacked.merge(lam), extra={"coefficients_loaded_from": str(self.coefficients_file)})
        if ctx.make_trainer is None:
            raise ValueError("AdaMerging trains its coefficients and needs a trainer config (trainer=...)")
        module = AdaMergingModule(ctx.backbone.visual, stacked, ctx.heads, self.optimizer, spec, self.forward_mode,
                                  batches_per_task=self.batches_per_task, entropy=self.entropy,
                                  last_good_path=ctx.run_dir / "coefficients.last_good.safetensors")
        data = UnlabelledTasksDataModule(ctx.tasks, self.batch_size, self.batches_per_task, "test", ctx.seed)
        trainer = ctx.make_trainer()
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ctx.ckpt_path)
        except SystemExit as err:  # Lightning turns Ctrl-C (after on_exception) and SIGTERM into SystemExit
            saved = [c.saved for c in trainer.callbacks if isinstance(c, InterruptCheckpoint) and c.saved]
            resume = (f"coefficients and optimiser state at that step are in {saved[0]}; resume with the same "
                      f"overrides plus ckpt_path={saved[0]}") if saved else "no checkpoint was written (step 0)"
            raise RunInterrupted(f"{self.label} interrupted at step {trainer.global_step} of {trainer.max_steps}: "
                                 f"{resume}. No result is recorded for this run.") from err
        except torch.OutOfMemoryError as err:
            raise AdaptationOutOfMemory(
                f"out of memory while adapting {len(names)} tasks × {self.batch_size * self.batches_per_task} images "
                f"(forward_mode={self.forward_mode}). Try adaptation.forward_mode=per_task (one task's activations at a "
                f"time), a smaller method.batch_size / method.batches_per_task, or trainer=ddp to spread the batch "
                f"over more devices. Progress so far is in {ctx.run_dir / 'checkpoints'} (resume with ckpt_path=…).") from err
        module.cpu()
        with torch.no_grad():
            lam = module.coefficients().detach().clone()
        path = spec.save(ctx.run_dir / "coefficients.safetensors", lam, step=trainer.global_step)
        heatmap = coefficient_heatmap(lam, names, stacked.keys, ctx.run_dir / "coefficients.png", title=self.label,
                                      clamp=self.clamp)
        extra = {"coefficients_file": str(path),
                 "task_vector_bytes": stacked.nbytes(),
                 "coefficients_at_clamp": module.coefficients.at_bounds(),
                 "coefficients_total": module.coefficients.raw.numel(),
                 "lambda_mean_per_task": dict(zip(names, lam.mean(1).tolist()))}
        with torch.no_grad():
            params = stacked.merge(lam)
        return MergeResult(params=params, extra=extra, steps=trainer.global_step,
                           figures={"coefficients": str(heatmap)})
