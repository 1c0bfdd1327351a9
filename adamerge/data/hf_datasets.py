"""Test sets as FusionBench reads them: Hugging Face Hub datasets with ``image`` and ``label`` columns.

FusionBench loads each task with ``datasets.load_dataset(<hub id>, [config], split=...)``. Here a task is
read, without any download at run time, from either

* a folder downloaded with ``hf download --repo-type dataset <id> --local-dir <data_dir>/<id>`` (parquet
  files such as ``data/test-00000-of-00001.parquet``), or
* the local ``datasets`` cache that an earlier ``load_dataset`` filled (``HF_DATASETS_CACHE``),

and labelled with the class names and CLIP templates of the task (the same lists the task_vectors layout
uses), after checking that the dataset's label count matches them. Images then go through the backbone's
transform and the decode-once cache like every other task.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from torch.utils.data import Dataset

from adamerge.data.benchmark import hold_out_val, task_name
from adamerge.data.classnames import CLASSNAMES
from adamerge.data.decode_cache import Preprocessed, cached_split
from adamerge.data.errors import DatasetNotFoundError
from adamerge.data.layouts import RawSplit
from adamerge.data.task import BenchmarkTasks, Task
from adamerge.data.templates import TEMPLATES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFSource:
    """Where a task lives on the Hub: ``load_dataset(path, name, split=...)``, and its column names."""

    path: str
    name: str | None = None
    image_column: str = "image"
    label_column: str = "label"


def _sources(raw: Mapping) -> dict[str, HFSource]:
    return {task_name(t): s if isinstance(s, HFSource) else HFSource(**dict(s)) for t, s in raw.items()}


class HFImages(Dataset):
    """``(PIL image, label)`` rows of a ``datasets.Dataset``."""

    def __init__(self, data, image_column: str, label_column: str):
        self.data, self.image_column, self.label_column = data, image_column, label_column

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        row = self.data[int(i)]
        return row[self.image_column], int(row[self.label_column])


@contextmanager
def _offline(enabled: bool):
    """``datasets`` offline for the duration (reads its cache, never the network)."""
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    if enabled:
        datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _download_hint(source: HFSource, data_dir: Path) -> str:
    return f"hf download --repo-type dataset {source.path} --local-dir {data_dir / source.path}"


def parquet_files(folder: Path, split: str, config: str | None = None) -> list[Path]:
    """The parquet files of ``split`` in a downloaded dataset repository (``data/<split>-*.parquet``,
    ``<config>/<split>-*.parquet``, ``<split>/*.parquet``, …), config folder first when given."""
    roots = [folder / config] if config and (folder / config).is_dir() else [folder]
    for root in roots:
        files = sorted(p for p in root.rglob("*.parquet")
                       if p.stem == split or p.stem.startswith(f"{split}-") or p.parent.name == split)
        if files:
            return files
    return []


def _hub_snapshot(source: HFSource) -> Path | None:
    """The dataset repository in the local Hub cache (``hf download --repo-type dataset <id>`` without
    ``--local-dir``), or None; never contacts the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.path, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _not_found(task: str, source: HFSource, data_dir: Path, looked_in: Path, problem: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        task, data_dir, looked_in, problem,
        [f"{source.path}/…/*.parquet   (a dataset repository with `image` and `label` columns)"],
        fix=f"on a machine with internet: {_download_hint(source, data_dir)} (or into the Hub cache without "
            f"--local-dir), then copy it here")


def open_hf_split(task: str, source: HFSource, split: str, data_dir: str | Path, hf_cache_dir: str | None = None,
                  download: bool = False) -> RawSplit:
    """One split of one task as ``(PIL image, label)`` rows: from ``data_dir/<hub id>``, else the Hub cache's
    snapshot, else the ``datasets`` cache of an earlier ``load_dataset`` (all offline unless ``download``)."""
    import datasets

    data_dir = Path(data_dir)
    folder = data_dir / source.path
    if not folder.is_dir():
        folder = _hub_snapshot(source) or folder
    files = parquet_files(folder, split, source.name) if folder.is_dir() else []
    if folder.is_dir() and not files:
        raise _not_found(task, source, data_dir, folder, f"no parquet files of split {split!r}"
                         + (f" (config {source.name!r})" if source.name else ""))
    try:
        with _offline(not download):
            if files:
                data = datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split,
                                             cache_dir=hf_cache_dir)
            else:
                data = datasets.load_dataset(source.path, source.name, split=split, cache_dir=hf_cache_dir)
                files = [Path(f["filename"]) for f in data.cache_files]
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError… when offline
        raise _not_found(task, source, data_dir, folder,
                         f"{source.path}{'/' + source.name if source.name else ''} ({split}) is neither downloaded "
                         f"here, nor in the Hub cache, nor in the datasets cache ({type(err).__name__})") from None
    missing = [c for c in (source.image_column, source.label_column) if c not in data.column_names]
    if missing:
        raise _not_found(task, source, data_dir, folder, f"the dataset has no column(s) {missing} (it has "
                         f"{data.column_names}; tasks.sources.{task}.image_column=… / label_column=… rename them)")
    feature = data.features[source.label_column]
    count = getattr(feature, "num_classes", None)
    if count is not None and count != len(CLASSNAMES[task]):
        raise _not_found(task, source, data_dir, folder, f"its label column has {count} classes but {task} has "
                         f"{len(CLASSNAMES[task])} class names: not this task's dataset")
    _check_label_order(task, getattr(feature, "names", None))
    return RawSplit(HFImages(data, source.image_column, source.label_column), files)


def _normalise(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _check_label_order(task: str, names) -> None:
    """Labels are indices into the task's class names. When the dataset names its labels and those names are
    ours in another order, every label would be shifted: refuse. Names that are spelt differently cannot be
    compared and are left to the count check."""
    if not names:
        return
    ours = [_normalise(n) for n in CLASSNAMES[task]]
    theirs = [_normalise(n) for n in names]
    if sorted(ours) == sorted(theirs) and ours != theirs:
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        raise ValueError(f"{task}: the dataset's label {first} is {names[first]!r} but class {first} of {task} is "
                         f"{CLASSNAMES[task][first]!r}: its labels are in another order than the class names, so "
                         f"every prediction would be scored against the wrong class")


def hf_dataset_tasks(names: Sequence[str] | None = None, sources: Mapping | None = None, data_dir: str | Path = "data",
                     backbone=None, *, splits: Mapping[str, str] | None = None, hf_cache_dir: str | None = None,
                     cache_dir: str | Path | None = None, cache_splits: Sequence[str] = ("test", "val"),
                     val_from_train: bool = False, download: bool = False, unseen: Sequence[str] | None = None,
                     preprocess: Callable | None = None) -> BenchmarkTasks:
    """The tasks ``names`` read from Hugging Face datasets (``conf/tasks/fusionbench8.yaml``).

    ``splits`` maps adamerge's split names (test / val / train) to the dataset's (default: test only, as
    FusionBench's AdaMerging reads). ``val_from_train`` holds a validation split out of ``train`` as
    task_vectors does (10 %, ≤ 5,000, seed 0) for methods that choose λ on val.
    """
    sources = _sources(sources or {})
    chosen = [task_name(n) for n in (names or list(sources))]
    held_out = [task_name(n) for n in (unseen or [])]
    lacking = [t for t in chosen + held_out if t not in sources]
    if lacking:
        raise ValueError(f"no Hugging Face dataset given for {lacking}: add tasks.sources.<task>.path=<hub id>")
    splits = dict(splits or {"test": "test"})
    if preprocess is None:
        if backbone is None:
            raise ValueError("Hugging Face tasks need the backbone's image transform: pass backbone= or preprocess=")
        preprocess = backbone.preprocess

    def build(task: str) -> Task:
        out: dict[str, Dataset] = {}
        raws = {ours: open_hf_split(task, sources[task], theirs, data_dir, hf_cache_dir, download)
                for ours, theirs in splits.items()}
        if val_from_train and "train" in raws:
            train_idx, val_idx = hold_out_val(len(raws["train"]))
            raws["val"], raws["train"] = raws["train"].subset(val_idx), raws["train"].subset(train_idx)
        for split, raw in raws.items():
            if cache_dir is not None and split in cache_splits:
                out[split] = cached_split(raw, preprocess, cache_dir, f"hf-{task}-{split}")
            else:
                out[split] = Preprocessed(raw.dataset, preprocess)
        return Task(name=task, classnames=list(CLASSNAMES[task]), templates=list(TEMPLATES[task]), splits=out)

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    return BenchmarkTasks([build(t) for t in chosen], [build(t) for t in held_out])
