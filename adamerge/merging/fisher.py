"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging").

Each model is a Laplace approximation of a posterior with diagonal precision Fₖ (its Fisher
information); the merge maximising the joint posterior is the per-entry precision-weighted mean

    θ = Σₖ λₖ Fₖ θₖ / Σₖ λₖ Fₖ          (λₖ: model weights, uniform by default)

The diagonal Fisher is estimated on *unlabelled* inputs with the model's own predictive distribution
— no labels are needed, which is why it fits the AdaMerging protocol:

    expected (default, Matena & Raffel's code for classifiers):  F = 1/N Σᵢ Σ_y p(y|xᵢ) (∇ log p(y|xᵢ))²
    sampled  (one label per input):                               F = 1/N Σᵢ (∇ log p(ŷᵢ|xᵢ))²,  ŷᵢ ~ p(·|xᵢ)

Both are per-example squared gradients (the Fisher is an expectation of outer products of per-example
scores, so squaring a batch-summed gradient — as FusionBench/MergeLM do — is a different, cheaper
quantity). Pure functions: the model enters as a callable over a parameter dict.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]
LogProbs = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]

FISHER_MODES = ("expected", "sampled")
FALLBACKS = ("average", "pretrained")


def diagonal_fisher(log_probs: LogProbs, params: StateDict, batches: Iterable[torch.Tensor], mode: str = "expected",
                    generator: torch.Generator | None = None, chunk_size: int = 32) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every tensor in ``params`` at those values, over the inputs in ``batches``.

    ``log_probs(params, x)`` returns log p(y|x) of shape [B, C] and must treat the examples of a batch
    independently (true of a ViT in eval mode). One forward per batch; per-example (and per-class)
    gradients come from one batched backward per ``chunk_size`` (example, class) pairs, which bounds
    memory at ``chunk_size`` × the parameter count. ``generator`` (CPU) seeds the labels of ``sampled``.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; valid: {', '.join(FISHER_MODES)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_(True) for k in names]
    fisher = [torch.zeros_like(leaf) for leaf in leaves]
    count = 0
    for x in batches:
        lp = log_probs(dict(zip(names, leaves)), x)
        if lp.dim() != 2:
            raise ValueError(f"log_probs must return [batch, classes], got shape {tuple(lp.shape)}")
        n, c = lp.shape
        prob = lp.detach().exp()
        if mode == "expected":
            rows = torch.arange(n).repeat_interleave(c)
            cols = torch.arange(c).repeat(n)
            weights = prob.reshape(-1)
        else:
            rows = torch.arange(n)
            cols = torch.multinomial(prob.float().cpu(), 1, generator=generator).squeeze(1)
            weights = torch.ones(n, dtype=prob.dtype, device=prob.device)
        for start in range(0, len(rows), chunk_size):
            r, k = rows[start:start + chunk_size], cols[start:start + chunk_size]
            picks = torch.zeros(len(r), n, c, dtype=lp.dtype, device=lp.device)
            picks[torch.arange(len(r)), r, k] = 1.0
            grads = torch.autograd.grad(lp, leaves, grad_outputs=picks, is_grads_batched=True, retain_graph=True,
                                        materialize_grads=True)
            w = weights[start:start + chunk_size]
            for f, g in zip(fisher, grads):
                f += torch.tensordot(w.to(g.dtype), g.square(), dims=1)
        count += n
    if count == 0:
        raise ValueError("cannot estimate a Fisher from no data: the batches were empty")
    return {k: f / count for k, f in zip(names, fisher)}


def fisher_merge(models: Sequence[StateDict], fishers: Sequence[StateDict], weights: Sequence[float] | None = None,
                 epsilon: float = 1e-6, normalize: bool = False, fallback: str = "average",
                 pretrained: StateDict | None = None) -> dict[str, torch.Tensor]:
    """θ = Σₖ λₖ F̃ₖ θₖ / Σₖ λₖ F̃ₖ entry by entry.

    ``fallback="average"``: F̃ = F + ε (Matena & Raffel's Fisher floor), so where every Fisher vanishes the
    entry becomes the λ-weighted average. ``fallback="pretrained"``: F̃ = F, and entries with Σ λₖFₖ ≤ ε take
    θ₀ (no model has information there, so keep the pre-trained value). ``normalize`` divides each model's
    Fisher by its global L2 norm first (FusionBench's default), so no model dominates by scale alone.
    Floating-point tensors without a Fisher are λ-averaged; integer buffers come from the first model.
    """
    if not models or len(models) != len(fishers):
        raise ValueError(f"need one Fisher per model and at least one model; got {len(models)} models, "
                         f"{len(fishers)} Fishers")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown Fisher fallback {fallback!r}; valid: {', '.join(FALLBACKS)}")
    if fallback == "pretrained" and pretrained is None:
        raise ValueError("fallback='pretrained' needs the pre-trained state dict (pretrained=θ₀)")
    weights = [1.0 / len(models)] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"{len(weights)} model weights for {len(models)} models")
    scales = [1.0] * len(models)
    if normalize:
        norms = [torch.sqrt(sum(f.double().square().sum() for f in fisher.values())) for fisher in fishers]
        scales = [1.0 / float(n) if n > 0 else 1.0 for n in norms]
    out = {}
    first = models[0]
    for key, value in first.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        thetas = [m[key].to(value.dtype) for m in models]
        if not all(key in f for f in fishers):
            out[key] = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
            continue
        precisions = [w * s * f[key].to(value.dtype) for w, s, f in zip(weights, scales, fishers)]
        if fallback == "average":
            precisions = [p + w * epsilon for p, w in zip(precisions, weights)]
        total = sum(precisions)
        merged = sum(p * t for p, t in zip(precisions, thetas)) / total.clamp(min=torch.finfo(value.dtype).tiny)
        if fallback == "pretrained":
            merged = torch.where(total > epsilon, merged, pretrained[key].to(value.dtype))
        out[key] = merged
    return out
