"""The embedded offline world: a small CLIP pre-trained here, eight tasks, fine-tuned vision towers.

Everything is built locally (no downloads) and cached; see ``world.py``.
"""

from adamerge.embedded.presets import WORLD_VERSION, WorldPreset, available_presets, get_preset
from adamerge.embedded.tasks import TASK_NAMES
from adamerge.embedded.world import (build_world, embedded_backbone, embedded_best_checkpoints, embedded_pool,
                                     embedded_tasks, read_manifest, world_dir)

__all__ = ["TASK_NAMES", "available_presets", "WORLD_VERSION", "WorldPreset", "build_world", "embedded_backbone",
           "embedded_best_checkpoints", "embedded_pool", "embedded_tasks", "get_preset", "read_manifest", "world_dir"]
