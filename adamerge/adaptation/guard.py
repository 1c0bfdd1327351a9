"""Stop an adaptation at the first non-finite value, keeping the last coefficients that were finite.

A Lightning callback: it sees λ's gradient after the backward and before the optimiser applies it, so the saved
λ is the one that produced the last finite step, and a NaN never reaches the coefficients file.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class NonFiniteLossError(FloatingPointError):
    """The loss, λ or its gradient stopped being finite; the message says which and where the last finite λ is."""


class NonFiniteGuard(L.Callback):
    def __init__(self, last_good_path: str | Path | None = None):
        self.last_good_path = Path(last_good_path) if last_good_path else None
        self._last_good: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_good = pl_module.coefficients.raw.detach().clone()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        raw, loss = pl_module.coefficients.raw, pl_module.last_loss
        parts = [torch.isfinite(loss).all(), torch.isfinite(raw).all()]
        if raw.grad is not None:
            parts.append(torch.isfinite(raw.grad).all())
        flags = torch.stack(parts).tolist()  # one host sync per step, not three (it stalls a GPU's queue)
        if all(flags):
            self._last_good = raw.detach().clone()
            return
        step = trainer.global_step
        what = [name for name, ok in zip(("loss", "coefficients", "gradient of the coefficients"), flags) if not ok]
        where = ""
        good = self._last_good
        if self.last_good_path is not None and trainer.is_global_zero and good is not None and torch.isfinite(good).all():
            with torch.no_grad():
                pl_module.spec.save(self.last_good_path, pl_module.coefficients.values(good), step=step)
            where = f"; the last finite coefficients (before step {step}) are in {self.last_good_path}"
        advice = ("Lower the learning rate (optimizer.lr) or keep the clamp (method.clamp)" if "loss" not in what else
                  "The merged model's predictions overflowed: check the inputs (checkpoints, heads, images), "
                  "lower the learning rate (optimizer.lr) or keep the clamp (method.clamp)")
        raise NonFiniteLossError(f"non-finite {' and '.join(what)} at step {step} (loss={float(loss.reshape(-1)[0])})"
                                 f"{where}. {advice}.")
