"""Merge model directories into a new one, tensor by tensor, written atomically and self-documented.

The output has the base's layout (one ``model.safetensors``, or the base's shard files and an index),
the base's dtype per tensor (the math runs in float32, or float64 for float64 tensors), the base's
non-float tensors unchanged, the non-weight files (config, generation config, tokenizer, licence) of
the base or of ``copy_from``, and a ``merge_config.json`` saying how it was made. Everything is written
into a hidden temporary folder beside the output and renamed into place at the end, so an error or an
interrupt never leaves a half-written model behind. Peak memory: one output shard plus K + 1 copies
of one tensor (and TIES's accumulators of that tensor); no input file stays mapped.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import adamerge
from adamerge.io import atomic_dir
from adamerge.merging.task_vectors import NonFiniteTensorError, all_finite
from adamerge.model_dirs.layout import INDEX_FILE, SINGLE_FILE, ModelDir, ModelDirError, check_same_tensors
from adamerge.model_dirs.registry import compose_method, weight_methods

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

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


class DirWeights(Mapping[str, torch.Tensor]):
    """A model directory's floating-point tensors in their compute dtype (float32, or float64 for float64
    tensors), read from disk on access; the last one read is kept, because a merge reads the same key of
    every model several times in a row (TIES: trim, elect, agree) and then never again."""

    def __init__(self, model_dir: ModelDir, keys: Sequence[str], compute: Mapping[str, torch.dtype]):
        self.model_dir, self._keys, self._compute = model_dir, list(keys), compute
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if key not in self._compute:
            raise KeyError(key)
        value = self.model_dir.tensor(key).to(self._compute[key])
        if not all_finite(value):
            count = int((~torch.isfinite(value)).sum())
            raise NonFiniteTensorError(f"model directory {self.model_dir.path} holds non-finite values (NaN/Inf) in "
                                       f"{key} ({count} of {value.numel()} entries); a merge with it would be NaN "
                                       "there — re-export or re-download that model")
        self._last = (key, value)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _check_written(key: str, merged: torch.Tensor, written: torch.Tensor, method_cfg) -> None:
    if not all_finite(written):
        largest = merged.abs().max().item()
        options = {k: v for k, v in method_cfg.items() if k in ("lam", "alpha", "start", "p")}
        raise ModelDirError(
            f"merged tensor {key} has inf/NaN entries in {written.dtype} although every input is finite (largest "
            f"|value| before the cast: {largest:.3g}); the coefficients {options} are too large for this dtype — "
            "lower them")


def merge_model_dirs(base: str | Path, models: Sequence[str | Path], method: str, params: dict | None, out: str | Path,
                     *, force: bool = False, copy_from: str | Path | None = None, command: Sequence[str] | None = None,
                     overrides: Sequence[str] = (), log: Callable[[str], None] = _stderr,
                     composed: tuple | None = None, extra_record: dict | None = None) -> Path:
    """Merge ``models`` (fine-tuned from ``base``) with ``method`` (a ``conf/method/`` name) into the new
    directory ``out``; return ``out``.

    ``params``: ``lam``, ``keep``, ``alpha``, ``beta``, ``p``, ``seed`` (None: the config tree's default);
    ``overrides``: any further ``KEY=VALUE`` of the method's config. Raises before writing anything when the
    inputs or options do not fit. ``composed``: ``(method object, its config, seed)`` already built (a caller inside
    a Hydra run, e.g. the LLM pipeline writing what its search found); ``extra_record``: more merge_config.json keys.
    """
    if composed is not None:
        spec, method_cfg, seed = composed
        nulled = []
    else:
        spec, method_cfg, seed, nulled = compose_method(method, params, overrides)
    spec.check_models(len(models))
    if nulled:
        log(f"{', '.join(nulled)} set to null: merging weights alone evaluates nothing, so λ/α/β are the fixed values")
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
        written = _write_weights(tmp, base_dir, model_dirs, spec, method_cfg, seed, log, frozenset(base_only))
        copied = []
        for path in files_to_copy(copy_dir):
            shutil.copy2(path, tmp / path.name)
            copied.append(path.name)
        record = {
            "method": method, "title": spec.label,
            "description": weight_methods()[method].header if method in weight_methods() else None,
            "method_config": OmegaConf.to_container(method_cfg, resolve=True), "seed": seed, "nulled": nulled,
            **(extra_record or {}),
            "base": base_dir.fingerprint(), "models": [m.fingerprint() for m in model_dirs],
            "copied_from": str(copy_dir.resolve()), "copied_files": copied,
            "output": written,
            "copied_from_base": sorted({k.split(".", 1)[0] for k in base_only}),
            "command": " ".join(command) if command is not None else None,
            "adamerge_version": adamerge.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MERGE_CONFIG).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {out} ({method}, {written['tensors']} tensors in {len(written['files'])} file(s))")
    return out


def _write_weights(folder: Path, base: ModelDir, models: Sequence[ModelDir], spec, method_cfg, seed: int, log,
                   base_only: frozenset = frozenset()) -> dict:
    """One output file per base weight file, holding the same tensors; the index when the base has one.
    Tensors are read as they are merged and each shard is written and released before the next."""
    merged_keys = [k for k in base.info if base.info[k].is_floating_point() and k not in base_only]
    compute = {k: torch.promote_types(_TORCH_DTYPES[base.info[k].dtype], torch.float32) for k in merged_keys}
    base_weights = DirWeights(base, merged_keys, compute)
    merger = spec.weights_merger(base_weights, [DirWeights(m, merged_keys, compute) for m in models], seed=seed)
    total_size = 0
    dtypes: dict[str, int] = {}
    for i, name in enumerate(base.files, start=1):
        keys = [k for k in base.info if base.weight_map[k] == name]
        log(f"[{i}/{len(base.files)}] {name}: merging {len(keys)} tensors ({spec.label})")
        shard = {}
        for key in keys:
            if key in compute:
                merged = merger(key)
                tensor = merged.to(_TORCH_DTYPES[base.info[key].dtype])
                _check_written(key, merged, tensor, method_cfg)
                del merged
            else:  # integer buffers, and modules no fine-tuned model holds
                tensor = base.tensor(key)
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
