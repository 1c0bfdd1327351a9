"""Weight averaging (model soups / Wortsman et al.): θ = (1/K) Σₖ θₖ."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from adamerge.merging.task_vectors import check_compatible


def weight_average(finetuned: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of the floating-point tensors; integer buffers are taken from the first model."""
    if not finetuned:
        raise ValueError("weight_average needs at least one model")
    first = finetuned[0]
    for i, other in enumerate(finetuned[1:], start=2):
        check_compatible(first, other, source=f"model #{i}")
    out = {}
    for key, value in first.items():
        if value.is_floating_point():
            out[key] = torch.stack([m[key].to(value.dtype) for m in finetuned]).mean(0)
        else:
            out[key] = value.clone()
    return out
