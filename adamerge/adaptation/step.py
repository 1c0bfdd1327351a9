"""One AdaMerging step, as a pure function: merge with λ, predict on every task's unlabelled batch, back-propagate
the summed entropy into λ. The LightningModule calls it; nothing here knows Lightning.

    loss(λ) = Σₖ b · H(softmax(f_{θ(λ)}(xₖ) · Wₖᵀ)),   θ(λ) = θ₀ + Σₖ λₖ τₖ   (per tensor for layer-wise λ)

with b the batches per task (the official code sums its 2 batch means) and H the mean entropy over xₖ.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.func import functional_call

from adamerge.merging import StackedTaskVectors, entropy_loss
from adamerge.models.heads import logits

FORWARD_MODES = ("concat", "per_task")


def entropy_step(visual: torch.nn.Module, stacked: StackedTaskVectors, lam: torch.Tensor,
                 images: Sequence[torch.Tensor], heads: Sequence[torch.Tensor], *, forward_mode: str = "concat",
                 batches_per_task: int = 1, entropy: str = "exact",
                 backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(loss, per-task mean entropy, per-task logits)``, all detached; λ's gradient is accumulated.

    ``concat``: every task's images through the merged encoder in one pass, one backward. ``per_task``: the
    merged weights become leaves, each task runs forward and backward alone (its activations freed before the
    next), then one backward carries the summed weight gradients through the merge: one task's peak memory,
    the same gradient. ``backward`` is Lightning's ``manual_backward`` in a run (precision, DDP)."""
    merged = stacked.merge(lam)
    if forward_mode == "concat":
        feats = functional_call(visual, merged, (torch.cat(list(images)),)).split([len(x) for x in images])
        outs = [logits(f, w) for f, w in zip(feats, heads)]
        entropies = [entropy_loss(o, entropy) for o in outs]
        backward(batches_per_task * torch.stack(entropies).sum())
    else:
        leaves = {k: v.detach().requires_grad_() for k, v in merged.items()}
        outs, entropies = [], []
        for x, w in zip(images, heads):
            out = logits(functional_call(visual, leaves, (x,)), w)
            h = entropy_loss(out, entropy)
            backward(batches_per_task * h)
            outs.append(out.detach())
            entropies.append(h.detach())
        keys = [k for k in merged if leaves[k].grad is not None]
        torch.autograd.backward([merged[k] for k in keys], [leaves[k].grad for k in keys])
    entropies = [h.detach() for h in entropies]
    return batches_per_task * torch.stack(entropies).sum(), entropies, [o.detach() for o in outs]
