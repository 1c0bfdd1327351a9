"""Unlabelled test batches of every task, each step: the data AdaMerging adapts on."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import CombinedLoader

from adamerge.adaptation.batches import StepIndexedBatches
from adamerge.data.task import Task


class UnlabelledTasksDataModule(L.LightningDataModule):
    """Per step a dict ``{task: (images, labels)}`` with ``batches_per_task × batch_size`` images each.

    Labels travel along only so that accuracy can be logged beside entropy (entropy collapse shows
    up as falling entropy with falling accuracy); the loss never sees them. Batches are indexed by
    the trainer's step, so a resumed run continues exactly where it stopped and each DDP rank takes
    its slice of the same global batch.
    """

    def __init__(self, tasks: list[Task], batch_size: int = 16, batches_per_task: int = 1, split: str = "test",
                 seed: int = 0):
        super().__init__()
        if batch_size < 1 or batches_per_task < 1:
            raise ValueError(f"batch_size and batches_per_task must be ≥ 1, got {batch_size}, {batches_per_task}")
        self.tasks, self.split, self.seed = tasks, split, seed
        self.global_batch = batch_size * batches_per_task

    def train_dataloader(self) -> CombinedLoader:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0  # already restored when resuming
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        streams = {task.name: StepIndexedBatches(task.split(self.split), self.global_batch, self.seed * 131 + i,
                                                 start, rank, world)
                   for i, task in enumerate(self.tasks)}
        return CombinedLoader(streams, mode="max_size_cycle")
