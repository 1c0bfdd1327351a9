"""Let torchvision import when its compiled extension cannot load.

Why this exists: a CPU-only torch paired with the registry's CUDA build of torchvision (the only
torchvision that pins torch 2.13.0) cannot load ``torchvision/_C.so``. torchvision tolerates that,
but its ``_meta_registrations`` then registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms``, which fail with ``RuntimeError: operator torchvision::nms does not exist`` —
and that breaks ``import torchvision``, ``lightning``, ``torchmetrics`` and ``open_clip``.

What it does: before torchvision is first imported, it loads the extension exactly as torchvision
would (``torch.ops.load_library``). Where that works (every machine with a matching torchvision,
all GPU boxes) nothing else happens. Where it fails, it declares the two operator *schemas* so that
the fake-kernel registrations succeed. Transforms, datasets and models then work; ``ops.nms`` and
``torchvision.io`` decoding stay unavailable (adamerge loads images with PIL and never uses them).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

# Schemas as torchvision's C++ extension declares them (csrc/ops/nms.cpp, quantized qnms).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in sorted(Path(folder).glob("_C*")):
            if candidate.suffix in {".so", ".pyd", ".dylib"}:
                return candidate
    return None


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def declare_missing_schemas() -> list[str]:
    """Declare the torchvision schemas that no loaded library provides; return the names declared."""
    global _library
    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    if missing:
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _library.define(_SCHEMAS[name])
    return missing


def ensure_torchvision_importable() -> str:
    """Make ``import torchvision`` work; return what was done: 'untouched', 'extension' or 'schemas'."""
    if "torchvision" in sys.modules:  # someone imported it already: too late or not needed
        return "untouched"
    path = _extension_path()
    if path is None:  # torchvision not installed: nothing to repair
        return "untouched"
    try:
        torch.ops.load_library(str(path))
        return "extension"
    except (OSError, ImportError, RuntimeError):
        declare_missing_schemas()
        return "schemas"
