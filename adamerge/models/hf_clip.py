"""Hugging Face ``transformers`` CLIP checkpoints as open_clip state dicts.

FusionBench publishes its fine-tuned CLIP vision towers on the Hub in the ``transformers`` layout
(``tanganke/clip-vit-base-patch32_<task>``, fine-tuned from ``openai/clip-vit-base-patch32``). The two
layouts hold the same numbers under different names, except that ``transformers`` keeps the attention
projections q/k/v apart (open_clip fuses them into ``in_proj_weight``) and stores the image projection as
a ``Linear`` weight (open_clip keeps its transpose, ``proj``). Converting once to native safetensors lets
every pool, method and merge run unchanged on them.

Only safetensors are read: a folder that holds only ``pytorch_model.bin`` is refused with the command that
converts it. Hub ids are looked up in the local Hugging Face cache only (``local_files_only``) unless a
download is asked for, so an offline machine fails at once and is told what to fetch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from adamerge.models.checkpoints import CheckpointError, save_state_dict
from adamerge.merging import check_compatible, check_finite
from adamerge.models.pool import CheckpointPool, MissingCheckpointError, fill_pattern

StateDict = dict[str, torch.Tensor]

# One transformer block, ``transformers`` name -> open_clip name (q/k/v are fused separately).
_BLOCK = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
_VISION = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
}
_TEXT = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")
_BARE_VISION = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
_CONVERT_HINT = ("convert once, on a machine you trust, with: python -c \"from transformers import AutoModel; "
                 "AutoModel.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\" "
                 "and use {folder}-safetensors")
_MODEL_INSTRUCTIONS = "the vision tower of a transformers CLIPModel / CLIPVisionModel / CLIPVisionModelWithProjection"


class HFCheckpointError(CheckpointError):
    """A Hugging Face CLIP checkpoint that does not map onto open_clip's names."""


class HFCheckpointUnavailable(MissingCheckpointError):
    """Hugging Face models that are neither a local folder nor in the local Hub cache."""


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def _tower(state: StateDict, prefix: str, names: dict[str, str], required: tuple[str, ...],
           source: str) -> StateDict:
    """Rename one tower (keys already without ``prefix``): fixed names, then blocks with fused q/k/v."""
    out, unexpected, qkv = {}, [], {}
    for key, value in state.items():
        if key in names:
            out[names[key]] = value
            continue
        match = _LAYER.match(key)
        module = match and match.group(2)
        if match and module in _BLOCK:
            out[f"transformer.resblocks.{match.group(1)}.{_BLOCK[module]}.{match.group(3)}"] = value
        elif match and module.startswith("self_attn.") and module[len("self_attn."):] in _QKV:
            qkv.setdefault((int(match.group(1)), match.group(3)), {})[module[len("self_attn."):]] = value
        else:
            unexpected.append(prefix + key)
    layers = 1 + max([int(m.group(1)) for k in state if (m := _LAYER.match(k))], default=-1)
    missing = [prefix + k for k in required if k not in state]
    for i in range(layers):
        for kind in ("weight", "bias"):
            parts = qkv.get((i, kind), {})
            missing += [f"{prefix}encoder.layers.{i}.self_attn.{p}.{kind}" for p in _QKV if p not in parts]
            if len(parts) == 3:
                out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV])
            for module in _BLOCK:
                if f"encoder.layers.{i}.{module}.{kind}" not in state:
                    missing.append(f"{prefix}encoder.layers.{i}.{module}.{kind}")
    if layers == 0:
        missing.append(f"{prefix}encoder.layers.0.* (no transformer blocks at all)")
    if unexpected or missing:
        problems = ([f"missing {len(missing)}: {_listing(missing)}"] if missing else []) + (
            [f"unexpected {len(unexpected)}: {_listing(unexpected)}"] if unexpected else [])
        raise HFCheckpointError(
            f"{source} is not {_MODEL_INSTRUCTIONS} in the transformers layout — " + " | ".join(problems)
            + ". Expected keys like vision_model.encoder.layers.0.self_attn.q_proj.weight (the prefix may be "
            "absent); give the folder a transformers CLIP model was saved to with save_pretrained.")
    return out


def _is_ignored(key: str) -> bool:
    # position_ids: a constant buffer that older transformers versions saved with the weights.
    return key.endswith("position_ids")


def hf_vision_to_open_clip(state: StateDict, projection: torch.Tensor | None = None,
                           source: str = "checkpoint") -> StateDict:
    """open_clip ``visual`` state dict from a transformers CLIP (vision) state dict.

    Keys may carry the ``vision_model.`` prefix (CLIPModel, CLIPVisionModel in transformers 4) or not
    (transformers 5); text-tower keys of a full CLIPModel are ignored. ``proj`` is the transpose of
    ``visual_projection.weight``; a CLIPVisionModel has none (FusionBench fine-tunes without it), so
    ``projection`` (open_clip layout, e.g. the pre-trained model's ``proj``) fills it in.
    """
    prefixed = any(k.startswith("vision_model.") for k in state)
    if prefixed:
        body = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
        rest = [k for k in state if not k.startswith(("vision_model.", "text_model."))]
    else:  # no prefix: everything except the text tower and the CLIP-level tensors belongs to vision
        rest = [k for k in state if not k.startswith(_BARE_VISION)]
        body = {k: v for k, v in state.items() if k.startswith(_BARE_VISION)}
    body = {k: v for k, v in body.items() if not _is_ignored(k)}
    outside = [k for k in rest if k not in {"visual_projection.weight", "text_projection.weight", "logit_scale"}
               and not _is_ignored(k)]
    if outside:
        raise HFCheckpointError(
            f"{source}: unexpected {len(outside)} key(s) outside the CLIP vision tower: {_listing(outside)}. "
            f"Expected {_MODEL_INSTRUCTIONS}.")
    out = _tower(body, "vision_model." if prefixed else "", _VISION, tuple(_VISION), source)
    if "visual_projection.weight" in state:
        out["proj"] = state["visual_projection.weight"].t().contiguous()
    elif projection is not None:
        out["proj"] = projection.detach().clone()
    else:
        raise HFCheckpointError(
            f"{source} has no visual_projection.weight (a CLIPVisionModel without the image projection, as "
            f"FusionBench fine-tunes them): pass the pre-trained model's projection (pool.pretrained=<the "
            f"openai CLIPModel>, or the backbone's visual.proj) to fill in 'proj'.")
    return out


def hf_vision_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ``vision_model.*`` tensors of a transformers CLIPModel / CLIPVisionModel(WithProjection) state dict
    (transformers 5 drops the prefix: it is put back); text-side tensors are ignored, ``position_ids`` dropped."""
    if any(k.startswith("vision_model.") for k in state):
        out = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    else:
        out = {f"vision_model.{k}": v for k, v in state.items() if k.startswith(_BARE_VISION)}
    out = {k: v for k, v in out.items() if not k.endswith("position_ids")}
    if not out:
        raise HFCheckpointError(f"{source} holds no CLIP vision tower (no vision_model.* keys): expected a "
                                f"transformers CLIPModel, CLIPVisionModel or CLIPVisionModelWithProjection.")
    return out


def hf_clip_to_open_clip(state: StateDict, source: str = "checkpoint") -> StateDict:
    """Whole open_clip ``CLIP`` state dict (both towers, ``logit_scale``) from a transformers ``CLIPModel``."""
    missing = [k for k in ("visual_projection.weight", "text_projection.weight", "logit_scale") if k not in state]
    if missing or not any(k.startswith("text_model.") for k in state):
        raise HFCheckpointError(
            f"{source} is not a whole transformers CLIPModel (missing: {_listing(missing) or 'text_model.*'}); "
            f"a backbone needs the text tower for zero-shot heads. Use the pre-trained CLIPModel "
            f"(e.g. openai/clip-vit-base-patch32), not a fine-tuned vision tower.")
    out = {f"visual.{k}": v for k, v in hf_vision_to_open_clip(state, source=source).items()}
    text = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.") and not _is_ignored(k)}
    out.update(_tower(text, "text_model.", _TEXT, tuple(_TEXT), source))
    out["text_projection"] = state["text_projection.weight"].t().contiguous()
    out["logit_scale"] = state["logit_scale"].reshape(())
    return out


_OPEN_CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def open_clip_to_hf_vision(state: StateDict, source: str = "state dict") -> StateDict:
    """The inverse of :func:`hf_vision_to_open_clip`: an open_clip ``visual`` state dict as the tensors of a
    transformers ``CLIPVisionModelWithProjection`` (``vision_model.*`` + ``visual_projection.weight``), so a tower
    merged in open_clip's layout can be saved for ``from_pretrained``. ``in_proj`` is split back into q/k/v."""
    vision = {v: k for k, v in _VISION.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out, unexpected = {}, []
    for key, value in state.items():
        match = _OPEN_CLIP_BLOCK.match(key)
        if key in vision:
            out[f"vision_model.{vision[key]}"] = value
        elif key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif match and match.group(2) in block:
            out[f"vision_model.encoder.layers.{match.group(1)}.{block[match.group(2)]}.{match.group(3)}"] = value
        elif (fused := _IN_PROJ.match(key)):
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{fused.group(1)}.self_attn.{name}.{fused.group(2)}"] = part.contiguous()
        else:
            unexpected.append(key)
    if unexpected:
        raise HFCheckpointError(f"{source}: {len(unexpected)} tensor(s) have no transformers CLIP counterpart: "
                                f"{_listing(unexpected)} (only a plain open_clip ViT tower converts)")
    return out


# ---- files and folders --------------------------------------------------------------------------------

def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a saved transformers model (one file, or shards named by the index)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickled:
        raise HFCheckpointError(f"{folder} holds only pickled weights ({', '.join(sorted(pickled))}); adamerge "
                                f"never unpickles: {_CONVERT_HINT.format(folder=folder)}")
    raise HFCheckpointError(
        f"{folder} has no model.safetensors (or model.safetensors.index.json), so it is not a folder a "
        f"transformers model was saved to with safetensors. If the model publishes only pytorch_model.bin, "
        f"download that too and {_CONVERT_HINT.format(folder=folder)}")


def weight_files(source: str | Path) -> list[Path]:
    """A ``.safetensors`` file itself, or the weight files of a model folder."""
    path = Path(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise HFCheckpointError(f"{path} is not a .safetensors file; adamerge reads only safetensors "
                                    f"(it never unpickles .bin/.pt files): {_CONVERT_HINT.format(folder=path.parent)}")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face model folder not found: {path}")
    return _weight_files(path)


def read_hf_state_dict(source: str | Path) -> StateDict:
    """All tensors of a transformers model folder (or one safetensors file), read without unpickling."""
    state: StateDict = {}
    for path in weight_files(source):
        try:
            state.update(load_file(str(path)))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise HFCheckpointError(f"cannot read {path}: truncated or not a safetensors file ({err})") from err
    return state


def _hub_id(source: str) -> bool:
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not source.startswith((".", "/"))
            and not Path(source).exists())


def _download_hint(repo_id: str, cache_dir: str | Path | None) -> str:
    where = f" --cache-dir {cache_dir}" if cache_dir else ""
    return f"hf download {repo_id} --include '*.json' '*.safetensors'{where}"


def resolve_hf_source(source: str | Path, hub_cache_dir: str | Path | None = None, download: bool = False) -> Path:
    """A local folder/file as it is; a Hub id (``org/name``) from the local Hugging Face cache.

    Nothing is downloaded unless ``download`` is true, so a missing model fails at once (no retries
    against an unreachable network) with the command that fetches it.
    """
    text = str(source)
    if not _hub_id(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise HFCheckpointUnavailable(f"Hugging Face model folder not found: {path}")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(text, cache_dir=hub_cache_dir, local_files_only=not download,
                                   allow_patterns=["*.json", "*.safetensors"])
    except LocalEntryNotFoundError as err:
        raise HFCheckpointUnavailable(
            f"{text} is not in the local Hugging Face cache ({hub_cache_dir or 'HF_HOME/hub'}) and adamerge "
            f"does not download at run time. On a machine with internet run: {_download_hint(text, hub_cache_dir)} "
            f"(then copy the cache here), or pass a local folder, or set pool.download=true.") from err
    return Path(folder)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes; free for Hub-cache files, whose blob is already named by it."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def convert_hf_vision(source: str | Path, out: str | Path, projection: torch.Tensor | None = None) -> Path:
    """Write the open_clip vision tower of a transformers CLIP folder as native safetensors at ``out``."""
    raw = read_hf_state_dict(source)
    state = hf_vision_to_open_clip(raw, projection=projection, source=str(source))
    meta = {"converted_from": str(source), "format": "open_clip visual"}
    if "visual_projection.weight" not in raw:  # proj came from θ₀: not a fine-tuned tensor (TIES leaves it out of n)
        meta["filled_from_pretrained"] = ["proj"]
    return save_state_dict(out, state, metadata=meta)


def cached_hf_vision(source: Path, cache_dir: str | Path, projection: torch.Tensor | None = None) -> Path:
    """``convert_hf_vision`` once per content: the file name hashes the weights (and a filled-in ``proj``)."""
    h = hashlib.sha256(b"adamerge-hf-vision-v2")
    for path in weight_files(source):
        h.update(file_digest(path).encode())
    if projection is not None:
        h.update(_tensor_digest(projection).encode())
    target = Path(cache_dir) / f"{h.hexdigest()[:32]}.safetensors"
    if not target.exists():
        convert_hf_vision(source, target, projection=projection)
    return target


# ---- a pool for Hydra ----------------------------------------------------------------------------------

def _native(state: StateDict) -> bool:
    """A tower in the transformers layout (the native backbone), not open_clip's."""
    return any(k.startswith("vision_model.") for k in state)


@dataclass
class HFCheckpointPool(CheckpointPool):
    """A :class:`CheckpointPool` whose sources are transformers CLIP folders or Hub ids, converted on use.

    ``hf_pretrained``: θ₀ (``None``: the backbone's own vision tower). ``hf_finetuned``: task -> source;
    other tasks use ``hf_pattern`` formatted with ``task`` (after ``task_names`` renaming, matched without
    regard to case) and ``hub_model``, under ``hf_dir`` when that is set (local folders), else as a Hub id.
    ``hf_candidates``: task -> further sources (Extrapolation Merging). Converted files are cached in
    ``cache_dir`` by content; vision towers without an image projection get θ₀'s.
    """

    hf_pretrained: str | None = None
    hf_finetuned: dict[str, str] = field(default_factory=dict)
    hf_dir: str | None = None
    hf_pattern: str = "tanganke/{hub_model}_{task}"
    hub_model: str = "clip-vit-base-patch32"
    task_names: dict[str, str] = field(default_factory=dict)
    hf_candidates: dict[str, list[str]] = field(default_factory=dict)
    cache_dir: str | None = None
    hub_cache_dir: str | None = None
    download: bool = False
    _projection: torch.Tensor | None = field(default=None, init=False, repr=False)
    _native_projection: torch.Tensor | None = field(default=None, init=False, repr=False)

    def source_for(self, task: str) -> str:
        if task in self.hf_finetuned:
            return str(self.hf_finetuned[task])
        renames = {k.casefold(): v for k, v in self.task_names.items()}
        name = fill_pattern(self.hf_pattern, task=renames.get(task.casefold(), task), hub_model=self.hub_model)
        return str(Path(self.hf_dir) / name) if self.hf_dir else name

    def _convert(self, source: str) -> Path:
        if self.cache_dir is None:
            raise ValueError("HFCheckpointPool needs cache_dir (where converted safetensors files are kept)")
        return cached_hf_vision(resolve_hf_source(source, self.hub_cache_dir, self.download), self.cache_dir,
                                projection=self._projection)

    def _convert_all(self, sources: dict[str, str]) -> dict[str, Path]:
        """Every source converted, or one error listing all that are unavailable (not just the first)."""
        return self._gather(sources, lambda name, source: self._convert(source))

    def _gather(self, sources: dict[str, str], load) -> dict:
        """``load(name, source)`` for every source, or one error listing all that are unavailable."""
        done, lacking = {}, []
        for name, source in sources.items():
            try:
                done[name] = load(name, source)
            except HFCheckpointUnavailable as err:
                lacking.append((name, source, err))
        if lacking:
            hub = [s for _, s, _ in lacking if _hub_id(s)]
            fetch = "; ".join(_download_hint(s, self.hub_cache_dir) for s in hub)
            raise HFCheckpointUnavailable(
                f"{len(lacking)} Hugging Face model(s) unavailable: "
                + ", ".join(f"{n} ({s})" for n, s, _ in lacking)
                + (f". adamerge does not download at run time; on a machine with internet run: {fetch} "
                   f"(then copy the cache to {self.hub_cache_dir or 'HF_HOME/hub'})" if hub else "")
                + ". Or give local folders: pool.finetuned_dir=DIR pool.pattern=%task, or pool.finetuned.<task>=DIR.")
        return done

    def load(self, task_names: list[str], backbone_visual: torch.nn.Module) -> tuple[StateDict, dict[str, StateDict]]:
        reference = backbone_visual.state_dict()
        if _native(reference):
            return self._load_native(task_names, backbone_visual)
        # θ₀ first: its projection completes fine-tuned towers that lack one (FusionBench's).
        self._projection = reference["proj"]
        if self.hf_pretrained:
            self.pretrained = self._convert_all({"pretrained": self.hf_pretrained})["pretrained"]
            self._projection = load_file(str(self.pretrained))["proj"]
        self.finetuned = {**self.finetuned, **self._convert_all({t: self.source_for(t) for t in task_names
                                                                 if t not in self.finetuned})}
        return super().load(task_names, backbone_visual)

    # ---- the transformers tower as it is (model=hf_clip): no conversion, FusionBench's tensors ----------

    def _native_state(self, source: str, name: str) -> StateDict:
        folder = resolve_hf_source(source, self.hub_cache_dir, self.download)
        raw = read_hf_state_dict(folder)
        projection = raw.get("visual_projection.weight")
        if projection is not None and self._native_projection is not None and not torch.equal(
                projection.to(self._native_projection.dtype), self._native_projection):
            raise HFCheckpointError(
                f"{name} ({source}) carries a visual_projection that differs from the backbone's: the transformers "
                f"tower merges vision_model.* only and keeps θ₀'s projection (FusionBench's setting). To merge the "
                f"projection too, use an open_clip backbone (model=vit_b32 ... pool=huggingface converts it).")
        return hf_vision_state(raw, f"{name} ({source})")

    def _native_all(self, sources: dict[str, str]) -> dict[str, StateDict]:
        return self._gather(sources, lambda name, source: self._native_state(source, name))

    def _load_native(self, task_names: list[str], backbone_visual: torch.nn.Module):
        reference = {k: v.detach() for k, v in backbone_visual.state_dict().items()}
        self._dtypes = {k: v.dtype for k, v in reference.items()}
        self._native_projection = getattr(backbone_visual, "projection", None)
        if self.hf_pretrained:
            theta0 = self._native_all({"pretrained": self.hf_pretrained})["pretrained"]
            check_compatible(reference, theta0, source=f"pre-trained model {self.hf_pretrained}")
            theta0 = self._admit(theta0, "pretrained", self.hf_pretrained)
        else:
            theta0 = {k: v.clone() for k, v in reference.items()}
            check_finite(theta0, "the backbone's own vision tower (θ₀)", hint="Check the backbone's weight file.")
        sources = {t: str(self.finetuned[t]) if t in self.finetuned else self.source_for(t) for t in task_names}
        states = self._native_all(sources)
        finetuned = {}
        for task in task_names:
            check_compatible(theta0, states[task], source=f"fine-tuned model of {task!r} ({sources[task]})")
            finetuned[task] = self._admit(states[task], task, sources[task])
            self.filled[task] = frozenset()
        self._native_theta0 = theta0
        return theta0, finetuned

    def load_candidates(self, task: str, theta0: StateDict, need: int = 2) -> list[StateDict]:
        if _native(theta0):
            sources = list(self.hf_candidates.get(task, []))
            if len(sources) < need:
                raise MissingCheckpointError(
                    f"task {task!r} needs {need} fine-tuned models (e.g. its best two checkpoints) but "
                    f"{len(sources)} were given: pool.candidates.{task}=[folder_a,folder_b].")
            states = self._native_all({f"{task}[{i}]": s for i, s in enumerate(sources[:need])})
            out = []
            for name, state in states.items():
                check_compatible(theta0, state, source=f"checkpoint {name}")
                out.append(self._admit(state, name, name))
            return out
        if self._projection is None:
            self._projection = theta0["proj"]
        return super().load_candidates(task, theta0, need)

    def candidate_paths(self, task: str) -> list[Path]:
        if task in self.hf_candidates:
            converted = self._convert_all({f"{task}[{i}]": s for i, s in enumerate(self.hf_candidates[task])})
            return list(converted.values())
        return super().candidate_paths(task)


def hf_checkpoint_pool(pretrained: str | None = None, finetuned: dict[str, str] | None = None,
                       finetuned_dir: str | None = None, pattern: str = "tanganke/{hub_model}_{task}",
                       hub_model: str = "clip-vit-base-patch32", task_names: dict[str, str] | None = None,
                       candidates: dict[str, list[str]] | None = None, cache_dir: str | None = None,
                       hub_cache_dir: str | None = None, download: bool = False) -> HFCheckpointPool:
    """The pool of ``conf/pool/huggingface.yaml``: θ₀ and θₖ from transformers CLIP folders or Hub ids."""
    return HFCheckpointPool(
        hf_pretrained=fill_pattern(pretrained, hub_model=hub_model) if pretrained else None,
        hf_finetuned={k: str(v) for k, v in (finetuned or {}).items()}, hf_dir=finetuned_dir, hf_pattern=pattern,
        hub_model=hub_model, task_names=dict(task_names or {}),
        hf_candidates={k: [str(s) for s in v] for k, v in (candidates or {}).items()},
        cache_dir=cache_dir, hub_cache_dir=hub_cache_dir, download=download)


# ---- a backbone from a transformers CLIPModel ---------------------------------------------------------

def load_hf_clip(source: str, arch: str, hub_cache_dir: str | None = None, download: bool = False):
    """An open_clip :class:`~adamerge.models.backbone.Backbone` with the weights of a transformers ``CLIPModel``.

    ``arch`` is the open_clip architecture with the same shapes *and activation* (OpenAI CLIP uses
    QuickGELU: ``ViT-B-32-quickgelu``, not ``ViT-B-32``); a mismatch is named, not silently accepted.
    """
    from open_clip.transformer import QuickGELU

    from adamerge.models.backbone import load_open_clip

    folder = resolve_hf_source(source, hub_cache_dir, download)
    backbone = load_open_clip(arch, weights_follow=True)  # the CLIPModel's weights replace them below
    config_path = (folder if folder.is_dir() else folder.parent) / "config.json"
    if config_path.exists():
        act = json.loads(config_path.read_text()).get("vision_config", {}).get("hidden_act", "quick_gelu")
        quick = any(isinstance(m, QuickGELU) for m in backbone.clip.visual.modules())
        if (act == "quick_gelu") != quick:
            raise HFCheckpointError(
                f"{source} uses activation {act!r} but open_clip architecture {arch!r} uses "
                f"{'QuickGELU' if quick else 'GELU'}: choose the matching architecture (e.g. '{arch}-quickgelu').")
    state = hf_clip_to_open_clip(read_hf_state_dict(folder), source=str(source))
    reference = backbone.clip.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(reference[k].shape)}" for k, v in state.items()
              if k in reference and v.shape != reference[k].shape]
    if shapes:
        raise HFCheckpointError(f"{source} does not fit open_clip {arch!r}: {'; '.join(shapes[:6])}. "
                                f"Choose the architecture it was trained with.")
    result = backbone.clip.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "attn_mask"]
    if missing or result.unexpected_keys:
        raise HFCheckpointError(f"{source} -> open_clip {arch!r}: missing {_listing(missing)}; "
                                f"unexpected {_listing(result.unexpected_keys)}")
    backbone.clip.eval().requires_grad_(False)
    return backbone
