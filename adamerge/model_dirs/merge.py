"""Merge model directories into a new one, tensor by tensor, written atomically and self-documented.

The output has the base's layout (one ``model.safetensors``, or the base's shard files and an index),
the base's dtype per tensor (the math runs in float32, or float64 for float64 tensors), the base's
non-float tensors unchanged, the non-weight files (config, generation config, tokenizer, licence) of
the base or of ``copy_from``, and a ``merge_config.json`` saying how it was made. Everything is written
into a hidden temporary folder beside the output and renamed into place at the end, so an error or an
interrupt never leaves a half-written model behind. Peak memory: one output shard plus K + 1 copies
of one tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file

import adamerge
from adamerge.io import atomic_dir
from adamerge.model_dirs.layout import INDEX_FILE, SINGLE_FILE, ModelDir, ModelDirError, check_same_tensors
from adamerge.model_dirs.methods import get_method

MERGE_CONFIG = "merge_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx", ".gguf")
NOT_COPIED = {MERGE_CONFIG, "README.md", "trainer_state.json"}  # the model card describes another model


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def files_to_copy(folder: Path) -> list[Path]:
    """Top-level files that describe the model but are not weights: config.json, tokenizer files, licence…"""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in NOT_COPIED
                  and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json"))


def _check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    resolved = out.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if folder == resolved or resolved in folder.parents:
            raise ModelDirError(f"--out {out} would replace input directory {folder}; choose a new output folder")
    if out.exists() and not force:
        raise ModelDirError(f"output {out} already exists; choose another --out or pass --force to replace it")


def merge_tensor(key: str, base: torch.Tensor, models: Sequence[torch.Tensor], method, params: dict) -> torch.Tensor:
    """One merged tensor in the base's dtype; non-float tensors are the base's."""
    if not base.is_floating_point():
        return base
    compute = torch.promote_types(base.dtype, torch.float32)
    inputs = [base.to(compute)] + [m.to(compute) for m in models]
    merged = method.merge(key, inputs[0], inputs[1:], params)
    written = merged.to(base.dtype)
    if not torch.isfinite(written).all() and all(torch.isfinite(t).all() for t in inputs):
        largest = merged.abs().max().item()
        raise ModelDirError(
            f"merged tensor {key} has inf/NaN entries in {base.dtype} although every input is finite (largest "
            f"|value| before the cast: {largest:.3g}); the coefficients {params} are too large for this dtype — "
            "lower them")
    return written


def merge_model_dirs(base: str | Path, models: Sequence[str | Path], method: str, params: dict | None, out: str | Path,
                     *, force: bool = False, copy_from: str | Path | None = None, command: Sequence[str] | None = None,
                     log: Callable[[str], None] = _stderr) -> Path:
    """Merge ``models`` (fine-tuned from ``base``) with ``method`` into the new directory ``out``; return ``out``.

    ``params`` are the method's parameters (``lam``, ``keep``, ``alpha``, ``beta``, ``p``, ``seed``), missing
    ones taking the method's defaults. Raises before writing anything when the inputs do not fit.
    """
    spec = get_method(method)
    params = spec.resolve(dict(params or {}))
    spec.check_count(len(models))
    out = Path(out).absolute()
    base_dir = ModelDir(base)
    model_dirs = [ModelDir(m) for m in models]
    copy_dir = Path(copy_from) if copy_from is not None else base_dir.path
    if not copy_dir.is_dir():
        raise ModelDirError(f"--copy-from {copy_dir} is not a directory")
    _check_output(out, [base_dir.path, copy_dir, *(m.path for m in model_dirs)], force)
    base_only = check_same_tensors(base_dir, model_dirs)
    if base_only:
        modules = sorted({k.split(".", 1)[0] for k in base_only})
        log(f"{len(base_only)} tensors of the base are in no fine-tuned model ({', '.join(modules)}): written as the "
            f"base's (e.g. a CLIPModel base with CLIPVisionModel fine-tunes)")

    with atomic_dir(out) as tmp:  # an error or interrupt never leaves a half-written model behind
        written = _write_weights(tmp, base_dir, model_dirs, spec, params, log, frozenset(base_only))
        copied = []
        for path in files_to_copy(copy_dir):
            shutil.copy2(path, tmp / path.name)
            copied.append(path.name)
        record = {
            "method": spec.name, "title": spec.title, "formula": spec.formula, "reference": spec.reference,
            "parameters": params,
            "base": base_dir.fingerprint(), "models": [m.fingerprint() for m in model_dirs],
            "copied_from": str(copy_dir.resolve()), "copied_files": copied,
            "output": written,
            "copied_from_base": sorted({k.split(".", 1)[0] for k in base_only}),
            "command": " ".join(command) if command is not None else None,
            "adamerge_version": adamerge.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MERGE_CONFIG).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {out} ({spec.name}, {written['tensors']} tensors in {len(written['files'])} file(s))")
    return out


def _write_weights(folder: Path, base: ModelDir, models: Sequence[ModelDir], spec, params: dict, log,
                   base_only: frozenset = frozenset()) -> dict:
    """One output file per base weight file, holding the same tensors; the index when the base has one."""
    total_size = 0
    dtypes: dict[str, int] = {}
    with ExitStack() as stack:
        for model_dir in (base, *models):
            stack.enter_context(model_dir)
        for i, name in enumerate(base.files, start=1):
            keys = [k for k in base.info if base.weight_map[k] == name]
            log(f"[{i}/{len(base.files)}] {name}: merging {len(keys)} tensors ({spec.name})")
            shard = {}
            for key in keys:
                tensor = base.tensor(key) if key in base_only else merge_tensor(
                    key, base.tensor(key), [m.tensor(key) for m in models], spec, params)
                shard[key] = tensor.contiguous()
                total_size += tensor.numel() * tensor.element_size()
                dtypes[str(tensor.dtype)] = dtypes.get(str(tensor.dtype), 0) + 1
            save_file(shard, str(folder / name), metadata={**base.metadata.get(name, {}), "format": "pt"})
            os.chmod(folder / name, 0o644)  # safetensors writes 0600; a model folder is meant to be shared
            del shard
    if base.sharded:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(base.weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"layout": "sharded" if base.sharded else SINGLE_FILE, "files": list(base.files),
            "tensors": sum(dtypes.values()), "dtypes": dtypes, "total_size": total_size,
            "computed_in": "float32 (float64 tensors in float64), written in the base's dtype",
            "non_float_tensors": "copied from the base"}
