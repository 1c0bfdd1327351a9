"""Keeping the merged model: ``<run_dir>/merged/`` with the merged vision tower, and reading it back.

Why: coefficient files alone need the whole pool (θ₀ and every θₖ) to rebuild a merge; the saved tower is the
model itself — evaluated again (``method=evaluate_saved``), shipped, or loaded by ``transformers``.

One merged model is one folder::

    visual.safetensors   the tower exactly as merged and evaluated: keys of backbone.visual.state_dict()
                         (open_clip's visual.*-less names; a native transformers backbone: vision_model.*)
    merged.json          what it is: method, row label, tasks, model config and architecture, λ, sources
    config.json          HF backbones only (model=hf_clip): a transformers CLIPVisionModelWithProjection —
    model.safetensors      vision_model.* + visual_projection.weight, so from_pretrained(folder) works for
                           CLIPVisionModel (the projection is left unused) and CLIPVisionModelWithProjection
                           (image_embeds = the tower's output); a pool=huggingface reads it back unchanged

Per-task methods (individual, expo_per_task) write one such folder per task, ``merged/<task>/``, and a
``merged/merged.json`` listing them. The whole ``merged/`` appears at once (:func:`adamerge.io.atomic_dir`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from adamerge.io import atomic_dir
from adamerge.merging import check_compatible, check_finite
from adamerge.merging.task_vectors import CheckpointMismatchError
from adamerge.models.checkpoints import CheckpointError, save_state_dict

StateDict = dict[str, torch.Tensor]

MERGED_DIR = "merged"
TOWER_FILE = "visual.safetensors"
DESCRIPTION = "merged.json"
HF_WEIGHTS = "model.safetensors"
FORMAT = "adamerge merged vision tower"
HF_BACKBONE = "adamerge.models.hf_native.hf_clip_backbone"
PRETRAINED_OWN = "the backbone's own vision tower"


class SavedModelError(ValueError):
    """A saved model that cannot be evaluated as it is; the message names the file and the fix."""


# ---- writing ----------------------------------------------------------------------------------------------

def save_dtype(choice: str, stored_dtypes: Mapping[str, list[str]]) -> torch.dtype:
    """The dtype a merged tower is saved in. ``stored``: the one floating dtype every checkpoint read was stored
    in (a merge of fp16 checkpoints is kept in fp16, as they were published); float32 when they differ or none
    was read. Merging and evaluation always ran in the tower's float32."""
    if choice != "stored":
        return getattr(torch, choice)
    seen = {d for dtypes in stored_dtypes.values() for d in dtypes}
    return getattr(torch, seen.pop()) if len(seen) == 1 else torch.float32


def cast(params: StateDict, dtype: torch.dtype) -> StateDict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in params.items()}


def hf_source_folder(model_cfg) -> Path | None:
    """The transformers CLIPModel folder an HF backbone (``model=hf_clip``) was built from, else None."""
    if model_cfg is None or model_cfg.get("_target_") != HF_BACKBONE:
        return None
    from adamerge.models.hf_clip import resolve_hf_source

    folder = resolve_hf_source(model_cfg.source, model_cfg.get("hub_cache_dir"), bool(model_cfg.get("download")))
    return folder if folder.is_dir() else folder.parent


def hf_vision_config(backbone, source: Path | None) -> object | None:
    """The transformers ``CLIPVisionConfig`` of an HF backbone (native, or renamed to open_clip from the CLIPModel
    folder ``source``), marked CLIPVisionModelWithProjection; None for other backbones."""
    clip_config = getattr(getattr(backbone, "clip", None), "config", None)
    if getattr(clip_config, "vision_config", None) is not None:  # native: the transformers CLIPModel itself
        config = clip_config.vision_config
    elif source is not None:  # renamed to open_clip
        from transformers import CLIPConfig

        config = CLIPConfig.from_pretrained(str(source), local_files_only=True).vision_config
    else:
        return None
    config = type(config).from_dict(config.to_dict())  # a copy: the backbone's own config stays untouched
    config.architectures = ["CLIPVisionModelWithProjection"]
    return config


def hf_vision_tensors(params: StateDict, backbone) -> StateDict:
    """The merged tower as a transformers ``CLIPVisionModelWithProjection``'s tensors: a native tower as it is plus
    its fixed projection (θ₀'s: never merged there); an open_clip tower renamed, q/k/v split, ``proj`` transposed."""
    projection = getattr(backbone.visual, "projection", None)
    if projection is not None and any(k.startswith("vision_model.") for k in params):
        return {**params, "visual_projection.weight": projection.detach().clone()}
    from adamerge.models.hf_clip import open_clip_to_hf_vision

    return open_clip_to_hf_vision(params, source="the merged tower")


def architecture(backbone, hf_config) -> dict:
    """The tower's architecture: open_clip's model config (None for a native transformers backbone) and, for HF
    backbones, the transformers vision config."""
    import open_clip

    return {"open_clip": open_clip.get_model_config(backbone.name),
            "transformers": hf_config.to_dict() if hf_config is not None else None}


def checkpoint_sources(pool, tasks: list[str]) -> dict:
    """Where θ₀ and each θₖ came from as the user named them (an HF pool's folders or Hub ids, not its cache)."""
    if pool is None:
        return {}
    source = getattr(pool, "source_for", None) or getattr(pool, "path_for", None)
    pretrained = getattr(pool, "hf_pretrained", None) or getattr(pool, "pretrained", None)
    return {"pool": type(pool).__name__, "pretrained": str(pretrained) if pretrained else PRETRAINED_OWN,
            "finetuned": {t: str(source(t)) if source else None for t in tasks},
            "stored_dtypes": dict(getattr(pool, "stored_dtypes", {}))}


def write_model(folder: Path, params: StateDict, description: dict, hf_config=None, hf_tensors: StateDict | None = None,
                hf_source: Path | None = None) -> dict:
    """One merged model into ``folder`` (inside an atomic folder): tower, description, transformers layout."""
    from adamerge.models.hf_clip import file_digest

    folder.mkdir(parents=True, exist_ok=True)
    tower = save_state_dict(folder / TOWER_FILE, params, metadata={"format": FORMAT})
    description = {**description, "tower": {**description["tower"], "file": TOWER_FILE, "keys": len(params),
                                             "sha256": file_digest(tower)}}
    if hf_config is not None:
        save_state_dict(folder / HF_WEIGHTS, hf_tensors, metadata={"format": "pt"})
        hf_config.projection_dim = int(hf_tensors["visual_projection.weight"].shape[0])
        hf_config.save_pretrained(str(folder))
        if hf_source is not None and (hf_source / "preprocessor_config.json").is_file():
            shutil.copy2(hf_source / "preprocessor_config.json", folder / "preprocessor_config.json")
        description["transformers"] = {
            "weights": HF_WEIGHTS, "class": "CLIPVisionModelWithProjection",
            "note": "CLIPVisionModel.from_pretrained(folder) loads vision_model.* and leaves visual_projection.weight "
                    "unused; CLIPVisionModelWithProjection's image_embeds are the tower's output"}
    write_description(folder, description)
    return description


def write_description(folder: Path, description: dict) -> None:
    (folder / DESCRIPTION).write_text(json.dumps(description, indent=2, ensure_ascii=False, default=str) + "\n",
                                      encoding="utf-8")


def task_folder(task: str) -> str:
    return task.replace("/", "_").replace("\\", "_")


def save_merged(cfg, ctx, method, result) -> dict:
    """``save_merged=true``: write ``<run_dir>/merged/`` (module docstring) and return what the run record's
    ``extra`` keeps (``merged_model``: the folder; per-task methods also ``merged_models``: task → folder)."""
    from lightning.pytorch.utilities import rank_zero_only

    if not cfg.get("save_merged", False) or rank_zero_only.rank != 0:
        return {}
    from omegaconf import OmegaConf

    backbone, pool, names = ctx.backbone, ctx.pool, ctx.task_names
    dtype = save_dtype(str(cfg.get("save_merged_dtype", "stored")), getattr(pool, "stored_dtypes", {}) or {})
    hf_source = hf_source_folder(cfg.get("model"))
    hf_config = hf_vision_config(backbone, hf_source)
    if hf_config is not None:
        hf_config.torch_dtype = str(dtype).replace("torch.", "")
    native = getattr(backbone.visual, "projection", None) is not None  # the transformers tower as it is
    extra = result.extra
    base = {
        "format": FORMAT, "version": 1, "method": cfg.get("method_name"), "label": method.label, "tasks": names,
        "seed": cfg.get("seed"),
        "model": {"name": cfg.get("model_name"), "backbone": backbone.name,
                  "config": OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else None,
                  "architecture": architecture(backbone, hf_config)},
        "tower": {"layout": "transformers vision_model" if native else "open_clip visual",
                  "dtype": str(dtype).replace("torch.", ""), "merged_in": "float32"},
        "coefficients": extra.get("coefficients_file") or extra.get("coefficients_loaded_from"),
        "lambda": extra.get("lambda"),
        "sources": checkpoint_sources(pool, names) if ctx.finetuned else {"saved_model": extra.get("evaluated_from")},
        "run_dir": str(ctx.run_dir),
    }
    models = {None: result.params} if result.per_task is None else dict(result.per_task)
    target = Path(ctx.run_dir) / MERGED_DIR
    with atomic_dir(target) as tmp:
        for task, params in models.items():
            params = cast({k: v.detach().cpu() for k, v in params.items()}, dtype)
            hf = hf_vision_tensors(params, backbone) if hf_config is not None else None
            write_model(tmp if task is None else tmp / task_folder(task), params, {**base, "task": task}, hf_config,
                        hf, hf_source)
        if result.per_task is not None:
            write_description(tmp, {**base, "per_task": {t: task_folder(t) for t in models}})
    saved = {"merged_model": str(target)}
    if result.per_task is not None:
        saved["merged_models"] = {t: str(target / task_folder(t)) for t in models}
    return saved


# ---- reading ----------------------------------------------------------------------------------------------

WHAT_TO_GIVE = ("give method.path=<run_dir>/merged (written by a run with save_merged=true), one of its per-task "
                "folders, an adamerge-merge-models output directory (a transformers CLIP model folder with "
                "model.safetensors) or a .safetensors file of the tower")


def read_description(folder: Path) -> dict:
    """``merged.json`` of a saved folder, ``merge_config.json`` of an adamerge-merge-models output, or {}."""
    for name in (DESCRIPTION, "merge_config.json"):
        path = folder / name
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise SavedModelError(f"{path} is not valid JSON ({err}); re-save the model or remove the file") from err
    return {}


def weight_file(path: Path) -> Path:
    """The file (or model folder) to read a tower from: our ``visual.safetensors`` first (the exact tower), else
    the folder's transformers weights."""
    if path.is_file():
        return path
    if (path / TOWER_FILE).is_file():
        return path / TOWER_FILE
    if (path / HF_WEIGHTS).is_file() or (path / f"{HF_WEIGHTS}.index.json").is_file():
        return path
    found = sorted(p.name for p in path.iterdir())
    raise SavedModelError(f"{path} holds no model weights (no {TOWER_FILE}, {HF_WEIGHTS} or {HF_WEIGHTS}.index.json; "
                          f"it has: {', '.join(found[:10]) or 'nothing'}): {WHAT_TO_GIVE}")


def locate(path: str | Path) -> tuple[dict, dict[str | None, Path]]:
    """(description, weights): ``{None: file}`` for one model, ``{task: file}`` for a per-task ``merged/``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SavedModelError(f"saved model not found: {path} — {WHAT_TO_GIVE}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SavedModelError(f"{path} is not a .safetensors file (adamerge never unpickles): {WHAT_TO_GIVE}")
        return read_description(path.parent), {None: path}
    description = read_description(path)
    if "per_task" in description:
        return description, {task: weight_file(path / sub) for task, sub in description["per_task"].items()}
    return description, {None: weight_file(path)}


def read_tensors(path: Path) -> StateDict:
    from adamerge.models.hf_clip import read_hf_state_dict

    if path.is_dir():
        return read_hf_state_dict(path)
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise SavedModelError(f"cannot read {path}: truncated or not a safetensors file ({err}); re-save it "
                              f"(a run with save_merged=true) or give another file") from err


def as_tower(raw: StateDict, reference: Mapping[str, torch.Tensor], projection: torch.Tensor | None,
             source: str) -> StateDict:
    """``raw`` in the backbone tower's layout: as it is when it has the tower's keys; a transformers CLIP
    (vision) model renamed to open_clip (``proj`` from θ₀ when it has no visual_projection) or, for a native
    tower, its ``vision_model.*`` (a projection other than the backbone's is refused: the tower never merges it)."""
    from adamerge.models.hf_clip import _BARE_VISION, hf_vision_state, hf_vision_to_open_clip

    if raw.keys() == reference.keys() or not any(k.startswith(("vision_model.", *_BARE_VISION)) for k in raw):
        return dict(raw)
    if any(k.startswith("vision_model.") for k in reference):
        given = raw.get("visual_projection.weight")
        if given is not None and projection is not None and not torch.equal(given.to(projection.dtype), projection):
            raise SavedModelError(
                f"{source} carries a visual_projection other than the backbone's: the transformers tower "
                f"(model=hf_clip) evaluates vision_model.* with θ₀'s projection, so this model would not be the one "
                f"evaluated. Evaluate it with model.native=false (open_clip layout, projection included).")
        return hf_vision_state(raw, source)
    return hf_vision_to_open_clip(raw, projection=reference.get("proj"), source=source)


def load_saved_tower(path: Path, reference: Mapping[str, torch.Tensor], projection: torch.Tensor | None = None,
                     description: dict | None = None) -> StateDict:
    """The tower at ``path``, checked against the backbone's (every key, shape; finite) and in its dtype."""
    from adamerge.models.hf_clip import HFCheckpointError

    source = str(path)
    model = (description or {}).get("model") or {}
    fix = (f"evaluate it with the backbone it was merged on (its {DESCRIPTION}: model={model.get('name')}, "
           f"backbone {model.get('backbone')})" if model else "evaluate it with the backbone it was merged on "
           "(the same model=… and architecture)")
    try:
        state = as_tower(read_tensors(path), reference, projection, source)
        check_compatible(dict(reference), state, source=f"saved model {source}")
    except (CheckpointMismatchError, HFCheckpointError, CheckpointError) as err:
        raise SavedModelError(f"{err} — {fix}, or re-save it from such a run (save_merged=true).") from err
    check_finite(state, f"saved model {source}", hint="It cannot be evaluated: re-run the merge with "
                 "save_merged=true (a run refuses to save a non-finite merge), or give another folder.")
    return {k: v.to(reference[k].dtype) if v.is_floating_point() and v.dtype != reference[k].dtype else v
            for k, v in state.items()}
