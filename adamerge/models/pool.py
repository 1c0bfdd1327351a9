"""Where fine-tuned checkpoints come from: one safetensors vision-tower state dict per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from adamerge.merging import check_compatible
from adamerge.models.checkpoints import load_state_dict

StateDict = dict[str, torch.Tensor]


class MissingCheckpointError(FileNotFoundError):
    """Tasks without a fine-tuned checkpoint; the message lists which and where they were looked for."""


@dataclass
class CheckpointPool:
    """θ₀ (``pretrained``; ``None`` means the backbone's own weights) and θₖ per task.

    ``finetuned`` maps task names to files; tasks not in it are looked up as
    ``finetuned_dir / pattern.format(task=name)``.
    """

    pretrained: str | Path | None = None
    finetuned: dict[str, str | Path] = field(default_factory=dict)
    finetuned_dir: str | Path | None = None
    pattern: str = "{task}.safetensors"

    def path_for(self, task: str) -> Path | None:
        if task in self.finetuned:
            return Path(self.finetuned[task])
        if self.finetuned_dir is not None:
            return Path(self.finetuned_dir) / self.pattern.format(task=task)
        return None

    def load(self, task_names: list[str], backbone_visual: torch.nn.Module) -> tuple[StateDict, dict[str, StateDict]]:
        """θ₀ and every θₖ, each checked against the backbone's vision tower before any merging."""
        reference = {k: v.detach() for k, v in backbone_visual.state_dict().items()}
        if self.pretrained is not None:
            theta0 = load_state_dict(self.pretrained)
            check_compatible(reference, theta0, source=f"pre-trained checkpoint {self.pretrained}")
        else:
            theta0 = {k: v.clone() for k, v in reference.items()}
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
            finetuned[task] = state
        return theta0, finetuned


def embedded_checkpoint_pool(cache_dir: str, preset: str = "demo", seed: int = 0) -> CheckpointPool:
    """The pool of the embedded offline world (built and cached on first use)."""
    from adamerge.embedded.world import embedded_pool

    found = embedded_pool(cache_dir, preset=preset, seed=seed)
    return CheckpointPool(pretrained=found["pretrained"], finetuned=dict(found["finetuned"]))
