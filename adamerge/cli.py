"""The ``adamerge`` command: a Hydra app over ``conf/``."""

from __future__ import annotations

import os
from pathlib import Path

import adamerge  # noqa: F401  (torchvision repair before Hydra instantiates anything)
import hydra
from omegaconf import DictConfig

CONF_DIR = Path(os.environ.get("ADAMERGE_CONF", Path(__file__).resolve().parent.parent / "conf"))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from adamerge.experiment import run

    return run(cfg)
