"""Decode-once cache: a split's images decoded and transformed once, then memory-mapped.

AdaMerging draws thousands of small test batches; decoding JPEGs and resizing them each time would
dominate a run. The first use of a split runs the backbone's transform over every image and stores
the result under ``cache_dir/datasets/<task>-<split>-<key>/``; later runs (and other processes:
DDP ranks, multirun jobs) map the file instead.

What is stored is the output of the transform's PIL part — for open_clip's validation transform the
resized, centre-cropped RGB image as uint8, a quarter of the float size — and the tensor part
(``ToTensor``, ``Normalize``) runs when a batch is read, so the cached pipeline yields exactly the
tensors the plain PIL pipeline yields. Transforms without a ``ToTensor`` step are cached whole.

The key is the *content*: every source file's relative path, size and modification time, the
subset indices, and the transform's ``repr`` (object addresses removed) — never the task's name
alone, which would serve stale images after the data or the backbone changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from adamerge.data.layouts import RawSplit
from adamerge.data.task import TensorImages
from adamerge.io import atomic_dir, write_text_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1
META = "meta.json"


class UnreadableImageError(OSError):
    """An image of a dataset that cannot be decoded (truncated, not an image), named by its file."""


def describe_sample(dataset, i: int) -> str:
    """Where sample ``i`` of a dataset is stored: its file for folder datasets, else its index."""
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # torch Subset
        return describe_sample(dataset.dataset, int(dataset.indices[i]))
    samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    if samples is not None and i < len(samples):
        return str(samples[i][0])
    return f"sample {i} of {type(dataset).__name__}"


class Preprocessed(Dataset):
    """``(transform(image), label)`` of a dataset yielding ``(PIL image, label)``: the plain pipeline."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            image, label = self.dataset[i]
            return self.transform(image), label
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError… on damaged files
            raise UnreadableImageError(f"cannot decode {describe_sample(self.dataset, i)} ({type(err).__name__}: "
                                       f"{err}): re-download or replace that file (or remove it from the dataset "
                                       f"folder)") from err


def split_transform(preprocess: Callable) -> tuple[Callable, Callable | None]:
    """``(pil_part, tensor_part)`` of a ``Compose`` split before its ``ToTensor``; ``(preprocess, None)`` otherwise."""
    steps = getattr(preprocess, "transforms", None)
    if isinstance(preprocess, T.Compose) and steps:
        for i, step in enumerate(steps):
            if isinstance(step, T.ToTensor):
                return T.Compose(steps[:i]), T.Compose(steps[i:])
    return preprocess, None


def transform_repr(transform: Callable) -> str:
    """``repr`` without memory addresses (``<function f at 0x7f…>``), so it is stable across processes."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def cache_key(raw: RawSplit, stored_transform: Callable, root: str | Path | None = None) -> str:
    """Hash of the files (path relative to ``root``, size, mtime), subset indices and transform."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "transform": transform_repr(stored_transform),
                         "n": len(raw), "indices": raw.indices}).encode())
    for path in raw.files:
        stat = os.stat(path)
        name = os.path.relpath(path, root) if root is not None else str(path)
        h.update(f"\n{name}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array))


class DecodedImages:
    """Model inputs read from a memory-mapped array of stored images, one batch at a time.

    Indexing (an int, a slice, or a tensor / list of indices) applies ``finish`` — the transform's
    tensor part — to each stored image and stacks the results: it behaves like the float tensor
    ``TensorImages`` holds, without ever holding it. Pickles as its file path (DataLoader workers).
    """

    def __init__(self, path: str | Path, finish: Callable[[np.ndarray], torch.Tensor] | None = None):
        self.path, self.finish = Path(path), finish or _as_tensor
        self.array = np.load(self.path, mmap_mode="c")  # copy-on-write: writable views, pages read lazily

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.dim() == 0):
            return self.finish(self.array[int(index)])
        rows = range(*index.indices(len(self))) if isinstance(index, slice) else torch.as_tensor(index).tolist()
        return torch.stack([self.finish(self.array[i]) for i in rows])

    def __getstate__(self):
        return {"path": self.path, "finish": self.finish}

    def __setstate__(self, state):
        self.__init__(state["path"], state["finish"])


class _Unreadable:
    """A sample that failed to decode, carried back from a loader worker so the error can name it cleanly."""

    def __init__(self, message: str):
        self.message = message


class _Stored(Preprocessed):
    """``(np.ndarray, label)``: what goes into the cache for each image (or an :class:`_Unreadable`)."""

    def __getitem__(self, i: int):
        try:
            image, label = super().__getitem__(i)
        except UnreadableImageError as err:
            return _Unreadable(str(err)), None
        return np.asarray(image), int(label)


def _collate(items):
    return items


def _exact(stored: np.ndarray, finish: Callable | None, expected: torch.Tensor) -> bool:
    got = (finish or _as_tensor)(stored)
    return got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)


def _build(raw: RawSplit, entry: Path, stored_transform: Callable, num_workers: int) -> None:
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # a build that was killed (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(entry) as tmp:  # an error or interrupt leaves no half-built entry behind
        _fill(raw, tmp, entry, stored_transform, num_workers)


def _fill(raw: RawSplit, tmp: Path, entry: Path, stored_transform: Callable, num_workers: int) -> None:
    source = _Stored(raw.dataset, stored_transform)
    first, _ = source[0]
    if isinstance(first, _Unreadable):
        raise UnreadableImageError(f"{entry.name}: {first.message}")
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=first.dtype,
                                       shape=(len(source),) + first.shape)
    labels = np.empty(len(source), dtype=np.int64)
    loader = DataLoader(source, batch_size=64, num_workers=num_workers, collate_fn=_collate)
    i = 0
    for batch in loader:
        for array, label in batch:
            if isinstance(array, _Unreadable):
                raise UnreadableImageError(f"{entry.name}: {array.message}")
            if array.shape != first.shape or array.dtype != first.dtype:
                raise ValueError(f"image {i} of {entry.name} transforms to {array.dtype}{list(array.shape)}, the first "
                                 f"to {first.dtype}{list(first.shape)}: the transform must give one fixed size to be cached")
            images[i], labels[i] = array, label
            i += 1
        if i % 10_000 < len(batch):
            log.info("%s: %d / %d images decoded", entry.name, i, len(source))
    images.flush()
    del images
    np.save(tmp / "labels.npy", labels)
    meta = {"version": CACHE_VERSION, "count": int(len(labels)), "shape": list(first.shape), "dtype": str(first.dtype),
            "transform": transform_repr(stored_transform)}
    write_text_atomic(tmp / META, json.dumps(meta, indent=2))  # written last: marks the entry complete


def cached_split(raw: RawSplit, preprocess: Callable, cache_dir: str | Path, name: str, *,
                 root: str | Path | None = None, num_workers: int = 0) -> TensorImages:
    """``raw`` through ``preprocess`` as ``TensorImages``, decoded once into ``cache_dir`` and mapped after.

    ``name`` (e.g. ``"SUN397-test"``) only makes the folder readable; the key makes it correct.
    """
    if len(raw) == 0:
        raise ValueError(f"{name}: nothing to cache, the split is empty")
    stored_transform, finish = split_transform(preprocess)
    first_image, _ = raw.dataset[0]  # PIL opens lazily: a damaged first file fails below, named
    try:
        stored_transform(first_image)
    except Exception as err:
        raise UnreadableImageError(f"{name}: cannot decode {describe_sample(raw.dataset, 0)} ({type(err).__name__}: "
                                   f"{err}): re-download or replace that file") from err
    if finish is not None and not _exact(np.array(stored_transform(first_image)), finish, preprocess(first_image)):
        stored_transform, finish = preprocess, None  # the split is not exact for this transform: store floats
    key = cache_key(raw, stored_transform, root)
    entry = Path(cache_dir).expanduser() / "datasets" / f"{name}-{key[:16]}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if not (entry / META).is_file():
            log.info("decoding %s (%d images) once into %s", name, len(raw), entry)
            _build(raw, entry, stored_transform, num_workers)
    images = DecodedImages(entry / "images.npy", finish)
    labels = torch.from_numpy(np.load(entry / "labels.npy"))
    if len(images) != len(raw):
        raise RuntimeError(f"decode cache {entry} holds {len(images)} images for a split of {len(raw)}; delete it")
    return TensorImages(images, labels)
