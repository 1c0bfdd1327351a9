"""The ``adamerge`` command: a Hydra app over ``conf/``."""

from __future__ import annotations

import os
from pathlib import Path

import adamerge  # noqa: F401  (torchvision repair before Hydra instantiates anything)
import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(os.environ.get("ADAMERGE_CONF", Path(__file__).resolve().parent.parent / "conf"))


def unique_suffix() -> str:
    """Process id + 4 random hex digits: two runs started in the same second (on one host or many sharing a
    file system) never share a run folder, so no record points at another run's coefficients or logs."""
    import secrets

    return f"{os.getpid()}-{secrets.token_hex(2)}"


if not OmegaConf.has_resolver("adamerge.unique"):
    OmegaConf.register_new_resolver("adamerge.unique", unique_suffix, use_cache=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    import sys

    from adamerge.adaptation.checkpointing import RunInterrupted
    from adamerge.experiment import run

    try:
        return run(cfg)
    except RunInterrupted as stopped:  # Ctrl-C / SIGTERM: the resume command, no traceback; a sweep stops too
        print(f"adamerge: {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
