"""Learnable AdaMerging coefficients: one λ per task (task-wise) or per task and tensor (layer-wise).

The pre-trained model's coefficient is fixed at 1 (θ = θ₀ + Σ λ τ). As in the official code, λ is
clamped to [0, 1] in the forward pass by default; ``clamp=None`` leaves it free (FusionBench's setting).
"""

from __future__ import annotations

import torch
from torch import nn

import math

GRANULARITIES = ("task", "layer")


def check_coefficient_spec(granularity: str, init: float, clamp) -> tuple[float, tuple[float, float] | None]:
    """``(init, clamp)`` as floats, or a ValueError: an init outside the clamp (or on a bound) has zero
    gradient through the clamp, so λ would never move and the run would record θ₀ or a saturated merge."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    init = float(init)
    if not math.isfinite(init):
        raise ValueError(f"method.init={init}: the initial coefficient must be finite (the paper's is 0.3)")
    if clamp is None:
        return init, None
    if len(clamp) != 2:
        raise ValueError(f"method.clamp={list(clamp)}: give [lo, hi] or null (no clamp)")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"method.clamp=[{lo:g}, {hi:g}]: needs finite lo < hi (e.g. [0, 1], the official code's), "
                         f"or null for none")
    if not lo < init < hi:
        raise ValueError(f"method.init={init:g} lies {'on' if init in (lo, hi) else 'outside'} the clamp [{lo:g}, {hi:g}]: "
                         f"the clamp's gradient is 0 there, so λ would never move. Choose an init strictly inside it.")
    return init, (lo, hi)


class MergeCoefficients(nn.Module):
    def __init__(self, num_tasks: int, num_layers: int, granularity: str = "layer", init: float = 0.3,
                 clamp: tuple[float, float] | None = (0.0, 1.0)):
        super().__init__()
        init, clamp = check_coefficient_spec(granularity, init, clamp)
        self.granularity, self.num_layers = granularity, num_layers
        self.clamp = clamp
        shape = (num_tasks,) if granularity == "task" else (num_tasks, num_layers)
        self.raw = nn.Parameter(torch.full(shape, float(init)))

    def forward(self) -> torch.Tensor:
        """λ as a [K, L] matrix (task-wise values broadcast over tensors)."""
        return self.values(self.raw)

    def values(self, raw: torch.Tensor) -> torch.Tensor:
        """λ [K, L] of raw parameters ``raw`` (this module's, or a saved copy of them): clamped, broadcast."""
        lam = raw if self.clamp is None else raw.clamp(*self.clamp)
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
