"""Reading a Hugging Face-style model directory's weights without loading them: which file holds which tensor.

A directory holds either one ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` listed by
``model.safetensors.index.json`` (the layout ``save_pretrained`` writes). Tensors are read one at a time
through :class:`safetensors.safe_open`, so a merge never needs a whole model in memory. Pickled weights
(``pytorch_model.bin``) are refused: unpickling runs arbitrary code. Each read maps its file only for the
life of the tensor it returns: a file left mapped for the whole merge keeps every page read so far in the
process's resident set, which under RSS-based limits (cgroups, SLURM ``--mem``) counts as allocated memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adamerge.merging.task_vectors import CheckpointMismatchError, check_compatible

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class ModelDirError(RuntimeError):
    """A model directory that cannot be merged as it is; the message names the folder/file and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, read from the safetensors header (no data loaded).

    Quacks like a tensor for :func:`adamerge.merging.check_compatible` (``shape``, ``dtype``,
    ``is_floating_point()``), so model directories get the same mismatch errors as state dicts.
    """

    shape: torch.Size
    dtype: str

    def is_floating_point(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def header_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's header (names, dtypes, shapes, offsets): a cheap fingerprint of its layout."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return hashlib.sha256(handle.read(length)).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ModelDir:
    """The safetensors weights of one model directory; open it with ``with`` to read tensors lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelDirError(f"model directory not found: {self.path}")
        if not self.path.is_dir():
            raise ModelDirError(f"{self.path} is a file; pass the model *directory* that holds it "
                                f"({SINGLE_FILE} or {INDEX_FILE} with its shards)")
        self.index_path: Path | None = None
        self.weight_map: dict[str, str] = self._find_weights()
        self.files: list[str] = sorted(set(self.weight_map.values())) if self.sharded else [SINGLE_FILE]
        self.info: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for name in self.files:
            self._read_header(name)

    @property
    def sharded(self) -> bool:
        return self.index_path is not None

    def _find_weights(self) -> dict[str, str]:
        """Key → file name, the way ``from_pretrained`` looks: ``model.safetensors`` first, then the index."""
        if (self.path / SINGLE_FILE).is_file():
            return {}  # filled from the header by _read_header
        if (self.path / INDEX_FILE).is_file():
            self.index_path = self.path / INDEX_FILE
            try:
                index = json.loads(self.index_path.read_text(encoding="utf-8"))
                weight_map = dict(index["weight_map"])
            except (ValueError, KeyError, TypeError) as err:
                raise ModelDirError(f"{self.index_path} is not a safetensors index (expected a JSON object with "
                                    f"'weight_map': {{tensor: shard file}}): {err}") from err
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise ModelDirError(f"{self.index_path} lists shard(s) missing from {self.path}: {', '.join(missing)}; "
                                    "the download or copy is incomplete")
            return weight_map
        present = [name for name in PICKLED_WEIGHTS if (self.path / name).exists()]
        if present:
            raise ModelDirError(
                f"{self.path} holds only pickled weights ({', '.join(present)}); adamerge never unpickles files "
                "(loading a pickle runs arbitrary code). If you trust the file, convert it once to safetensors: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)")
        adapters = [name for name in ADAPTER_WEIGHTS if (self.path / name).exists()]
        if adapters:
            raise ModelDirError(f"{self.path} is a PEFT adapter ({adapters[0]}), not a full model; merge it into its "
                                "base first (peft: PeftModel.from_pretrained(base, DIR).merge_and_unload()"
                                ".save_pretrained(NEW_DIR)) and pass NEW_DIR")
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        hint = f" (found {', '.join(found)}, but no {INDEX_FILE} saying which tensor is where)" if found else ""
        raise ModelDirError(f"no weights in {self.path}: expected {SINGLE_FILE}, or {INDEX_FILE} with its shards{hint}")

    def _read_header(self, name: str) -> None:
        path = self.path / name
        try:
            with safe_open(str(path), framework="pt") as handle:
                self.metadata[name] = dict(handle.metadata() or {})
                for key in handle.keys():
                    if self.index_path is None:
                        self.weight_map[key] = name
                    elif self.weight_map.get(key) != name:
                        continue  # a tensor the index places elsewhere is not this model's
                    view = handle.get_slice(key)
                    self.info[key] = TensorInfo(torch.Size(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError) as err:
            raise ModelDirError(f"cannot read {path}: truncated or not a safetensors file ({err})") from err
        absent = [k for k, f in self.weight_map.items() if f == name and k not in self.info]
        if absent:
            raise ModelDirError(f"{self.index_path} places {len(absent)} tensor(s) in {name} that it does not hold "
                                f"(e.g. {absent[0]}); the index and the shards are from different saves")

    def fingerprint(self) -> dict:
        """What merge_config.json records about this input: path, weight files, and hashes of their layout."""
        record = {"path": str(self.path.resolve()),
                  "files": [{"name": f, "bytes": (self.path / f).stat().st_size,
                             "header_sha256": header_sha256(self.path / f)} for f in self.files]}
        if self.index_path is not None:
            record["index"] = self.index_path.name
            record["index_sha256"] = file_sha256(self.index_path)
        if (self.path / "config.json").is_file():
            record["config_sha256"] = file_sha256(self.path / "config.json")
        return record

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor; the file is mapped only as long as the tensor lives (safetensors hands out the mapped bytes,
        and a converted copy releases them at once), never for the whole merge."""
        with safe_open(str(self.path / self.weight_map[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def _module(key: str) -> str:
    return key.split(".", 1)[0]


def check_same_tensors(base: ModelDir, models: list[ModelDir]) -> list[str]:
    """Every model must hold the base's tensors with the base's shapes (float vs integer kinds alike) — or,
    as FusionBench publishes CLIP (a ``CLIPModel`` base, ``CLIPVisionModel`` fine-tunes), the base's tensors
    of whole top-level modules that *no* model has (``text_model.*``, ``logit_scale``, …) are the base's in
    the output. Returns those base-only keys. A module some model holds only in part is an error, so a
    truncated export never passes as "copied from the base"."""
    held = [set(m.info) for m in models]
    absent_everywhere = {k for k in base.info if all(k not in h for h in held)}
    partial = sorted({_module(k) for k in absent_everywhere} & {_module(k) for h in held for k in h})
    base_only = sorted(k for k in absent_everywhere if _module(k) not in partial)
    reference = {k: v for k, v in base.info.items() if k not in base_only}
    for model in models:
        try:
            check_compatible(reference, model.info, source=f"model directory {model.path}")
        except CheckpointMismatchError as err:
            problems = str(err).split(". Is it from the same architecture")[0]  # drop the CLIP-specific hint
            raise CheckpointMismatchError(
                f"{problems}. Every --models directory must be fine-tuned from --base {base.path} (same architecture, "
                "hidden size, layers; an SFT that added tokens resized embed_tokens/lm_head, so resize the base "
                "the same way first)") from err
    return base_only
