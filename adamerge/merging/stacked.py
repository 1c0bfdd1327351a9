"""Task vectors stored as one [K, …] tensor per parameter, so re-merging is one fused op per tensor.

θ(λ) = θ₀ + Σₖ λₖₗ τₖ for every mergeable tensor l. An ``nn.Module`` only so that ``.to(device)``
moves the (non-persistent) buffers along; it has no trainable parameters and never enters a checkpoint.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from adamerge.merging.task_vectors import mergeable_keys, task_vector
from adamerge.merging.ties import ties_task_vectors


class StackedTaskVectors(nn.Module):
    def __init__(self, base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
                 task_names: Sequence[str] | None = None):
        super().__init__()
        if not vectors:
            raise ValueError("need at least one task vector")
        self.keys = list(vectors[0])
        self.task_names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(vectors))]
        if len(self.task_names) != len(vectors):
            raise ValueError(f"{len(vectors)} task vectors but {len(self.task_names)} task names")
        for i, key in enumerate(self.keys):
            self.register_buffer(f"base_{i}", base[key].detach().clone(), persistent=False)
            self.register_buffer(f"tv_{i}", torch.stack([v[key] for v in vectors]).detach(), persistent=False)

    @classmethod
    def from_state_dicts(cls, pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                         task_names: Sequence[str] | None = None, ties_keep: float | None = None) -> "StackedTaskVectors":
        """Build from θ₀ and θ₁..θ_K; with ``ties_keep`` the vectors are TIES-trimmed first (AdaMerging++)."""
        names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(finetuned))]
        vectors = [task_vector(ft, pretrained, source=f"fine-tuned checkpoint of {n!r}") for ft, n in zip(finetuned, names)]
        if ties_keep is not None:
            vectors = ties_task_vectors(vectors, keep=ties_keep)
        return cls({k: pretrained[k] for k in mergeable_keys(pretrained)}, vectors, names)

    @property
    def num_tasks(self) -> int:
        return self.tv_0.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def vector(self, i: int) -> torch.Tensor:
        return getattr(self, f"tv_{i}")

    def base(self, i: int) -> torch.Tensor:
        return getattr(self, f"base_{i}")

    def merge(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors for coefficients ``lam`` of shape [K] (task-wise) or [K, L] (layer-wise)."""
        if lam.dim() == 1:
            lam = lam[:, None].expand(-1, self.num_layers)
        if tuple(lam.shape) != (self.num_tasks, self.num_layers):
            raise ValueError(f"coefficients of shape {tuple(lam.shape)} do not fit {self.num_tasks} tasks × "
                             f"{self.num_layers} tensors")
        merged = {}
        for i, key in enumerate(self.keys):
            tv = self.vector(i)
            merged[key] = self.base(i) + torch.tensordot(lam[:, i].to(tv.dtype), tv, dims=1).to(self.base(i).dtype)
        return merged
