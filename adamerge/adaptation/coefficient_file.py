"""Learned coefficients as their own small file, so a run's result can be re-used without training.

The file records what the coefficients mean (method, granularity, task order, tensor names); loading
checks all of it, because a silently broadcast coefficient file merges the wrong model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adamerge.models.checkpoints import load_state_dict, save_state_dict


class CoefficientFileError(ValueError):
    """A coefficient file that does not belong to this merge (other tasks, tensors or shape)."""


def describe_trimming(trimming: dict | None) -> str:
    if not trimming:
        return "plain"
    return "TIES-trimmed (" + ", ".join(f"{k}={v}" for k, v in sorted(trimming.items())) + ")"


def save_coefficients(path: str | Path, lam: torch.Tensor, *, granularity: str, tasks: list[str],
                      layers: list[str], method: str, trimming: dict | None = None, step: int | None = None) -> Path:
    """Store λ as [K, L] (task-wise too, expanded) with its meaning in the safetensors metadata.

    ``trimming``: None for plain task vectors, else the TIES rule that made them (keep, count, zero_sign)."""
    meta = {"granularity": granularity, "tasks": json.dumps(list(tasks)), "layers": json.dumps(list(layers)),
            "method": method, "trimming": json.dumps(trimming, sort_keys=True), "step": json.dumps(step)}
    return save_state_dict(path, {"coefficients": lam.detach().float().cpu()}, metadata=meta)


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "trimming" in meta:
        trimming = json.loads(meta["trimming"])
    else:  # files written before the rule was recorded: plain, or trimmed by the old rule (round(n·k), strict >)
        keep = json.loads(meta.get("ties_keep", "null"))
        trimming = None if keep is None else {"keep": keep, "rule": "unrecorded (adamerge < 2026-12)"}
    return {"granularity": meta.get("granularity"), "method": meta.get("method"),
            "tasks": json.loads(meta.get("tasks", "[]")), "layers": json.loads(meta.get("layers", "[]")),
            "trimming": trimming, "step": json.loads(meta.get("step", "null"))}


def load_coefficients(path: str | Path, *, tasks: list[str], layers: list[str], granularity: str | None = None,
                      trimming: dict | None = None, clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """λ [K, L] for exactly this merge, or a :class:`CoefficientFileError` saying what differs.

    ``granularity`` and ``trimming`` (when granularity is given) must match too: λ learned on TIES-trimmed
    vectors (AdaMerging++) means something else on plain task vectors or on vectors trimmed by another rule.
    """
    state = load_state_dict(path)
    if "coefficients" not in state:
        raise CoefficientFileError(f"{path} holds no 'coefficients' tensor (keys: {sorted(state)})")
    lam, meta = state["coefficients"], read_metadata(path)
    problems = []
    if meta["tasks"] != list(tasks):
        problems.append(f"it was learned for tasks {meta['tasks']}, this run merges {list(tasks)}")
    if meta["layers"] != list(layers):
        missing = sorted(set(layers) - set(meta["layers"]))[:5]
        extra = sorted(set(meta["layers"]) - set(layers))[:5]
        problems.append(f"its {len(meta['layers'])} tensors differ from this backbone's {len(layers)} "
                        f"(missing e.g. {missing}, unexpected e.g. {extra})")
    if granularity is not None and meta["granularity"] != granularity:
        problems.append(f"it holds {meta['granularity']}-wise coefficients ({meta['method']}), this run is {granularity}-wise")
    if granularity is not None and (meta["trimming"] or None) != (trimming or None):
        problems.append(f"it was learned on {describe_trimming(meta['trimming'])} task vectors, this run uses "
                        f"{describe_trimming(trimming)} ones")
    if tuple(lam.shape) != (len(tasks), len(layers)):
        problems.append(f"shape {tuple(lam.shape)} ≠ ({len(tasks)} tasks, {len(layers)} tensors)")
    if not bool(torch.isfinite(lam).all()):
        problems.append(f"{int((~torch.isfinite(lam)).sum())} of its {lam.numel()} coefficients are NaN/Inf")
    elif clamp is not None and lam.numel() and (float(lam.min()) < clamp[0] or float(lam.max()) > clamp[1]):
        problems.append(f"its coefficients span [{float(lam.min()):.4g}, {float(lam.max()):.4g}], outside this run's "
                        f"clamp [{clamp[0]:g}, {clamp[1]:g}] (a run without a clamp learned them? set method.clamp=null "
                        f"to evaluate them as stored)")
    if problems:
        raise CoefficientFileError(f"coefficient file {path} does not fit this merge: " + "; ".join(problems))
    return lam
