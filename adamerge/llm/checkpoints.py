"""An SFT run's checkpoints and their validation metrics, as the transformers / TRL ``Trainer`` leaves them.

``<run>/checkpoint-<step>/`` holds the weights and ``trainer_state.json``, whose ``log_history`` lists every
evaluation (``{"step": 300, "eval_loss": 0.71, ...}``). The newest checkpoint's history covers all earlier
evaluations, so one file ranks them all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

STATE_FILE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointRunError(ValueError):
    """An SFT run folder or checkpoint list that cannot be ranked as it is; the message says what to pass."""


@dataclass
class SFTCheckpoint:
    path: Path
    step: int | None
    metrics: dict = field(default_factory=dict)  # validation metrics at this step, from trainer_state.json

    @property
    def name(self) -> str:
        return self.path.name


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def discover(run_dir: str | Path | None = None, checkpoints: Sequence[str | Path] | None = None) -> list[SFTCheckpoint]:
    """The checkpoints of ``run_dir`` (``checkpoint-N/`` folders, by step) or the explicit ``checkpoints``."""
    if checkpoints:
        found = [SFTCheckpoint(Path(c), int(m.group(1)) if (m := CHECKPOINT.match(Path(c).name)) else None)
                 for c in checkpoints]
    else:
        if run_dir is None:
            raise CheckpointRunError("give llm.sft_run (the Trainer's output_dir) or llm.checkpoints (a list of folders)")
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise CheckpointRunError(f"SFT run folder not found: {run_dir} (llm.sft_run: the Trainer's output_dir)")
        found = sorted((SFTCheckpoint(p, int(CHECKPOINT.match(p.name).group(1))) for p in run_dir.iterdir()
                        if p.is_dir() and CHECKPOINT.match(p.name)), key=lambda c: c.step)
        if not found:
            raise CheckpointRunError(f"no checkpoint-N/ folders in {run_dir}; pass the folder the Trainer saved them in, "
                                     "or list them: llm.checkpoints=[dir1,dir2,...]")
    missing = [str(c.path) for c in found if not _has_weights(c.path)]
    if missing:
        raise CheckpointRunError(f"no safetensors weights in {', '.join(missing[:3])} (model.safetensors or an index); "
                                 "a checkpoint saved with save_only_model or a full save both have them")
    return found


def read_metrics(found: list[SFTCheckpoint], metric: str) -> None:
    """Fill each checkpoint's ``metrics`` from the trainer states (the newest that has the metric first)."""
    history: dict[int, dict] = {}
    for ckpt in sorted(found, key=lambda c: c.step or -1, reverse=True):
        state = ckpt.path / STATE_FILE
        if not state.is_file():
            continue
        try:
            log_history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
        except ValueError as err:
            raise CheckpointRunError(f"{state} is not valid JSON: {err}") from err
        for entry in log_history:
            if metric in entry and "step" in entry:
                history.setdefault(int(entry["step"]), {}).update({k: v for k, v in entry.items() if k.startswith("eval_")})
    for ckpt in found:
        ckpt.metrics = dict(history.get(ckpt.step, {})) if ckpt.step is not None else {}
    absent = [c.name for c in found if metric not in c.metrics]
    if absent:
        seen = sorted({k for v in history.values() for k in v})
        raise CheckpointRunError(
            f"no {metric!r} for {', '.join(absent[:4])} in the trainer states (metrics logged: "
            f"{', '.join(seen) or 'none'}); evaluate at every save (eval_strategy = save_strategy = 'steps'), choose "
            "another llm.rank_metric, or rank by evaluating each checkpoint: llm.rank_by=evaluate")


def rank(found: list[SFTCheckpoint], score: dict[str, float], greater_is_better: bool) -> list[SFTCheckpoint]:
    """Best first by ``score`` (checkpoint name → value); equal scores: the later step first."""
    return sorted(found, key=lambda c: ((score[c.name] if greater_is_better else -score[c.name]), c.step or 0),
                  reverse=True)
