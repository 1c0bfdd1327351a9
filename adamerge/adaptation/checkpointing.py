"""Resumable adaptation: what a Lightning checkpoint of λ means, checked before resuming, and saved on interrupt.

A checkpoint holds λ and the optimiser state only. Without its meaning recorded, a task-wise λ resumed
with the task list reordered silently moves one task's coefficient onto another, and a plain run's λ
resumes an AdaMerging++ run; so every checkpoint carries the tasks, tensor names, granularity and TIES
trimming it was trained for (:func:`checkpoint_identity`) and a resume compares them first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from adamerge.adaptation.coefficient_file import describe_trimming

IDENTITY_KEY = "adamerge"


class ResumeCheckpointError(ValueError):
    """A ``ckpt_path`` that is not a checkpoint of this adaptation, with what it holds and what was expected."""


class RunInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped an adaptation; the message names the checkpoint to resume from."""


def checkpoint_identity(*, tasks, layers, granularity: str, trimming: dict | None, method: str) -> dict:
    return {"tasks": list(tasks), "layers": list(layers), "granularity": granularity, "trimming": trimming,
            "method": method}


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def check_resume_checkpoint(path: str | Path, expected: dict) -> dict:
    """Read ``path`` (safely: ``weights_only``) and refuse it unless it is a checkpoint of exactly this
    adaptation; returns its identity. Runs before any training step."""
    path = Path(path)
    if not path.is_file():
        raise ResumeCheckpointError(f"ckpt_path={path}: no such file (give <run>/checkpoints/last.ckpt)")
    if _is_safetensors(path):
        raise ResumeCheckpointError(
            f"ckpt_path={path} is a safetensors file (a coefficients file? evaluate it with method.coefficients="
            f"{path}); ckpt_path takes the Lightning checkpoint of a run: <run>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError… for foreign or damaged files
        raise ResumeCheckpointError(f"ckpt_path={path} is not a Lightning checkpoint written by adamerge: it cannot "
                                    f"be read as one ({type(err).__name__}). Nothing was trained.") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "coefficients.raw" not in state:
        keys = sorted(state)[:5] if isinstance(state, dict) else sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else []
        raise ResumeCheckpointError(f"ckpt_path={path} holds no AdaMerging coefficients (keys: {keys}): it is not "
                                    f"the checkpoint of an adamerge adaptation run.")
    found = checkpoint.get(IDENTITY_KEY)
    if not isinstance(found, dict):
        raise ResumeCheckpointError(
            f"ckpt_path={path} does not record which tasks, tensors, granularity and trimming its coefficients "
            f"belong to (written by an older adamerge), so resuming could move λ between tasks unnoticed. Start "
            f"the run afresh (its coefficients.safetensors, if any, can still be evaluated with method.coefficients=).")
    problems = []
    if found.get("tasks") != expected["tasks"]:
        problems.append(f"it was trained for tasks {found.get('tasks')}, this run merges {expected['tasks']}")
    if found.get("layers") != expected["layers"]:
        problems.append(f"its {len(found.get('layers') or [])} tensors differ from this backbone's "
                        f"{len(expected['layers'])}")
    if found.get("granularity") != expected["granularity"]:
        problems.append(f"it holds {found.get('granularity')}-wise coefficients, this run is "
                        f"{expected['granularity']}-wise")
    if (found.get("trimming") or None) != (expected["trimming"] or None):
        problems.append(f"it was trained on {describe_trimming(found.get('trimming'))} task vectors, this run uses "
                        f"{describe_trimming(expected['trimming'])} ones")
    shape = tuple(state["coefficients.raw"].shape)
    want = (len(expected["tasks"]),) if expected["granularity"] == "task" else (len(expected["tasks"]), len(expected["layers"]))
    if not problems and shape != want:
        problems.append(f"its coefficients have shape {shape}, this run needs {want}")
    if problems:
        raise ResumeCheckpointError(f"ckpt_path={path} ({found.get('method')}) does not fit this run: "
                                    + "; ".join(problems) + ". Nothing was trained.")
    return found


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C or SIGTERM (a cluster's pre-emption), write ``last.ckpt`` at the step reached and say how to
    resume: a periodic checkpoint alone would lose every step since the last one."""

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self.saved: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        self.saved = self.path
        if trainer.is_global_zero:
            sys.stderr.write(f"\nadamerge: interrupted at step {trainer.global_step} of {trainer.max_steps}; "
                             f"coefficients and optimiser state saved to {self.path}\n")
            sys.stderr.flush()
