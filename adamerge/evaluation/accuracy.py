"""Top-1 accuracy of a vision tower (optionally given merged parameters) under a frozen zero-shot head."""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from adamerge.data.task import Task, TensorImages
from adamerge.models.heads import logits
from adamerge.runtime.progress import progress

PROGRESS_MIN_BATCHES = 20  # a split of fewer batches is measured without a bar (tiny test runs stay quiet)


def batches(dataset: Dataset, batch_size: int):
    if isinstance(dataset, TensorImages):  # decoded once: slice, don't collate sample by sample
        for i in range(0, len(dataset), batch_size):
            yield dataset.images[i:i + batch_size], dataset.labels[i:i + batch_size]
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def dataset_accuracy(visual: torch.nn.Module, head: torch.Tensor, dataset: Dataset,
                     params: Mapping[str, torch.Tensor] | None = None, batch_size: int = 256,
                     device: str | torch.device = "cpu", desc: str = "evaluating",
                     progress_min_batches: int = PROGRESS_MIN_BATCHES) -> float:
    """Fraction of correct predictions; ``params`` (merged weights) replace the module's own if given.

    Leaves ``visual`` in eval mode on ``device``. A split of at least ``progress_min_batches`` batches
    shows a bar (``desc``), gone when done.
    """
    visual = visual.to(device).eval()
    params = {k: v.to(device) for k, v in params.items()} if params is not None else None
    head = head.to(device)
    correct = total = 0
    count = math.ceil(len(dataset) / batch_size)
    for images, labels in progress(batches(dataset, batch_size), total=count, desc=desc, unit="batch", leave=False,
                                   disable=count < progress_min_batches):
        images = images.to(device)
        feats = functional_call(visual, params, (images,)) if params is not None else visual(images)
        correct += int((logits(feats, head).argmax(-1).cpu() == torch.as_tensor(labels)).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("cannot measure accuracy on an empty dataset")
    return correct / total


def accuracy(visual: torch.nn.Module, params: Mapping[str, torch.Tensor] | None, head: torch.Tensor, task: Task,
             split: str = "test", batch_size: int = 256, device: str | torch.device = "cpu",
             progress_min_batches: int = PROGRESS_MIN_BATCHES) -> float:
    """Accuracy on one split of a task (a clear error names an empty split)."""
    dataset = task.split(split)
    if len(dataset) == 0:
        raise ValueError(f"task {task.name!r} has an empty {split!r} split")
    return dataset_accuracy(visual, head, dataset, params, batch_size, device, desc=f"evaluating {task.name} ({split})",
                            progress_min_batches=progress_min_batches)


def accuracies(visual, params_by_task: Mapping[str, Mapping[str, torch.Tensor] | None], heads: Mapping[str, torch.Tensor],
               tasks: list[Task], split: str = "test", batch_size: int = 256, device="cpu",
               progress_min_batches: int = PROGRESS_MIN_BATCHES) -> dict[str, float]:
    """Per-task accuracy; ``params_by_task[task]`` is the model evaluated on that task."""
    return {t.name: accuracy(visual, params_by_task[t.name], heads[t.name], t, split, batch_size, device,
                             progress_min_batches) for t in tasks}
