"""The ``adamerge`` command: a Hydra app over the config tree (``adamerge/conf``)."""

from __future__ import annotations

import adamerge  # noqa: F401  (torchvision repair before Hydra instantiates anything)
import hydra
from omegaconf import DictConfig

from adamerge.runtime.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    import sys

    from adamerge.adaptation.checkpointing import RunInterrupted
    from adamerge.api import runner

    try:
        return runner(cfg)(cfg)
    except RunInterrupted as stopped:  # Ctrl-C / SIGTERM: the resume command, no traceback; a sweep stops too
        print(f"adamerge: {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
