"""AdaMerging as a LightningModule: λ trained by entropy minimisation on unlabelled test batches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping

import lightning as L
import torch
from torch.func import functional_call

from adamerge.adaptation.coefficient_file import save_coefficients
from adamerge.merging import MergeCoefficients, StackedTaskVectors, entropy_loss
from adamerge.models.heads import logits

FORWARD_MODES = ("concat", "per_task")


class NonFiniteLossError(FloatingPointError):
    """The loss or the coefficients stopped being finite; the last good coefficients were saved."""


class AdaMergingModule(L.LightningModule):
    """Owns the merge coefficients (its only trainable parameters) and the entropy objective.

    The vision tower, task vectors and heads are frozen inputs; checkpoints hold coefficients and
    optimiser state only. ``forward_mode='concat'`` sends every task's images through the merged
    encoder in one pass (the encoder is shared; only heads differ); ``'per_task'`` runs one pass per task.
    """

    def __init__(self, visual: torch.nn.Module, stacked: StackedTaskVectors, heads: Mapping[str, torch.Tensor],
                 optimizer: Callable, granularity: str = "layer", init: float = 0.3,
                 clamp: tuple[float, float] | None = (0.0, 1.0), forward_mode: str = "concat",
                 last_good_path: str | Path | None = None, method: str = "adamerging",
                 ties_keep: float | None = None):
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"unknown forward_mode {forward_mode!r}; valid: {', '.join(FORWARD_MODES)}")
        missing = [t for t in stacked.task_names if t not in heads]
        if missing:
            raise ValueError(f"no zero-shot head for task(s) {missing}; heads exist for {sorted(heads)}")
        self.visual = visual.requires_grad_(False).eval()
        self.stacked = stacked
        self.task_names = list(stacked.task_names)
        for i, name in enumerate(self.task_names):
            self.register_buffer(f"head_{i}", heads[name].detach().clone(), persistent=False)
        self.coefficients = MergeCoefficients(stacked.num_tasks, stacked.num_layers, granularity, init, clamp)
        self.optimizer_factory, self.forward_mode, self.method = optimizer, forward_mode, method
        self.last_good_path = Path(last_good_path) if last_good_path else None
        self.ties_keep = ties_keep
        self._last_good = self.coefficients.raw.detach().clone()

    def head(self, i: int) -> torch.Tensor:
        return getattr(self, f"head_{i}")

    def merged_params(self) -> dict[str, torch.Tensor]:
        return self.stacked.merge(self.coefficients())

    def task_logits(self, params, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        images = [batch[name][0] for name in self.task_names]
        if self.forward_mode == "concat":
            feats = functional_call(self.visual, params, (torch.cat(images),)).split([len(x) for x in images])
        else:
            feats = [functional_call(self.visual, params, (x,)) for x in images]
        return [logits(f, self.head(i)) for i, f in enumerate(feats)]

    def training_step(self, batch, batch_idx):
        if isinstance(batch, tuple):  # CombinedLoader yields (batch, batch_idx, dataloader_idx)
            batch = batch[0]
        params = self.merged_params()
        total = 0.0
        for name, (_, labels), out in zip(self.task_names, (batch[n] for n in self.task_names),
                                          self.task_logits(params, batch)):
            h = entropy_loss(out)
            total = total + h
            self.log(f"entropy/{name}", h, on_step=True, prog_bar=False)
            self.log(f"batch_acc/{name}", (out.argmax(-1) == labels).float().mean(), on_step=True)
        self._guard(total)
        lam = self.coefficients().detach()
        self.log("loss", total, prog_bar=True)
        self.log_dict({"lambda/mean": lam.mean(), "lambda/min": lam.min(), "lambda/max": lam.max(),
                       "lambda/at_bounds": float(self.coefficients.at_bounds())})
        return total

    def _guard(self, loss: torch.Tensor) -> None:
        """Stop at the first non-finite loss or λ, saving the last coefficients that were finite."""
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(self.coefficients.raw).all())
        if finite:
            self._last_good = self.coefficients.raw.detach().clone()
            return
        step = self.global_step
        where = ""
        if self.last_good_path is not None and self.trainer.is_global_zero:
            lam = MergeCoefficients(self.stacked.num_tasks, self.stacked.num_layers, self.coefficients.granularity,
                                    clamp=self.coefficients.clamp)
            with torch.no_grad():
                lam.raw.copy_(self._last_good)
            save_coefficients(self.last_good_path, lam(), granularity=self.coefficients.granularity,
                              tasks=self.task_names, layers=self.stacked.keys, method=self.method,
                              ties_keep=self.ties_keep, step=step)
            where = f"; the last finite coefficients are in {self.last_good_path}"
        value = float(loss) if loss.numel() == 1 else math.nan
        raise NonFiniteLossError(f"non-finite {'loss' if not math.isfinite(value) else 'coefficients'} "
                                 f"at step {step} (loss={value}){where}. Lower the learning rate "
                                 f"(optimizer.lr) or keep the clamp (method.clamp).")

    def configure_optimizers(self):
        return self.optimizer_factory(self.coefficients.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only λ is state: the backbone and task vectors are inputs that every run reloads.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("coefficients.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "coefficients.raw" not in state_dict:
            raise KeyError(f"checkpoint holds no merge coefficients (keys: {sorted(state_dict)[:5]})")
        return self.coefficients.load_state_dict({"raw": state_dict["coefficients.raw"]}, strict=True)
