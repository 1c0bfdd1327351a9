"""Learnable AdaMerging coefficients: one λ per task (task-wise) or per task and tensor (layer-wise).

The pre-trained model's coefficient is fixed at 1 (θ = θ₀ + Σ λ τ). As in the official code, λ is
clamped to [0, 1] in the forward pass by default; ``clamp=None`` leaves it free (FusionBench's setting).
"""

from __future__ import annotations

import torch
from torch import nn

GRANULARITIES = ("task", "layer")


class MergeCoefficients(nn.Module):
    def __init__(self, num_tasks: int, num_layers: int, granularity: str = "layer", init: float = 0.3,
                 clamp: tuple[float, float] | None = (0.0, 1.0)):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
        self.granularity, self.num_layers = granularity, num_layers
        self.clamp = tuple(clamp) if clamp is not None else None
        shape = (num_tasks,) if granularity == "task" else (num_tasks, num_layers)
        self.raw = nn.Parameter(torch.full(shape, float(init)))

    def forward(self) -> torch.Tensor:
        """λ as a [K, L] matrix (task-wise values broadcast over tensors)."""
        lam = self.raw if self.clamp is None else self.raw.clamp(*self.clamp)
        if lam.dim() == 1:
            lam = lam[:, None].expand(-1, self.num_layers)
        return lam

    @torch.no_grad()
    def at_bounds(self) -> int:
        """How many coefficients sit at (or beyond) a clamp bound — a sign of a saturated search."""
        if self.clamp is None:
            return 0
        lo, hi = self.clamp
        return int(((self.raw <= lo) | (self.raw >= hi)).sum())
