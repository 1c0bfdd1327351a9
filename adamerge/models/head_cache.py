"""Zero-shot heads cached on disk, keyed by *content* — never by path or task name.

A cache keyed by names silently serves stale heads when weights or class names change; this key
hashes the text-side weights, the class names and the templates.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from adamerge.data.task import Task
from adamerge.models.backbone import Backbone
from adamerge.models.checkpoints import CheckpointError, load_state_dict, save_state_dict
from adamerge.models.heads import zero_shot_head


def text_side_digest(backbone: Backbone) -> str:
    """Hash of every CLIP tensor outside the vision tower (all that a zero-shot head depends on)."""
    h = hashlib.sha256(backbone.name.encode())
    tokenizer = getattr(backbone.tokenizer, "tokenizer", None)  # a transformers tokenizer: its vocabulary counts too
    if tokenizer is not None:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for key, value in backbone.text_state():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def head_key(text_digest: str, task: Task) -> str:
    payload = json.dumps({"text": text_digest, "classnames": task.classnames, "templates": task.templates})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cached_heads(backbone: Backbone, tasks: list[Task], cache_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """One head per task, read from ``cache_dir/heads`` when its content key matches, else built and stored."""
    if cache_dir is None:
        return {t.name: zero_shot_head(backbone, t.classnames, t.templates) for t in tasks}
    folder = Path(cache_dir) / "heads"
    digest = text_side_digest(backbone)
    heads = {}
    for task in tasks:
        path = folder / f"{task.name}-{head_key(digest, task)}.safetensors"
        try:
            heads[task.name] = load_state_dict(path)["head"]
            continue
        except (FileNotFoundError, CheckpointError, KeyError):
            pass
        heads[task.name] = zero_shot_head(backbone, task.classnames, task.templates)
        save_state_dict(path, {"head": heads[task.name]}, metadata={"task": task.name})
    return heads
