"""AdaMerging as a LightningModule: λ trained by entropy minimisation on unlabelled test batches.

The module owns the merge coefficients (its only trainable parameters, made by the :class:`CoefficientSpec`);
the vision tower, task vectors and heads are frozen inputs, and checkpoints hold λ, the optimiser state,
what λ means and the metrics logged so far. The step itself is :func:`~adamerge.adaptation.step.entropy_step`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import lightning as L
import torch

from adamerge.adaptation.checkpointing import IDENTITY_KEY
from adamerge.adaptation.guard import NonFiniteGuard
from adamerge.adaptation.spec import CoefficientSpec
from adamerge.adaptation.step import FORWARD_MODES, entropy_step
from adamerge.merging import StackedTaskVectors
from adamerge.merging.entropy import check_entropy_kind
from adamerge.plots.layers import short_layer_name, tracked_layers

METRICS_FILE = "adaptation_metrics.csv"  # in the trainer's root folder (the run folder): what curves.png is drawn from
HISTORY_KEY = "adamerge_metric_history"  # the logged rows so far, in every checkpoint: a resumed run's log is whole


class AdaMergingModule(L.LightningModule):
    def __init__(self, visual: torch.nn.Module, stacked: StackedTaskVectors, heads: Mapping[str, torch.Tensor],
                 optimizer: Callable, spec: CoefficientSpec | None = None, forward_mode: str = "concat",
                 batches_per_task: int = 1, entropy: str = "exact", last_good_path: str | Path | None = None):
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"unknown forward_mode {forward_mode!r}; valid: {', '.join(FORWARD_MODES)}")
        missing = [t for t in stacked.task_names if t not in heads]
        if missing:
            raise ValueError(f"no zero-shot head for task(s) {missing}; heads exist for {sorted(heads)}")
        self.spec = spec or CoefficientSpec(tuple(stacked.task_names), tuple(stacked.keys))
        if list(self.spec.tasks) != list(stacked.task_names) or list(self.spec.layers) != list(stacked.keys):
            raise ValueError("the coefficient spec's tasks/tensors differ from the stacked task vectors'")
        self.visual = visual.requires_grad_(False).eval()
        self.stacked = stacked
        self.task_names = list(stacked.task_names)
        for i, name in enumerate(self.task_names):
            self.register_buffer(f"head_{i}", heads[name].detach().clone(), persistent=False)
        self.coefficients = self.spec.create()
        self.optimizer_factory, self.forward_mode = optimizer, forward_mode
        # The official loss is Σ over a task's batches of each batch's mean entropy: with equal batches that is
        # batches_per_task × the mean over all its images (the same under Adam, twice the step under SGD).
        self.batches_per_task, self.entropy = int(batches_per_task), check_entropy_kind(entropy)
        self.last_good_path = last_good_path
        self.last_loss = torch.zeros(())
        # Every logged row, whatever loggers are configured (none, W&B, TensorBoard): curves.png needs no CSV logger.
        self.history: list[dict[str, float]] = []
        self.tracked = ([] if self.spec.granularity == "task" else
                        [(short_layer_name(k), self.spec.layers.index(k)) for k in tracked_layers(self.spec.layers)])
        # Manual optimisation: per_task mode needs several backward passes per step (see entropy_step).
        self.automatic_optimization = False

    def head(self, i: int) -> torch.Tensor:
        return getattr(self, f"head_{i}")

    def training_step(self, batch, batch_idx):
        if isinstance(batch, tuple):  # CombinedLoader yields (batch, batch_idx, dataloader_idx)
            batch = batch[0]
        optimizer = self.optimizers()
        optimizer.zero_grad()
        log_now, step = self._logging_step(), self.global_step  # before the step moves global_step
        images = [batch[name][0] for name in self.task_names]
        lam = self.coefficients()
        self.last_loss, entropies, outs = entropy_step(
            self.visual, self.stacked, lam, images, [self.head(i) for i in range(len(images))],
            forward_mode=self.forward_mode, batches_per_task=self.batches_per_task, entropy=self.entropy,
            backward=self.manual_backward)
        optimizer.step()  # NonFiniteGuard checks loss, λ and its gradient first
        self.log("loss", self.last_loss, prog_bar=True, batch_size=1)
        if log_now:
            self.log_metrics(batch, entropies, outs, lam.detach(), optimizer, step)
        return self.last_loss

    def log_metrics(self, batch, entropies, outs, lam, optimizer, step: int) -> None:
        """Per task: entropy (nats), batch accuracy in percent (labels only ever reach this line) and the λ that
        gave them — ``lambda/<task>`` task-wise; layer-wise ``lambda/<task>/mean`` over tensors and
        ``lambda/<task>/<tensor>`` for the first, middle and last block's attention weight —, then lr and λ's
        spread. Step 0's row holds the initial λ."""
        lam = lam.float()
        metrics = {}
        for i, (name, h, out) in enumerate(zip(self.task_names, entropies, outs)):
            metrics[f"entropy/{name}"] = h.detach().float()
            metrics[f"batch_acc/{name}"] = 100 * (out.argmax(-1) == batch[name][1]).float().mean()
            if not self.tracked:
                metrics[f"lambda/{name}"] = lam[i, 0]
            else:
                metrics[f"lambda/{name}/mean"] = lam[i].mean()
                metrics.update({f"lambda/{name}/{label}": lam[i, j] for label, j in self.tracked})
        metrics.update({"lambda/mean": lam.mean(), "lambda/min": lam.min(), "lambda/max": lam.max()})
        metrics = dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))  # one host sync for all
        metrics.update({"lr": float(optimizer.optimizer.param_groups[0]["lr"]),
                        "lambda/at_bounds": float(self.coefficients.at_bounds())})
        self.log_dict(metrics, batch_size=1)
        self.history.append({"step": step, **metrics})

    def _logging_step(self) -> bool:
        """Metrics only on the steps the loggers write (Lightning's rule: step + 1 divisible by
        ``log_every_n_steps``): ~20 ``self.log`` calls a step cost a third of a small model's step."""
        trainer = self._trainer
        if trainer is None:
            return False
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        return (self.global_step + 1) % every == 0

    def configure_optimizers(self):
        return self.optimizer_factory(self.coefficients.parameters())

    def configure_callbacks(self):
        return [NonFiniteGuard(self.last_good_path)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only λ is state: the backbone and task vectors are inputs that every run reloads.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("coefficients.")}
        checkpoint[IDENTITY_KEY] = self.spec.identity()
        checkpoint[HISTORY_KEY] = [dict(row) for row in self.history]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Rows past the checkpoint's step were logged before an interruption and are logged again after it.
        self.history = [row for row in checkpoint.get(HISTORY_KEY, []) if row["step"] < checkpoint.get("global_step", 0)]

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero and self.history:
            write_metric_history(self.history, Path(self.trainer.default_root_dir) / METRICS_FILE)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "coefficients.raw" not in state_dict:
            raise KeyError(f"checkpoint holds no merge coefficients (keys: {sorted(state_dict)[:5]})")
        return self.coefficients.load_state_dict({"raw": state_dict["coefficients.raw"]}, strict=True)


def write_metric_history(rows: list[dict[str, float]], path: Path) -> Path:
    """The logged rows as CSV (``step`` and one column per metric, as Lightning's CSVLogger writes them)."""
    import csv

    columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
