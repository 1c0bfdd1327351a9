"""Task vectors τₖ = θₖ − θ₀ over state dicts (Ilharco et al., 2023)."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


class CheckpointMismatchError(ValueError):
    """A fine-tuned checkpoint that does not fit the pre-trained one, with the offending tensors named."""


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_compatible(pretrained: StateDict, finetuned: StateDict, source: str = "fine-tuned checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming every missing, extra, reshaped or retyped tensor."""
    problems = []
    missing = pretrained.keys() - finetuned.keys()
    extra = finetuned.keys() - pretrained.keys()
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {_listing(extra)}")
    shared = pretrained.keys() & finetuned.keys()
    shapes = [f"{k} {tuple(finetuned[k].shape)} vs {tuple(pretrained[k].shape)}"
              for k in sorted(shared) if finetuned[k].shape != pretrained[k].shape]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (checkpoint vs backbone): {'; '.join(shapes[:8])}")
    dtypes = [f"{k} {finetuned[k].dtype} vs {pretrained[k].dtype}" for k in sorted(shared)
              if finetuned[k].shape == pretrained[k].shape
              and finetuned[k].is_floating_point() != pretrained[k].is_floating_point()]
    if dtypes:
        problems.append(f"{len(dtypes)} dtype mismatch(es): {'; '.join(dtypes[:8])}")
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit the pre-trained backbone — " + " | ".join(problems)
            + ". Is it from the same architecture (e.g. ViT-B-32 vs ViT-B-16) and a vision-tower state dict?")


def all_finite(value: torch.Tensor) -> bool:
    """True when every entry is finite. A finite sum implies it (an inf or NaN entry makes the sum inf or NaN), and
    a sum is much cheaper than the elementwise test; only a non-finite sum (which an overflow could also give)
    falls back to it."""
    if not value.is_floating_point() or value.numel() == 0:
        return True
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


class NonFiniteTensorError(ValueError):
    """A tensor with NaN or Inf entries where a merge reads or writes weights, named with its source."""


def check_finite(state: StateDict, source: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteTensorError` naming every floating tensor of ``state`` with NaN/Inf entries.

    A single NaN weight turns a merge into chance-level accuracy that would otherwise be recorded."""
    bad = []
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            bad.append(f"{key} ({count} of {value.numel()} entries)")
    if bad:
        raise NonFiniteTensorError(f"{source} holds non-finite values (NaN/Inf) in {len(bad)} tensor(s): "
                                   f"{', '.join(bad[:6])}{' …' if len(bad) > 6 else ''}. {hint}".rstrip())


def mergeable_keys(state: StateDict) -> list[str]:
    """Keys that merging touches: floating-point tensors, in state-dict order. Integer buffers stay θ₀'s."""
    return [k for k, v in state.items() if v.is_floating_point()]


def task_vector(finetuned: StateDict, pretrained: StateDict, source: str = "fine-tuned checkpoint") -> dict[str, torch.Tensor]:
    """τ = θ_ft − θ₀ over the floating-point tensors (computed in θ₀'s dtype)."""
    check_compatible(pretrained, finetuned, source)
    return {k: finetuned[k].to(pretrained[k].dtype) - pretrained[k] for k in mergeable_keys(pretrained)}


class TaskVectorView(Mapping[str, torch.Tensor]):
    """τ = θ_ft − θ₀ computed tensor by tensor on access, after the same checks as :func:`task_vector`:
    code that walks tensors one at a time (stacking, TIES) then never holds K whole vectors."""

    def __init__(self, finetuned: StateDict, pretrained: StateDict, source: str = "fine-tuned checkpoint",
                 keys: Sequence[str] | None = None):
        """``keys``: the floating-point keys, given by a caller that has checked the layouts already (lazy
        model directories, whose tensors would otherwise all be read to be checked)."""
        if keys is None:
            check_compatible(pretrained, finetuned, source)
        self.finetuned, self.pretrained = finetuned, pretrained
        self.keys_ = mergeable_keys(pretrained) if keys is None else list(keys)
        self._known = None if keys is None else frozenset(self.keys_)

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._known is not None:
            if key not in self._known:
                raise KeyError(key)
        elif key not in self.pretrained or not self.pretrained[key].is_floating_point():
            raise KeyError(key)
        return self.finetuned[key].to(self.pretrained[key].dtype) - self.pretrained[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def add_scaled(pretrained: StateDict, vector: StateDict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """θ₀ + scale·τ; keys absent from τ (integer buffers) are copied from θ₀."""
    return {k: (v + scale * vector[k] if k in vector else v.clone()) for k, v in pretrained.items()}
