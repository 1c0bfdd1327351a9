"""Step-indexed unlabelled batches: the batch of step s is a pure function of (seed, task, s).

Why not a shuffled DataLoader: a resumed run must see exactly the batches the uninterrupted run
would have seen, and a DDP run exactly the single-device global batch split across ranks. Both hold
when batches are indexed by step — each epoch is a seeded permutation, and a rank takes its slice.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from adamerge.data.task import TensorImages


class StepIndexedBatches:
    """Infinite stream of ``(images, labels)`` batches of one dataset, starting at ``start_step``."""

    def __init__(self, dataset: Dataset, global_batch: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"the per-task batch ({global_batch} images) must split evenly over {world_size} "
                             f"devices; change method.batch_size or trainer.devices")
        self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.size = len(dataset)
        if self.size == 0:
            raise ValueError("cannot adapt on an empty dataset")
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=gen), epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        local = self.global_batch // self.world_size
        start = step * self.global_batch + self.rank * local
        out = []
        for p in range(start, start + local):
            out.append(self.permutation(p // self.size)[p % self.size])
        return torch.stack(out)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(step)
        if isinstance(self.dataset, TensorImages):
            return self.dataset.images[idx], self.dataset.labels[idx]
        items = [self.dataset[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1
