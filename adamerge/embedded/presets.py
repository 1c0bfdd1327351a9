"""The embedded world's sizes, read from the config tree (``adamerge/conf/world/<preset>.yaml``: demo, tiny, and
the opt-in logit-scale experiments demo100, demo100post). This module only gives them a type.

A preset file may name a ``base`` preset whose values it changes (nested mappings are merged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from adamerge.embedded.pretraining import PretrainConfig
from adamerge.finetuning.lightning import FinetuneRecipe
from adamerge.runtime.config import CONF_DIR

WORLD_VERSION = 1  # bump when anything that changes the built files changes
WORLD_DIR = CONF_DIR / "world"


@dataclass(frozen=True)
class WorldPreset:
    name: str
    arch: str  # an open_clip architecture from adamerge/models/architectures/
    split_sizes: dict[str, int]  # images per split for every procedural task (digits: at most)
    pool_size: int  # pre-training pictures (re-captioned every time they are drawn)
    pretrain: PretrainConfig
    finetune: FinetuneRecipe  # the recipe adamerge-finetune reads too; its max_steps is the default budget
    finetune_steps: dict[str, int] = field(default_factory=dict)  # per-task budgets in steps


def available_presets(folder: Path | None = None) -> list[str]:
    return sorted(p.stem for p in Path(folder or WORLD_DIR).glob("*.yaml"))


def _values(name: str, folder: Path, seen: tuple[str, ...] = ()) -> dict:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown embedded-world preset {name!r}; valid presets: {', '.join(available_presets(folder))} "
                         f"(files in {folder})")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    base = values.pop("base", None)
    if base is None:
        return values
    if base in seen + (name,):
        raise ValueError(f"world preset {name!r}: its base chain {' -> '.join(seen + (name, base))} loops")
    return OmegaConf.to_container(OmegaConf.merge(_values(base, folder, seen + (name,)), values), resolve=True)


def get_preset(name: str, folder: Path | None = None) -> WorldPreset:
    """The preset ``name`` as typed values (unknown names list the valid ones)."""
    values = _values(name, Path(folder or WORLD_DIR))
    return WorldPreset(name=values["name"], arch=values["arch"], split_sizes=dict(values["split_sizes"]),
                       pool_size=int(values["pool_size"]), pretrain=PretrainConfig(**values["pretrain"]),
                       finetune=FinetuneRecipe(**values["finetune"]),
                       finetune_steps=dict(values.get("finetune_steps") or {}))
