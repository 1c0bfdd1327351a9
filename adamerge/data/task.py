"""A task as the merging literature sees it: images, labels, class names, prompt templates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset


@dataclass
class Task:
    """One classification task.

    ``splits`` maps ``train`` / ``val`` / ``test`` to datasets yielding ``(image_tensor, label)``
    with images already in the backbone's input format. AdaMerging adapts on ``test`` images with
    their labels unused; ``val`` chooses λ for task arithmetic / TIES; ``train`` fine-tunes.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    splits: dict[str, Dataset] = field(default_factory=dict)

    def split(self, name: str) -> Dataset:
        if name not in self.splits:
            raise KeyError(f"task {self.name!r} has no {name!r} split; it has {sorted(self.splits)}")
        return self.splits[name]


class TensorImages(Dataset):
    """Images held as one tensor (decoded and transformed once), labels as another."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class BenchmarkTasks(list):
    """The tasks to merge, plus ``unseen`` tasks that are only evaluated (the generalisation experiment)."""

    def __init__(self, tasks: list[Task], unseen: list[Task] | None = None):
        super().__init__(tasks)
        self.unseen = list(unseen or [])
