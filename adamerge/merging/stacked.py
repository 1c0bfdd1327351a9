"""Task vectors stored as one [K, …] tensor per parameter, so re-merging is one fused op per tensor.

θ(λ) = θ₀ + Σₖ λₖₗ τₖ for every mergeable tensor l. An ``nn.Module`` only so that ``.to(device)``
moves the (non-persistent) buffers along; it has no trainable parameters and never enters a checkpoint.

``dtype`` stores the task vectors in half precision (bf16/fp16: half the memory, e.g. ~4.9 GB instead
of ~9.7 GB for ViT-L/14 with 8 tasks); the merge itself always runs in λ's precision (float32), even
inside an autocast region, so small coefficient updates are never rounded away.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from adamerge.merging.task_vectors import TaskVectorView
from adamerge.merging.ties import ties_by_key


class StackedTaskVectors(nn.Module):
    def __init__(self, base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]] | None,
                 task_names: Sequence[str] | None = None, dtype: torch.dtype | str | None = None, *,
                 stacks: Iterable[tuple[str, torch.Tensor]] | None = None):
        """From K task vectors, or from ``stacks``: ``(key, [K, …] tensor)`` pairs made one at a time, so that
        only one tensor's K vectors exist beside the stored ones (in ``dtype``) while building."""
        super().__init__()
        if stacks is None:
            if not vectors:
                raise ValueError("need at least one task vector")
            stacks = ((key, torch.stack([v[key] for v in vectors])) for key in list(vectors[0]))
        dtype = resolve_dtype(dtype)
        self.keys = []
        for i, (key, tv) in enumerate(stacks):
            self.keys.append(key)
            self.register_buffer(f"base_{i}", base[key].detach().clone(), persistent=False)
            tv = tv.detach()
            self.register_buffer(f"tv_{i}", tv.to(dtype) if dtype is not None else tv, persistent=False)
            del tv
        if not self.keys:
            raise ValueError("need at least one task vector")
        num = self.tv_0.shape[0]
        self.task_names = list(task_names) if task_names is not None else [f"task{i}" for i in range(num)]
        if len(self.task_names) != num:
            raise ValueError(f"{num} task vectors but {len(self.task_names)} task names")

    @classmethod
    def from_state_dicts(cls, pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                         task_names: Sequence[str] | None = None, ties_keep: float | None = None,
                         dtype: torch.dtype | str | None = None, ties_rule: dict | None = None) -> "StackedTaskVectors":
        """Build from θ₀ and θ₁..θ_K; with ``ties_keep`` the vectors are TIES-trimmed first (AdaMerging++),
        by the rule of :func:`~adamerge.merging.ties.ties_by_key` (``ties_rule``: its keyword arguments).

        τₖ is computed tensor by tensor (never K whole task vectors in float32 at once): for ViT-L/14 × 8
        that bounds the host memory of building to the checkpoints plus the stored vectors."""
        names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(finetuned))]
        if not finetuned:
            raise ValueError("need at least one task vector")
        if len(names) != len(finetuned):
            raise ValueError(f"{len(finetuned)} task vectors but {len(names)} task names")
        vectors = [TaskVectorView(ft, pretrained, source=f"fine-tuned checkpoint of {n!r}")
                   for ft, n in zip(finetuned, names)]
        if ties_keep is not None:
            stacks = ((key, trimmed * mask) for key, trimmed, mask in ties_by_key(vectors, keep=ties_keep,
                                                                                   **(ties_rule or {})))
        else:
            stacks = ((key, torch.stack([v[key] for v in vectors])) for key in vectors[0])
        return cls(pretrained, None, names, dtype=dtype, stacks=stacks)

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
        with torch.autocast(device_type=lam.device.type, enabled=False):
            for i, key in enumerate(self.keys):
                tv, base = self.vector(i), self.base(i)
                compute = torch.promote_types(lam.dtype, tv.dtype)
                if tv.dtype == compute:
                    delta = torch.tensordot(lam[:, i].to(compute), tv, dims=1)
                    merged[key] = base + delta.to(base.dtype)
                else:
                    merged[key] = _UpcastMerge.apply(lam[:, i].to(compute), tv, base)
        return merged

    def nbytes(self) -> int:
        """Bytes held by the task vectors (what ``dtype`` halves)."""
        return sum(self.vector(i).numel() * self.vector(i).element_size() for i in range(self.num_layers))


class _UpcastMerge(torch.autograd.Function):
    """base + Σₖ λₖ τₖ for half-precision τ, computed in λ's precision. Autograd's tensordot would save
    τ's float32 copy for its backward: the whole stack of every tensor, twice the half-precision storage,
    alive from the merge until the backward (for ViT-L/14 × 8: 9.7 GB beside the 4.9 GB stored). Here only
    τ itself is saved (a reference to the stored buffer) and each tensor is upcast again in backward."""

    @staticmethod
    def forward(ctx, lam: torch.Tensor, tv: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lam, tv)
        ctx.base_dtype = base.dtype
        return base + torch.tensordot(lam, tv.to(lam.dtype), dims=1).to(base.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lam, tv = ctx.saved_tensors
        grad_lam = torch.tensordot(tv.to(lam.dtype), grad.to(lam.dtype), dims=grad.dim()) \
            if ctx.needs_input_grad[0] else None
        return grad_lam, None, grad.to(ctx.base_dtype) if ctx.needs_input_grad[2] else None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a config string; unknown names list the valid ones."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown task-vector dtype {dtype!r}; valid: {', '.join(DTYPES)} (or null: as stored)")
    return DTYPES[dtype]
