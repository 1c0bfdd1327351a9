"""Errors for benchmark datasets that are absent or only partly on disk.

Each message names the folder looked in, the layout expected there and the command that fixes it,
because "file not found" deep inside torchvision tells a user none of the three.
"""

from __future__ import annotations

from pathlib import Path


def prepare_command(task: str, data_dir: str | Path) -> str:
    return f"adamerge-prepare-data --tasks {task} --data-dir {data_dir}"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's folder (or one of its split folders / files) does not exist or holds no images."""

    def __init__(self, task: str, data_dir: str | Path, looked_in: str | Path, problem: str, layout: list[str],
                 fix: str | None = None):
        self.task, self.data_dir, self.looked_in = task, Path(data_dir), Path(looked_in)
        lines = "\n".join(f"    {line}" for line in layout)
        fix = fix or f"{prepare_command(task, data_dir)}   (downloads it, or prints where to get it and how to arrange it)"
        super().__init__(f"{problem} ({looked_in}).\n  Expected under {data_dir}:\n{lines}\n  Fix: {fix}")


class IncompleteDatasetError(DatasetNotFoundError):
    """The dataset's folder exists, but class folders, images or annotation files are missing."""
