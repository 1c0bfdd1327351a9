"""Task arithmetic (Ilharco et al., ICLR 2023): θ = θ₀ + λ Σₖ τₖ."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from adamerge.merging.task_vectors import add_scaled


def sum_vectors(vectors: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not vectors:
        raise ValueError("need at least one task vector")
    total = {}
    for k in vectors[0]:  # accumulated in place: no [K, …] stack, one pass per vector
        acc = vectors[0][k].clone() if len(vectors) == 1 else vectors[0][k] + vectors[1][k]
        for v in vectors[2:]:
            acc.add_(v[k])
        total[k] = acc
    return total


def task_arithmetic(pretrained: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
                    lam: float = 0.3) -> dict[str, torch.Tensor]:
    """One shared scaling λ for every task vector (the paper's baseline uses λ = 0.3)."""
    return add_scaled(pretrained, sum_vectors(vectors), lam)
