"""Read legacy pickled checkpoints (task-vectors / AdaMerging ``zeroshot.pt``, ``<Task>/finetuned.pt``)
without importing the code that pickled them.

Those files are whole pickled modules (``src.modeling.ImageEncoder`` around an old open_clip
``CLIP``). Here every class the pickle names, except torch's tensor machinery, becomes an inert
stand-in that only records its attributes; parameters and buffers are then collected from the
stand-ins' ``_parameters`` / ``_buffers`` / ``_modules``. No foreign code runs. This module is the
only place in adamerge that unpickles, and only :mod:`scripts.convert_legacy_checkpoints` calls it.
"""

from __future__ import annotations

import pickle
import types
from collections import OrderedDict
from pathlib import Path

import torch

# What a pickle may resolve to for real: tensor rebuilding and plain containers. Anything else is a stand-in.
_ALLOWED = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("builtins", "getattr"), ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
}
_ALLOWED_PREFIXES = ("torch._utils", "torch._tensor", "torch.storage", "torch.serialization")


class LegacyObject:
    """Stand-in for any class a legacy pickle names: keeps the state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self._legacy_args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._legacy_state = state


def _stand_in(module: str, name: str) -> type:
    return type(name, (LegacyObject,), {"__module__": f"legacy.{module}"})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "__builtin__":  # protocol-2 pickles spell builtins the Python 2 way
            module = "builtins"
        if (module, name) in _ALLOWED or module.startswith(_ALLOWED_PREFIXES):
            return super().find_class(module, name)
        if module == "torch" and name.endswith("Storage"):
            return super().find_class(module, name)
        if module == "torch" and name in {"float32", "float16", "bfloat16", "float64", "int64", "int32", "bool", "uint8"}:
            return super().find_class(module, name)
        return _stand_in(module, name)


legacy_pickle = types.ModuleType("adamerge_legacy_pickle")
legacy_pickle.Unpickler = _Unpickler
legacy_pickle.load = lambda f, **kw: _Unpickler(f, **kw).load()
legacy_pickle.__name__ = "adamerge_legacy_pickle"


def collect_tensors(obj, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """Parameters and buffers of a (stand-in) module tree, with dotted names as ``state_dict`` gives them."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
        return out
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):  # already a state dict
            for k, v in obj.items():
                out[prefix + k] = v
            return out
        for k, v in obj.items():
            out.update(collect_tensors(v, f"{prefix}{k}."))
        return out
    state = getattr(obj, "__dict__", {})
    non_persistent = state.get("_non_persistent_buffers_set", set()) or set()
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is not None and not (kind == "_buffers" and name in non_persistent):
                out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(collect_tensors(child, f"{prefix}{name}."))
    return out


def read_legacy_checkpoint(path: str | Path) -> "OrderedDict[str, torch.Tensor]":
    """Every tensor of a legacy pickled module or state dict, as a flat state dict."""
    obj = torch.load(str(path), map_location="cpu", pickle_module=legacy_pickle, weights_only=False)
    tensors = collect_tensors(obj)
    if not tensors:
        raise ValueError(f"{path}: no tensors found in the pickled object ({type(obj).__name__})")
    return OrderedDict((k, v.clone() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items())


def vision_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``visual.`` sub-tree (keys relative to it), wherever the wrapper put it (``model.visual.`` …)."""
    marker = "visual."
    prefixes = {k[: k.index(marker) + len(marker)] for k in state if marker in k}
    if not prefixes:
        raise ValueError(f"no vision tower ('…visual.*' keys) among {len(state)} tensors, e.g. {sorted(state)[:5]}")
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
