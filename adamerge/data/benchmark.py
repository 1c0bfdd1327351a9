"""The eight-task benchmark of task arithmetic and AdaMerging, read from the standard folders.

``benchmark_tasks`` is the Hydra target of ``conf/tasks/paper8.yaml``: it returns one :class:`Task`
per dataset with the literature's class names and prompt templates and the splits

* ``test``  — the dataset's test set: AdaMerging adapts on its images (labels unused) and every
  method is evaluated on it;
* ``val``   — held out from the training set exactly as task_vectors does (``random_split`` of the
  train set, 10 %, at most 5,000 images, generator seeded 0; EuroSAT has its own ``val`` folder);
  chooses λ for task arithmetic / TIES;
* ``train`` — the rest of the training set: what the fine-tuned checkpoints were trained on.

Images go through the backbone's ``preprocess`` (open_clip's validation transform). Splits named in
``cache_splits`` are decoded once and memory-mapped (:mod:`adamerge.data.decode_cache`).
``corruption`` (AdaMerging's robustness test) corrupts the test images before the preprocess
(:mod:`adamerge.data.corruptions`); train and val stay clean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset, random_split

from adamerge.data.classnames import CLASSNAMES
from adamerge.data.corruptions import with_corruption
from adamerge.data.decode_cache import Preprocessed, cached_split
from adamerge.data.layouts import LAYOUTS, RawSplit, open_split
from adamerge.data.task import BenchmarkTasks, Task
from adamerge.data.templates import TEMPLATES

PAPER_TASKS = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]  # the paper's column order
PAPER_NAMES = {t: LAYOUTS[t].name for t in PAPER_TASKS}  # the paper's spelling, for tables: sun397 → SUN397
SPLITS = ("train", "val", "test")
VAL_FRACTION, MAX_VAL_SAMPLES, VAL_SEED = 0.1, 5000, 0  # task_vectors' get_dataset defaults


def task_name(name: str) -> str:
    """The task name (lower case: configs, checkpoint files) of a name given in any case (``SUN397`` → ``sun397``)."""
    key = str(name).lower()
    if key not in PAPER_TASKS:
        raise ValueError(f"unknown benchmark task {name!r}; valid: {', '.join(PAPER_TASKS)}")
    return key


def hold_out_val(n: int, val_fraction: float = VAL_FRACTION, max_val_samples: int | None = MAX_VAL_SAMPLES,
                 seed: int = VAL_SEED) -> tuple[list[int], list[int]]:
    """``(train_indices, val_indices)`` of a training set of ``n`` images, as task_vectors splits it.

    ``val = min(int(n · fraction), max)``; ``torch.utils.data.random_split`` into ``[n − val, val]``
    with ``Generator().manual_seed(seed)`` — the same call, so the same images (for MNIST the first
    train index is 36044, which task_vectors asserts).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    val = int(n * val_fraction)
    if max_val_samples is not None:
        val = min(val, max_val_samples)
    if val <= 0 or val >= n:
        raise ValueError(f"cannot hold out a validation set from {n} training images "
                         f"(fraction {val_fraction} gives {val}); the training split is too small")
    train_part, val_part = random_split(range(n), [n - val, val], generator=torch.Generator().manual_seed(seed))
    return list(train_part.indices), list(val_part.indices)


def raw_splits(task: str, data_dir: str | Path, splits: Sequence[str] = SPLITS, *, val_fraction: float = VAL_FRACTION,
               max_val_samples: int | None = MAX_VAL_SAMPLES, val_seed: int = VAL_SEED) -> dict[str, RawSplit]:
    """The requested splits of one task as stored ``(PIL image, label)`` datasets (no transform)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; valid: {list(SPLITS)}")
    out: dict[str, RawSplit] = {}
    if "train" in splits or "val" in splits:
        if LAYOUTS[task].val_on_disk:
            for s in ("train", "val"):
                if s in splits:
                    out[s] = open_split(task, data_dir, s)
        else:
            full = open_split(task, data_dir, "train")
            train_idx, val_idx = hold_out_val(len(full), val_fraction, max_val_samples, val_seed)
            if "train" in splits:
                out["train"] = full.subset(train_idx)
            if "val" in splits:
                out["val"] = full.subset(val_idx)
    if "test" in splits:
        out["test"] = open_split(task, data_dir, "test")
    return {s: out[s] for s in splits}


def benchmark_tasks(names: Sequence[str] | None = None, data_dir: str | Path = "data", backbone=None, *,
                    preprocess: Callable | None = None, splits: Sequence[str] = SPLITS,
                    train_augmentation: bool = True,
                    cache_dir: str | Path | None = None, cache_splits: Sequence[str] = ("test", "val"),
                    unseen: Sequence[str] | None = None, val_fraction: float = VAL_FRACTION,
                    max_val_samples: int | None = MAX_VAL_SAMPLES, val_seed: int = VAL_SEED,
                    num_workers: int = 0, corruption: str | None = None, severity: int = 5,
                    corruption_profile: str = "imagenet-c") -> BenchmarkTasks:
    """The benchmark tasks ``names`` (default: all eight, paper order) read from ``data_dir``.

    ``preprocess`` defaults to ``backbone.preprocess``. ``cache_dir=None`` decodes images on every
    access (no cache). ``train_augmentation``: the train split uses the backbone's training transform
    (``backbone.preprocess_train``) when it has one. ``unseen`` tasks are built the same way and returned as ``.unseen``.
    Missing data raises :class:`~adamerge.data.errors.DatasetNotFoundError` with the fix command.
    ``corruption`` (``None`` / ``"clean"`` or a name in :data:`~adamerge.data.corruptions.CORRUPTIONS`)
    at ``severity`` 1–5 applies to the test split only; it is part of the transform, so of the cache key.
    """
    if preprocess is None:
        if backbone is None:
            raise ValueError("benchmark tasks need the backbone's image transform: pass backbone= or preprocess=")
        preprocess = backbone.preprocess
    # Fine-tuning sees open_clip's training transform (random resized crop), as task_vectors fine-tunes.
    train_preprocess = (getattr(backbone, "preprocess_train", None) if train_augmentation else None) or preprocess
    chosen = [task_name(n) for n in (PAPER_TASKS if names is None else names)]
    held_out = [task_name(n) for n in (unseen or [])]
    test_preprocess = with_corruption(preprocess, corruption, severity, profile=corruption_profile)
    overlap = sorted(set(chosen) & set(held_out))
    if overlap:
        raise ValueError(f"tasks {overlap} are both merged and 'unseen'; a task is one or the other")

    def build(task: str) -> Task:
        raw = raw_splits(task, data_dir, splits, val_fraction=val_fraction, max_val_samples=max_val_samples,
                         val_seed=val_seed)
        datasets: dict[str, Dataset] = {}
        for split, stored in raw.items():
            transform = {"test": test_preprocess, "train": train_preprocess}.get(split, preprocess)
            if cache_dir is not None and split in cache_splits:
                datasets[split] = cached_split(stored, transform, cache_dir, f"{task}-{split}", root=data_dir,
                                               num_workers=num_workers)
            else:
                datasets[split] = Preprocessed(stored.dataset, transform)
        return Task(name=task, classnames=list(CLASSNAMES[task]), templates=list(TEMPLATES[task]), splits=datasets)

    return BenchmarkTasks([build(t) for t in chosen], [build(t) for t in held_out])
