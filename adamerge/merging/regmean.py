"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For a linear map y = x Wᵀ (W: out × in) fine-tuned K times, the W that best reproduces every model's
outputs on its own inputs Xₖ, min_W Σₖ ‖Xₖ Wᵀ − Xₖ Wₖᵀ‖², has the closed form

    Wᵀ = (Σₖ Gₖ)⁻¹ Σₖ Gₖ Wₖᵀ,        Gₖ = Xₖᵀ Xₖ  (in × in Gram matrix of the layer's inputs)

RegMean shrinks the off-diagonal part, G̃ = α G + (1 − α) diag(G), which regularises towards the plain
average (α = 0 gives Σₖ diag(Gₖ)-weighted means; identical Grams give exactly the average). Only the
Grams leave the data, hence "dataless". Non-linear parameters (biases, LayerNorms, embeddings) are
averaged. Grams are *mean* Grams here (Xᵀ X / rows), so tasks with more tokens do not weigh more.
"""

from __future__ import annotations

from typing import Collection, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

StateDict = Mapping[str, torch.Tensor]

#: open_clip's VisionTransformer applies ``proj`` as ``pooled @ proj``: an (in × out) matrix, i.e. Wᵀ.
OPEN_CLIP_INPUT_MAJOR = ("proj",)


class SingularGramError(ValueError):
    """Σₖ G̃ₖ of some layer cannot be inverted, with the layer named."""


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries scaled by α, the diagonal kept."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean alpha must be in [0, 1], got {alpha}")
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_linear(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 0.9,
                   input_major: bool = False, name: str = "weight") -> torch.Tensor:
    """Merged weight of one linear map from K weights and their input Grams (solved in float64).

    ``input_major=False``: weights are (out × in), used as x Wᵀ (nn.Linear, in_proj_weight).
    ``input_major=True``: weights are (in × out), used as x W (open_clip's ``visual.proj``).
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"{name}: need one Gram per weight, got {len(weights)} weights and {len(grams)} Grams")
    dtype = weights[0].dtype
    w_t = [(w if input_major else w.T).double() for w in weights]  # each (in × out)
    reduced = [reduce_off_diagonal(g.double(), alpha) for g in grams]
    if reduced[0].shape[0] != w_t[0].shape[0]:
        raise ValueError(f"{name}: Gram is {tuple(grams[0].shape)} but the weight has {w_t[0].shape[0]} inputs "
                         f"(input_major={input_major}; is the layout right?)")
    lhs = sum(reduced)
    rhs = sum(g @ w for g, w in zip(reduced, w_t))
    try:
        merged_t = torch.linalg.solve(lhs, rhs)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise SingularGramError(
            f"RegMean: the summed Gram of {name!r} ({lhs.shape[0]}×{lhs.shape[0]}) is singular — some input "
            f"dimension never varies in the data. Use more examples (method.num_examples) or a smaller "
            f"off-diagonal ratio (method.alpha < 1).") from err
    return (merged_t if input_major else merged_t.T).to(dtype)


def regmean_merge(models: Sequence[StateDict], grams: Sequence[Mapping[str, torch.Tensor]], alpha: float = 0.9,
                  input_major: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """RegMean over state dicts: tensors with a Gram in every model are merged by :func:`regmean_linear`;
    other floating-point tensors are averaged; integer buffers come from the first model."""
    if not models or len(models) != len(grams):
        raise ValueError(f"need one Gram dict per model and at least one model; got {len(models)} models, "
                         f"{len(grams)} Gram dicts")
    unknown = set().union(*(g.keys() for g in grams)) - models[0].keys()
    if unknown:
        raise KeyError(f"Grams for tensors the models do not have: {sorted(unknown)[:8]}")
    out = {}
    for key, value in models[0].items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif all(key in g for g in grams):
            out[key] = regmean_linear([m[key] for m in models], [g[key] for g in grams], alpha,
                                      input_major=key in input_major, name=key)
        else:
            out[key] = torch.stack([m[key].to(value.dtype) for m in models]).mean(0)
    return out


class _GramAccumulator:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.busy = False  # set while re-running a sub-module to read an internal input: hooks stay quiet

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        gram = x.T @ x
        self.sums[key] = self.sums[key] + gram if key in self.sums else gram
        self.rows[key] = self.rows.get(key, 0) + x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {k: (s / self.rows[k]).float() for k, s in self.sums.items()}


def _attention_hook(acc: _GramAccumulator, name: str):
    """Grams of ``in_proj_weight`` (input: the query) and ``out_proj`` (input: the attention output).

    nn.MultiheadAttention applies out_proj inside a functional kernel, so its input is read by re-running
    the module with out_proj replaced by the identity — the module's own code path, masks included.
    """
    def hook(module: nn.MultiheadAttention, args, kwargs, output):
        if acc.busy:
            return
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        if key is not query:
            raise ValueError(f"RegMean: {name} is not self-attention (key differs from query); the Gram of its "
                             f"in_proj_weight would mix two inputs")
        if module.in_proj_weight is not None:
            acc.add(f"{name}.in_proj_weight", query)
        dim = module.out_proj.weight.shape[1]
        eye = torch.eye(dim, dtype=query.dtype, device=query.device)
        identity = {"out_proj.weight": eye, "out_proj.bias": torch.zeros(dim, dtype=query.dtype, device=query.device)}
        acc.busy = True
        try:
            attended = functional_call(module, identity, args, kwargs)[0]
        finally:
            acc.busy = False
        acc.add(f"{name}.out_proj.weight", attended)
    return hook


def _linear_hook(acc: _GramAccumulator, key: str):
    def hook(module, args, kwargs):
        if not acc.busy:
            acc.add(key, args[0] if args else kwargs["input"])
    return hook


def _projection_hook(acc: _GramAccumulator):
    """Gram of open_clip's ``proj`` (pooled @ proj): the tower re-run with proj = I returns the pooled input."""
    def hook(module, args, kwargs, output):
        if acc.busy:
            return
        proj = module.proj
        eye = torch.eye(proj.shape[0], dtype=proj.dtype, device=proj.device)
        acc.busy = True
        try:
            pooled = functional_call(module, {"proj": eye}, args, kwargs)
        finally:
            acc.busy = False
        acc.add("proj", pooled[0] if isinstance(pooled, tuple) else pooled)
    return hook


@torch.no_grad()
def collect_input_grams(module: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean input Gram (Xᵀ X / rows, tokens counted as rows) of every linear map of ``module`` over ``batches``.

    Keys are the weights' state-dict names: each ``nn.Linear``'s ``.weight``, each ``nn.MultiheadAttention``'s
    ``in_proj_weight`` and ``out_proj.weight``, and a root tensor ``proj`` applied as ``x @ proj`` (open_clip's
    vision tower; see :data:`OPEN_CLIP_INPUT_MAJOR`). Runs the module in eval mode and restores its mode.
    """
    acc = _GramAccumulator()
    handles = []
    attention_names = [n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(sub, nn.MultiheadAttention):
            handles.append(sub.register_forward_hook(_attention_hook(acc, name), with_kwargs=True))
        elif isinstance(sub, nn.Linear) and not any(name.startswith(a + ".") for a in attention_names):
            handles.append(sub.register_forward_pre_hook(_linear_hook(acc, f"{prefix}weight"), with_kwargs=True))
    if isinstance(getattr(module, "proj", None), torch.Tensor) and module.proj.dim() == 2:
        handles.append(module.register_forward_hook(_projection_hook(acc), with_kwargs=True))
    was_training = module.training
    module.eval()
    seen = False
    try:
        for x in batches:
            module(x)
            seen = True
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    if not seen:
        raise ValueError("cannot collect RegMean Grams from no data: the batches were empty")
    return acc.result()
