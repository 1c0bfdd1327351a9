"""Checkpoint files: safetensors state dicts, written atomically, read with clear errors.

Nothing here ever unpickles: a pickled ``.pt``/``.ckpt`` is refused with a pointer to the converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adamerge.io import save_atomic

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used as it is."""


def save_state_dict(path: str | Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write ``state`` as safetensors via a temporary file + rename, so a crash never leaves half a file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    return save_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; refuse pickles and name the file when it is damaged."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} looks like a pickled checkpoint ({path.suffix}); adamerge never unpickles files. "
            f"Convert it once with: python scripts/convert_legacy_checkpoints.py {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a safetensors file ({err})") from err


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a safetensors file ({err})") from err


def filled_keys(path: str | Path) -> frozenset[str]:
    """Tensors a converter filled in from θ₀ because the source checkpoint lacked them (metadata
    ``filled_from_pretrained``): not part of what was fine-tuned, so outside TIES's trimming domain."""
    raw = read_metadata(path).get("filled_from_pretrained")
    return frozenset(json.loads(raw)) if raw else frozenset()
