"""Top-1 accuracy of a vision tower (given as parameters) on each task's labelled split."""

from __future__ import annotations

from typing import Mapping

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader

from adamerge.data.task import Task
from adamerge.models.heads import logits


@torch.no_grad()
def accuracy(visual: torch.nn.Module, params: Mapping[str, torch.Tensor] | None, head: torch.Tensor, task: Task,
             split: str = "test", batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Fraction of correct predictions; ``params`` (merged weights) replace the module's own if given."""
    visual = visual.to(device).eval()
    params = {k: v.to(device) for k, v in params.items()} if params is not None else None
    head = head.to(device)
    correct = total = 0
    for images, labels in DataLoader(task.split(split), batch_size=batch_size, shuffle=False):
        images = images.to(device)
        feats = functional_call(visual, params, (images,)) if params is not None else visual(images)
        correct += int((logits(feats, head).argmax(-1).cpu() == labels).sum())
        total += len(labels)
    if total == 0:
        raise ValueError(f"task {task.name!r} has an empty {split!r} split")
    return correct / total


def accuracies(visual, params_by_task: Mapping[str, Mapping[str, torch.Tensor] | None], heads: Mapping[str, torch.Tensor],
               tasks: list[Task], split: str = "test", batch_size: int = 256, device="cpu") -> dict[str, float]:
    """Per-task accuracy; ``params_by_task[task]`` is the model evaluated on that task."""
    return {t.name: accuracy(visual, params_by_task[t.name], heads[t.name], t, split, batch_size, device) for t in tasks}
