"""AdaMerging as a LightningModule: λ trained by entropy minimisation on unlabelled test batches."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import lightning as L
import torch
from torch.func import functional_call

from adamerge.adaptation.checkpointing import IDENTITY_KEY
from adamerge.adaptation.coefficient_file import save_coefficients
from adamerge.merging import MergeCoefficients, StackedTaskVectors, entropy_loss
from adamerge.merging.entropy import check_entropy_kind
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
                 trimming: dict | None = None, batches_per_task: int = 1,
                 entropy: str = "exact", identity: dict | None = None):
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
        self.trimming = trimming
        # The official loss is Σ over a task's batches of each batch's mean entropy: with equal batches that is
        # batches_per_task × the mean over all its images (the same under Adam, twice the step under SGD).
        self.batches_per_task, self.entropy = int(batches_per_task), check_entropy_kind(entropy)
        self.identity = identity  # what λ means (tasks, tensors, granularity, trimming): stored in checkpoints
        self._last_good = self.coefficients.raw.detach().clone()
        self._log_now = True
        # Manual optimisation: per_task mode needs several backward passes per step (see backward_entropy).
        self.automatic_optimization = False

    def head(self, i: int) -> torch.Tensor:
        return getattr(self, f"head_{i}")

    def merged_params(self) -> dict[str, torch.Tensor]:
        return self.stacked.merge(self.coefficients())

    def backward_entropy(self, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Σₖ Σ_batches H(task k) for one step, with its gradient accumulated into λ; returns the (detached) loss.

        ``concat``: all tasks' images through the merged encoder in one pass, one backward.
        ``per_task``: the merged weights become detached leaves; each task runs forward and backward
        alone (its activations freed before the next task), and one final backward carries the
        accumulated weight gradients through the merge into λ — peak memory is one task's, and the
        merge graph is traversed once.
        """
        merged = self.merged_params()
        entropies = {}
        if self.forward_mode == "concat":
            images = [batch[name][0] for name in self.task_names]
            feats = functional_call(self.visual, merged, (torch.cat(images),)).split([len(x) for x in images])
            total = 0.0
            for i, (name, f) in enumerate(zip(self.task_names, feats)):
                out = logits(f, self.head(i))
                entropies[name] = (entropy_loss(out, self.entropy), out)
                total = total + self.batches_per_task * entropies[name][0]
            self.manual_backward(total)
        else:
            leaves = {k: v.detach().requires_grad_() for k, v in merged.items()}
            for i, name in enumerate(self.task_names):
                out = logits(functional_call(self.visual, leaves, (batch[name][0],)), self.head(i))
                h = entropy_loss(out, self.entropy)
                self.manual_backward(self.batches_per_task * h)
                entropies[name] = (h.detach(), out.detach())
            keys = [k for k in merged if leaves[k].grad is not None]
            torch.autograd.backward([merged[k] for k in keys], [leaves[k].grad for k in keys])
        total = self.batches_per_task * torch.stack([h.detach() for h, _ in entropies.values()]).sum()
        if self._log_now:
            metrics = {}
            for name, (h, out) in entropies.items():
                metrics[f"entropy/{name}"] = h.detach()
                metrics[f"batch_acc/{name}"] = (out.argmax(-1) == batch[name][1]).float().mean()
            self.log_dict(metrics, batch_size=1)
        return total

    def _logging_step(self) -> bool:
        """Metrics only on the steps the loggers write (Lightning's rule: step + 1 divisible by
        ``log_every_n_steps``): ~20 ``self.log`` calls a step cost a third of a small model's step."""
        trainer = self._trainer
        if trainer is None:
            return False
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        return (self.global_step + 1) % every == 0

    def training_step(self, batch, batch_idx):
        if isinstance(batch, tuple):  # CombinedLoader yields (batch, batch_idx, dataloader_idx)
            batch = batch[0]
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self._log_now = self._logging_step()  # before the step moves global_step
        total = self.backward_entropy(batch)
        self._guard(total)  # before the step: λ is still the last good value
        optimizer.step()
        self.log("loss", total, prog_bar=True, batch_size=1)
        if self._log_now:
            lam = self.coefficients().detach()
            self.log_dict({"lr": float(optimizer.optimizer.param_groups[0]["lr"]), "lambda/mean": lam.mean(),
                           "lambda/min": lam.min(), "lambda/max": lam.max(),
                           "lambda/at_bounds": float(self.coefficients.at_bounds())}, batch_size=1)
        return total

    def _guard(self, loss: torch.Tensor) -> None:
        """Stop at the first non-finite loss, gradient or λ, saving the last coefficients that were finite."""
        grad = self.coefficients.raw.grad
        parts = [torch.isfinite(loss).all(), torch.isfinite(self.coefficients.raw).all()]
        if grad is not None:
            parts.append(torch.isfinite(grad).all())
        flags = torch.stack(parts).tolist()  # one host sync per step, not three (it stalls a GPU's queue)
        if all(flags):
            self._last_good = self.coefficients.raw.detach().clone()
            return
        step = self.global_step
        what = [name for name, ok in zip(("loss", "coefficients", "gradient of the coefficients"), flags) if not ok]
        where = ""
        if self.last_good_path is not None and self.trainer.is_global_zero and torch.isfinite(self._last_good).all():
            with torch.no_grad():
                lam = self.coefficients.values(self._last_good)
            save_coefficients(self.last_good_path, lam, granularity=self.coefficients.granularity,
                              tasks=self.task_names, layers=self.stacked.keys, method=self.method,
                              trimming=self.trimming, step=step)
            where = f"; the last finite coefficients (before step {step}) are in {self.last_good_path}"
        advice = ("Lower the learning rate (optimizer.lr) or keep the clamp (method.clamp)" if "loss" not in what else
                  "The merged model's predictions overflowed: check the inputs (checkpoints, heads, images), "
                  "lower the learning rate (optimizer.lr) or keep the clamp (method.clamp)")
        raise NonFiniteLossError(f"non-finite {' and '.join(what)} at step {step} (loss={float(loss.reshape(-1)[0])})"
                                 f"{where}. {advice}.")

    def configure_optimizers(self):
        return self.optimizer_factory(self.coefficients.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only λ is state: the backbone and task vectors are inputs that every run reloads.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("coefficients.")}
        if self.identity is not None:
            checkpoint[IDENTITY_KEY] = self.identity

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "coefficients.raw" not in state_dict:
            raise KeyError(f"checkpoint holds no merge coefficients (keys: {sorted(state_dict)[:5]})")
        return self.coefficients.load_state_dict({"raw": state_dict["coefficients.raw"]}, strict=True)
