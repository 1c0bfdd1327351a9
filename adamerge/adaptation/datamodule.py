"""Unlabelled test batches of every task, each step: the data AdaMerging adapts on."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from adamerge.data.task import Task


class UnlabelledTasksDataModule(L.LightningDataModule):
    """Per step a dict ``{task: (images, labels)}`` with ``batches_per_task × batch_size`` images each.

    Labels travel along only so that accuracy can be logged beside entropy (entropy collapse shows
    up as falling entropy with falling accuracy); the loss never sees them. Loaders are built once and
    cycle forever; under DDP, Lightning gives each rank its own shard of every task.
    """

    def __init__(self, tasks: list[Task], batch_size: int = 16, batches_per_task: int = 1, split: str = "test",
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1 or batches_per_task < 1:
            raise ValueError(f"batch_size and batches_per_task must be ≥ 1, got {batch_size}, {batches_per_task}")
        self.tasks, self.split, self.seed = tasks, split, seed
        self.batch_size, self.batches_per_task, self.num_workers = batch_size, batches_per_task, num_workers

    def train_dataloader(self) -> CombinedLoader:
        loaders = {}
        for i, task in enumerate(self.tasks):
            loaders[task.name] = DataLoader(
                task.split(self.split), batch_size=self.batch_size * self.batches_per_task, shuffle=True,
                drop_last=False, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(self.seed * 1000 + i))
        return CombinedLoader(loaders, mode="max_size_cycle")
