"""Extrapolation: ExPO (Zheng et al., arXiv 2404.16792) and Extrapolation Merging (Lin et al., arXiv 2503.04834).

ExPO moves a fine-tuned model further along its own direction from the base,
θ_ext = θ_ft + α (θ_ft − θ_base), i.e. task arithmetic with the single task vector scaled by 1 + α.
Extrapolation Merging extrapolates two checkpoints of one task (e.g. the best two of a fine-tuning
run) and interpolates between them, θ = β θ_ext,1 + (1 − β) θ_ext,2, with (α, β) chosen by a local
search (:mod:`adamerge.search`).
"""

from __future__ import annotations

from typing import Mapping

import torch

from adamerge.merging.task_vectors import add_scaled, mergeable_keys, task_vector

StateDict = Mapping[str, torch.Tensor]


def expo(finetuned: StateDict, base: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """θ_ft + α (θ_ft − θ_base); integer buffers are the fine-tuned model's."""
    return add_scaled(finetuned, task_vector(finetuned, base), alpha)


def interpolate(first: StateDict, second: StateDict, beta: float) -> dict[str, torch.Tensor]:
    """β θ₁ + (1 − β) θ₂ over floating-point tensors (integer buffers from ``first``)."""
    floats = set(mergeable_keys(first))
    return {k: (beta * v + (1.0 - beta) * second[k].to(v.dtype) if k in floats else v.clone())
            for k, v in first.items()}


def extrapolation_merge(first: StateDict, second: StateDict, base: StateDict, alpha: float,
                        beta: float) -> dict[str, torch.Tensor]:
    """β·ExPO(θ₁, α) + (1 − β)·ExPO(θ₂, α): the per-task step of Extrapolation Merging.

    Because ExPO is affine in θ_ft, this equals ExPO(β θ₁ + (1 − β) θ₂, α); computing it that way
    allocates one extrapolated model instead of two.
    """
    return expo(interpolate(first, second, beta), base, alpha)
