"""Unlabelled images of one task for the data-based merges (Fisher merging, RegMean).

The labels are dropped here, so neither method can see them: like AdaMerging, both use only the
inputs of a split (``test`` as in AdaMerging's protocol, or ``val``), a seeded random subset of it.
"""

from __future__ import annotations

from typing import Iterator

import torch

from adamerge.data.task import Task, TensorImages

SPLITS = ("test", "val", "train")


def unlabelled_images(task: Task, split: str = "test", num_examples: int = 64, batch_size: int = 16,
                      seed: int = 0, device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Batches of at most ``batch_size`` images, ``min(num_examples, len(split))`` distinct images in all."""
    if split not in SPLITS:
        raise ValueError(f"unknown data split {split!r} for a data-based merge; valid: {', '.join(SPLITS)}")
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"num_examples and batch_size must be ≥ 1, got {num_examples} and {batch_size}")
    dataset = task.split(split)
    if len(dataset) == 0:
        raise ValueError(f"task {task.name!r} has an empty {split!r} split; choose another method.split")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_examples]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if isinstance(dataset, TensorImages):
            images = dataset.images[idx]
        else:
            images = torch.stack([dataset[int(i)][0] for i in idx])
        yield images.to(device)
