"""Run records: one JSON line per finished ``adamerge`` run, appended to ``results/raw/*.jsonl``.

Why JSON lines: many runs (parallel Hydra launcher jobs) finish at once and each must add its
result without a database; tables are rebuilt from the raw lines at any time.

Record schema (one JSON object per line)::

    {
      "run_id":     str,               # unique per run (uuid4 hex unless the caller has one)
      "time":       str,               # ISO 8601 time the run finished; newest record wins
      "experiment": str,               # groups runs into one table, e.g. "vitb32_8tasks"
      "method":     str,               # config name, e.g. "task_arithmetic"
      "label":      str,               # table row label, e.g. "Task Arithmetic (λ=0.3)"
      "model":      str,               # backbone name, e.g. "ViT-B-32"
      "seed":       int,
      "tasks":      [str, ...],        # task names in evaluation order
      "accuracy":   {task: float},     # fraction in [0, 1], one entry per task in ``tasks``
      "avg":        float,             # mean of ``accuracy`` over ``tasks``
      "extra":      {...},             # free-form: coefficients file, chosen λ, clamp count, timings
      "config":     {...},             # the resolved config of the run
      "provenance": {...}              # git commit + dirty flag, package versions, hardware, command line
    }                                  # (adamerge.runtime.provenance; absent from records written before it)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from filelock import FileLock

from adamerge import io

REQUIRED_FIELDS = (
    "run_id", "time", "experiment", "method", "label", "model",
    "seed", "tasks", "accuracy", "avg", "extra", "config",
)
_HOW_TO_FIX = "choose a writable results directory, e.g. `adamerge ... paths.results_dir=/some/writable/dir`"


class ResultsDirError(RuntimeError):
    """The results directory (or file) cannot be written; raised before or instead of losing a result."""


class RecordFormatError(ValueError):
    """A record that does not follow the schema, or a line that is not valid JSON."""


def make_record(
    *,
    experiment: str,
    method: str,
    label: str,
    model: str,
    seed: int,
    accuracy: Mapping[str, float],
    tasks: Iterable[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    time: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a schema-valid record, filling ``run_id``, ``time``, ``avg`` and ``provenance`` (this process's, unless
    given) so callers cannot get them wrong."""
    if provenance is None:
        from adamerge.runtime.provenance import provenance as this_process

        provenance = this_process()
    accuracy = {task: float(value) for task, value in accuracy.items()}
    tasks = list(tasks) if tasks is not None else list(accuracy)
    record = {
        "run_id": run_id or uuid.uuid4().hex,
        "time": time or datetime.now(timezone.utc).isoformat(),
        "experiment": experiment,
        "method": method,
        "label": label,
        "model": model,
        "seed": int(seed),
        "tasks": tasks,
        "accuracy": accuracy,
        "avg": sum(accuracy.get(t, math.nan) for t in tasks) / len(tasks) if tasks else math.nan,  # NaN fails validation
        "extra": dict(extra or {}),
        "config": dict(config or {}),
        "provenance": dict(provenance),
    }
    validate_record(record)
    return record


def validate_record(record: Any) -> None:
    """Raise :class:`RecordFormatError` naming the first problem, so a bad record never reaches a table."""
    if not isinstance(record, dict):
        raise RecordFormatError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise RecordFormatError(f"record is missing field(s) {missing}")
    for name in ("run_id", "time", "experiment", "method", "label", "model"):
        if not isinstance(record[name], str):
            raise RecordFormatError(f"field {name!r} must be a string, got {record[name]!r}")
    _parse_time(record["time"])
    if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
        raise RecordFormatError(f"field 'seed' must be an integer, got {record['seed']!r}")
    tasks, accuracy = record["tasks"], record["accuracy"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise RecordFormatError(f"field 'tasks' must be a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise RecordFormatError(f"field 'tasks' lists a task twice: {tasks}")
    if not isinstance(accuracy, dict) or set(accuracy) != set(tasks):
        keys = sorted(accuracy) if isinstance(accuracy, dict) else accuracy
        raise RecordFormatError(f"'accuracy' must have exactly one entry per task; tasks={tasks}, accuracy keys={keys}")
    for task, value in list(accuracy.items()) + [("avg", record["avg"])]:
        if not _is_fraction(value):
            raise RecordFormatError(f"accuracy for {task!r} must be a fraction in [0, 1], got {value!r}")
    for name in ("extra", "config", "provenance"):
        if name in record and not isinstance(record[name], dict):
            raise RecordFormatError(f"field {name!r} must be an object, got {type(record[name]).__name__}")


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _json_default(value: Any) -> Any:
    """Serialise what configs and metrics commonly hold (paths, numpy/torch scalars); refuse the rest."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a run record; convert it to plain JSON first")


def check_writable(directory: str | Path) -> Path:
    """Prove ``directory`` accepts files *before* expensive work, so a run never ends unable to save.

    Creates the directory, then creates, fills, syncs and removes a small temporary file; any OS
    error (read-only, not a directory, disk full) becomes a :class:`ResultsDirError`.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-", delete=True) as probe:
            probe.write(b"x" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise ResultsDirError(
            f"results directory {str(directory)!r} is not writable ({error.strerror or error}); {_HOW_TO_FIX}"
        ) from error
    return directory.resolve()


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line; safe with many processes appending to the same file.

    A file lock (``<path>.lock``) serialises writers, and the whole line goes out in one ``write``
    followed by ``fsync``, so lines are never interleaved, torn or lost.
    """
    path = Path(path)
    record = dict(record)
    validate_record(record)
    line = (json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                while written < len(line):  # only on exotic filesystems; the lock still keeps lines whole
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as error:
        raise ResultsDirError(
            f"cannot append run record to {str(path)!r} ({error.strerror or error}); {_HOW_TO_FIX}"
        ) from error


def read_records(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read every record from the given ``.jsonl`` files and directories (searched recursively).

    Files are read in the order given (directories in sorted order); a malformed line is an error
    naming ``file:line``, never skipped, because a silently missing run would skew a table.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[dict[str, Any]] = []
    for file in _jsonl_files(paths):
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    validate_record(record)
                except (json.JSONDecodeError, RecordFormatError) as error:
                    raise RecordFormatError(f"{file}:{number}: malformed run record: {error}") from error
                records.append(record)
    return records


def write_record_file(path: str | Path, record: Mapping[str, Any]) -> Path:
    """The run's own copy of its record (``<run_dir>/record.json``), written atomically: a sweep's table reads
    these, never other experiments' files."""
    validate_record(dict(record))
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default, indent=1) + "\n"
    return write_text_atomic(path, text)


def write_records_file(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """A run's several rows (``<run_dir>/records.json``, the LLM pipeline's five), validated and written atomically."""
    records = [dict(r) for r in records]
    for record in records:
        validate_record(record)
    text = json.dumps(records, ensure_ascii=False, allow_nan=False, default=_json_default, indent=1) + "\n"
    return write_text_atomic(path, text)


def read_record_file(path: str | Path) -> dict[str, Any]:
    """One record written by :func:`write_record_file`; a damaged one is an error naming the file."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        validate_record(record)
    except (json.JSONDecodeError, RecordFormatError, UnicodeDecodeError) as error:
        raise RecordFormatError(f"{path}: malformed run record: {error}") from error
    return record


def _jsonl_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.rglob("*.jsonl")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no run records at {str(path)!r} (expected a .jsonl file or a directory)")
    return files


def keep_latest(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Keep only the newest record per ``(label, config, seed)``: re-running a method replaces its row.

    The config is the resolved config up to bookkeeping (:func:`~adamerge.results.identity.fingerprint`): trials of
    a search share label and seed but not their parameters, and each stays (the table shows them apart). Newest
    means the latest ``time``; on equal times the record read later wins. The survivors keep the order in which
    their key first appeared.
    """
    from adamerge.results.identity import fingerprint

    newest: dict[tuple[str, str, int], tuple[datetime, int, dict[str, Any]]] = {}
    for index, record in enumerate(records):
        key = (record["label"], fingerprint(record.get("config")), record["seed"])
        stamp = _parse_time(record["time"])
        if key not in newest or (stamp, index) >= newest[key][:2]:
            newest[key] = (stamp, index, dict(record))
    return [entry[2] for entry in newest.values()]


def _parse_time(text: str) -> datetime:
    """Parse an ISO time; times without a zone are taken as UTC so that all times compare."""
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError as error:
        raise RecordFormatError(f"record time {text!r} is not an ISO 8601 time") from error
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (:mod:`adamerge.io`); a failure is a :class:`ResultsDirError`."""
    try:
        return io.write_text_atomic(path, text)
    except io.AtomicWriteError as error:
        raise ResultsDirError(f"{error}; choose a writable output path") from error
