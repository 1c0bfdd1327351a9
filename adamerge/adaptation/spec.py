"""What λ is in one AdaMerging run, in one place: which tasks and tensors it multiplies, its granularity, its
initial value and clamp, and the TIES trimming of the vectors it scales. The spec creates the coefficients,
computes their values, writes them with their meaning and refuses to read (or resume) λ that means something
else — so a coefficient file, a checkpoint and the module can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from adamerge.adaptation.checkpointing import check_resume_checkpoint, checkpoint_identity
from adamerge.adaptation.coefficient_file import load_coefficients, save_coefficients
from adamerge.merging import MergeCoefficients
from adamerge.merging.coefficients import check_coefficient_spec


@dataclass(frozen=True)
class CoefficientSpec:
    tasks: tuple[str, ...]
    layers: tuple[str, ...]
    granularity: str = "layer"
    init: float = 0.3
    clamp: tuple[float, float] | None = (0.0, 1.0)
    trimming: dict | None = field(default=None, hash=False)
    method: str = "AdaMerging"

    def __post_init__(self):
        init, clamp = check_coefficient_spec(self.granularity, self.init, self.clamp)
        object.__setattr__(self, "init", init)
        object.__setattr__(self, "clamp", clamp)
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "layers", tuple(self.layers))

    def create(self) -> MergeCoefficients:
        """The trainable coefficients, at ``init``."""
        return MergeCoefficients(len(self.tasks), len(self.layers), self.granularity, self.init, self.clamp)

    def identity(self) -> dict:
        """What checkpoints record and a resume compares."""
        return checkpoint_identity(tasks=self.tasks, layers=self.layers, granularity=self.granularity,
                                   trimming=self.trimming, method=self.method)

    def save(self, path: str | Path, lam: torch.Tensor, step: int | None = None) -> Path:
        return save_coefficients(path, lam, granularity=self.granularity, tasks=list(self.tasks),
                                 layers=list(self.layers), method=self.method, trimming=self.trimming, step=step)

    def load(self, path: str | Path) -> torch.Tensor:
        """λ [K, L] of a coefficient file written for exactly this spec (finite, inside the clamp)."""
        return load_coefficients(path, tasks=list(self.tasks), layers=list(self.layers), granularity=self.granularity,
                                 trimming=self.trimming, clamp=self.clamp)

    def check_resume(self, ckpt_path: str | Path) -> dict:
        """Refuse a Lightning checkpoint of another adaptation (before anything trains)."""
        return check_resume_checkpoint(ckpt_path, self.identity())
