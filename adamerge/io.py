"""Atomic writes: a reader (or a crash half-way) sees the old file or folder, or the new one — never half.

Every file adamerge writes that something else reads later (records, tables, checkpoints, coefficient files,
decoded-image caches, the embedded world, merged model folders, rank error reports) goes through here: the
content is written to a temporary sibling (same directory, so the rename is atomic on POSIX), flushed and
synced, then renamed over the target. Failures are :class:`AtomicWriteError`, naming the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class AtomicWriteError(OSError):
    """A file or folder could not be written (read-only place, full disk, …); the target is named."""


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path``; whatever the ``with`` block writes there replaces ``path`` at its end
    (and is removed if the block raises). For writers that want a file name (torch.save, safetensors)."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        if isinstance(err, AtomicWriteError):
            raise
        raise AtomicWriteError(f"cannot write {path} ({err.strerror or err})") from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | Path, mode: int = 0o755) -> Iterator[Path]:
    """A temporary folder beside ``path`` that replaces ``path`` (an existing one included) when the block ends;
    removed if it raises. The old folder is swapped aside first and deleted only after the rename succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, mode)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an existing ``path`` is swapped out, then deleted."""
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent)) / path.name
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
            shutil.rmtree(old.parent, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def save_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then rename: for library writers that take a file name."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
