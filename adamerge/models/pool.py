"""Where fine-tuned checkpoints come from: one safetensors vision-tower state dict per task."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adamerge.merging import check_compatible, check_finite
from adamerge.models.checkpoints import filled_keys, load_state_dict

StateDict = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def fill_pattern(pattern: str, **names: str) -> str:
    """``pattern`` with ``{task}`` (Python format) or ``%task`` (no shell or Hydra quoting needed:
    ``pool.pattern=ft_%task``) replaced; an unknown placeholder is named with the valid ones."""
    text = str(pattern)
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(f"%{name}", "{" + name + "}")
    try:
        return text.format(**names)
    except (KeyError, IndexError, ValueError) as err:
        valid = ", ".join(f"{{{n}}} / %{n}" for n in names)
        raise ValueError(f"file pattern {pattern!r} has an unknown or malformed placeholder ({err}); valid: {valid}. "
                         f"On the command line '{{task}}' needs quotes (pool.pattern=\"'ft_{{task}}'\"); %task does not.") from None


class MissingCheckpointError(FileNotFoundError):
    """Tasks without a fine-tuned checkpoint; the message lists which and where they were looked for."""


@dataclass
class CheckpointPool:
    """θ₀ (``pretrained``; ``None`` means the backbone's own weights) and θₖ per task.

    ``finetuned`` maps task names to files; tasks not in it are looked up as
    ``finetuned_dir / pattern.format(task=name)``. ``candidates`` lists further checkpoints of each
    task (e.g. the best two kept by fine-tuning, which Extrapolation Merging merges with each other);
    tasks not in it are globbed as ``finetuned_dir / candidates_pattern.format(task=name)``.
    """

    pretrained: str | Path | None = None
    finetuned: dict[str, str | Path] = field(default_factory=dict)
    finetuned_dir: str | Path | None = None
    pattern: str = "{task}.safetensors"
    candidates: dict[str, list[str | Path]] = field(default_factory=dict)
    candidates_pattern: str = "{task}/best-*.safetensors"
    filled: dict[str, frozenset] = field(default_factory=dict, init=False, repr=False)
    stored_dtypes: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)

    def path_for(self, task: str) -> Path | None:
        if task in self.finetuned:
            return Path(self.finetuned[task])
        if self.finetuned_dir is not None:
            return Path(self.finetuned_dir) / fill_pattern(self.pattern, task=task)
        return None

    def load(self, task_names: list[str], backbone_visual: torch.nn.Module) -> tuple[StateDict, dict[str, StateDict]]:
        """θ₀ and every θₖ, each checked against the backbone's vision tower before any merging."""
        reference = {k: v.detach() for k, v in backbone_visual.state_dict().items()}
        self._dtypes = {k: v.dtype for k, v in reference.items()}
        if self.pretrained is not None:
            theta0 = load_state_dict(self.pretrained)
            check_compatible(reference, theta0, source=f"pre-trained checkpoint {self.pretrained}")
            theta0 = self._admit(theta0, "pretrained", self.pretrained)
        else:
            theta0 = {k: v.clone() for k, v in reference.items()}
            check_finite(theta0, "the backbone's own vision tower (θ₀)", hint="Check the backbone's weight file.")
        paths = {t: self.path_for(t) for t in task_names}
        lacking = [f"{t} ({p})" if p else t for t, p in paths.items() if p is None or not p.exists()]
        if lacking:
            where = f" in {self.finetuned_dir}" if self.finetuned_dir else ""
            raise MissingCheckpointError(
                f"{len(lacking)} of {len(task_names)} tasks have no fine-tuned checkpoint{where}: {', '.join(lacking)}. "
                f"Provide one file per task (pool.finetuned.<task>=path or pool.finetuned_dir=DIR with "
                f"pool.pattern='{self.pattern}'), or merge fewer tasks (tasks.names=[...]).")
        finetuned = {}
        for task, path in paths.items():
            state = load_state_dict(path)
            check_compatible(theta0, state, source=f"fine-tuned checkpoint of {task!r} ({path})")
            finetuned[task] = self._admit(state, task, path)
            self.filled[task] = filled_keys(path)
        return theta0, finetuned

    def _admit(self, state: StateDict, name: str, path) -> StateDict:
        """Checked finite, then every floating tensor in the tower's own dtype (float32 for every backbone here): merges and
        evaluation then never mix an fp16/bf16 checkpoint with a float32 θ₀ or encoder. Widening is exact;
        what each file stored is kept in ``stored_dtypes`` (the run record says it)."""
        check_finite(state, f"checkpoint {path} ({name})", hint="Re-export or re-download that checkpoint; "
                     "adamerge refuses to merge it (one NaN weight gives a chance-level merge).")
        dtypes = getattr(self, "_dtypes", None) or {}
        stored = sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()})
        self.stored_dtypes[name] = stored
        out = {}
        for key, value in state.items():
            want = dtypes.get(key)
            out[key] = value.to(want) if want is not None and value.is_floating_point() and value.dtype != want else value
        changed = [k for k in out if out[k] is not state[k]]
        if changed:
            log.info("%s (%s) is stored in %s: merged and evaluated in %s, the tower's dtype", name, path,
                     "/".join(stored), str(dtypes[changed[0]]).replace("torch.", ""))
        return out


    def candidate_paths(self, task: str) -> list[Path]:
        """Every checkpoint of ``task`` beyond its main one, best first (sorted by name)."""
        if task in self.candidates:
            return [Path(p) for p in self.candidates[task]]
        if self.finetuned_dir is not None:
            return sorted(Path(self.finetuned_dir).glob(fill_pattern(self.candidates_pattern, task=task)))
        return []

    def load_candidates(self, task: str, theta0: StateDict, need: int = 2) -> list[StateDict]:
        """``need`` checkpoints of ``task`` (checked against θ₀), or an error saying where they were sought."""
        paths = self.candidate_paths(task)
        if len(paths) < need:
            where = (f"pool.candidates.{task}" if task in self.candidates else
                     f"{self.finetuned_dir}/{fill_pattern(self.candidates_pattern, task=task)}" if self.finetuned_dir else
                     f"pool.candidates.{task}")
            raise MissingCheckpointError(
                f"task {task!r} needs {need} fine-tuned checkpoints (e.g. the best two by validation accuracy, "
                f"which adamerge-finetune keeps) but {len(paths)} were found at {where}. Give them as "
                f"pool.candidates.{task}=[a.safetensors,b.safetensors].")
        states = []
        for i, path in enumerate(paths[:need]):
            state = load_state_dict(path)
            check_compatible(theta0, state, source=f"checkpoint of {task!r} ({path})")
            states.append(self._admit(state, f"{task}[{i}]", path))
        return states
