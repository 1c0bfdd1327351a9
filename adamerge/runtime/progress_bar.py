"""Lightning's progress bar, counting the optimiser steps of the whole run instead of batches of an epoch.

AdaMerging and step-capped fine-tuning run by ``max_steps`` with ``max_epochs=-1``: Lightning's own bars
then read ``Epoch 0/-2``, and after a ``ckpt_path=`` resume ``80/40`` (batches of the resumed epoch
against the rest of the run). :class:`StepProgressBar` shows ``AdaMerging: 80%|… | step 8/10 [ETA]``
— ``trainer.global_step`` of ``trainer.max_steps`` — with no epoch counter, and a resumed run starts
at the step it stopped at. It draws through :func:`adamerge.runtime.progress.progress`, so it follows
the same rules as every other bar (stderr, rank 0, ``ADAMERGE_PROGRESS=0``, calm off a terminal).
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import TQDMProgressBar

from adamerge.runtime.progress import progress


def run_steps(trainer) -> int | None:
    """The run's length in optimiser steps: ``max_steps``, else Lightning's estimate from the epochs."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return None if estimate is None or math.isinf(estimate) else int(estimate)


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run: ``<description>: step k/max_steps`` with an ETA and the logged metrics.

    ``refresh_rate`` (steps) throttles how often metrics are gathered; redraws are further limited in time
    by :func:`~adamerge.runtime.progress.progress`. Validation bars are Lightning's, drawn the same way.
    """

    def __init__(self, description: str = "training", refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate, leave=False)
        self.description = description

    def init_train_tqdm(self):
        trainer = self.trainer  # a resumed run starts at its step; its ETA counts the new steps only
        return progress(total=run_steps(trainer), initial=trainer.global_step, desc=self.description, unit="step",
                        disable=self.is_disabled, position=2 * self.process_position)

    def init_validation_tqdm(self):
        has_main_bar = self.trainer.state.fn != "validate"
        return progress(total=None, desc=self.validation_description, unit="batch", leave=not has_main_bar,
                        disable=self.is_disabled, position=2 * self.process_position + has_main_bar)

    def init_sanity_tqdm(self):
        return progress(total=None, desc=self.sanity_check_description, unit="batch", leave=False,
                        disable=self.is_disabled, position=2 * self.process_position)

    def on_train_epoch_start(self, trainer, *_):
        """Nothing: the bar spans the run, not an epoch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.disable:
            return
        if self._should_update(step, bar.total):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.update(step - bar.n)  # redraws no more often than the bar's minimum interval

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def on_validation_end(self, trainer, pl_module):
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if self._train_progress_bar is not None and trainer.state.fn == "fit":
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def on_exception(self, trainer, pl_module, exception):
        """Close the bar at the step reached, before the interrupt's messages (the resume command) are printed."""
        if self._train_progress_bar is not None:
            self._train_progress_bar.n = trainer.global_step
            self._train_progress_bar.close()

    def on_train_end(self, trainer, pl_module):
        bar = self.train_progress_bar
        if not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.n = trainer.global_step
        bar.close()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version is not progress
        return metrics
