"""Multi-process runs that fail as one: a rank's error reaches the whole job, and nothing waits forever.

When one rank raises, the others are usually blocked in a collective. With gloo they see the closed
connection at once; with NCCL they wait for the process-group timeout. Either way the error they
raise ("connection closed by peer", "watchdog timeout") hides the real cause. Each rank therefore
writes its own exception to ``<run_dir>/rank-<r>.error`` the moment it fails, and the survivors
re-raise with that text (:func:`raise_with_rank_failures`).
"""

from __future__ import annotations

import os
import signal
import traceback
from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from adamerge.io import write_text_atomic


class RankFailedError(RuntimeError):
    """Another rank of this job failed; its error is the message."""


def ddp_strategy(timeout_minutes: float = 10.0, **kwargs) -> DDPStrategy:
    """Lightning's DDP with a process-group timeout in minutes (torch's default is 30 minutes, and
    NCCL ranks blocked on a dead peer wait that long before they fail)."""
    return DDPStrategy(timeout=timedelta(minutes=float(timeout_minutes)), **kwargs)


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class RankFailureReport(L.Callback):
    """Write this rank's exception to ``<dirpath>/rank-<r>.error`` as soon as it is raised."""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.world_size <= 1:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception_only(type(exception), exception)).strip()
        path = self.dirpath / f"rank-{trainer.global_rank}.error"
        write_text_atomic(path, f"rank {trainer.global_rank} (step {trainer.global_step}): {text}\n")
        if trainer.global_rank == 0:
            stop_local_ranks(trainer)


def stop_local_ranks(trainer: L.Trainer) -> None:
    """Kill the ranks this process launched: a rank that hangs (or waits on this one) must not outlive the job."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _SubprocessScriptLauncher):
        launcher.kill(signal.SIGKILL)


def raise_with_rank_failures(run_dir: str | Path, error: BaseException, since: float) -> None:
    """Re-raise ``error`` as :class:`RankFailedError` if another rank reported its failure after ``since``."""
    me = _rank()
    reports = []
    for path in sorted(Path(run_dir).glob("rank-*.error")):
        try:
            if path.stat().st_mtime >= since and path.stem != f"rank-{me}":
                reports.append(path.read_text().strip())
        except OSError:
            continue
    if reports:
        raise RankFailedError(
            "another rank of this distributed job failed, so this one stopped too:\n  " + "\n  ".join(reports)
            + f"\n(the failing rank's traceback is above in the job's output; reports in {run_dir}/rank-*.error)"
        ) from error
    text = str(error)
    if any(marker in text for marker in _COLLECTIVE_FAILURES):
        raise RankFailedError(
            f"a collective operation failed on rank {me} ({type(error).__name__}: {text.splitlines()[0][:300]}) and no "
            f"rank reported an error: another rank hung or died without a Python error (killed for memory, a lost "
            f"GPU or node). Check the other ranks' logs in {run_dir} and the scheduler's log; the process-group "
            f"timeout is trainer.strategy.timeout_minutes.") from error


_COLLECTIVE_FAILURES = ("Connection closed by peer", "Timed out waiting", "Watchdog caught collective operation timeout",
                        "NCCL communicator was aborted", "Connection reset by peer", "waiting for clients")

