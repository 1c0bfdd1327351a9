"""Where the config tree lives, and composing it without Hydra's runtime.

The tree ships inside the package (``adamerge/conf``), so an installed wheel finds it; ``$ADAMERGE_CONF``
points elsewhere. :func:`compose` gives the job config ``@hydra.main`` would pass to a run — with the run
folder, the working directory and the chosen group options filled in — so notebooks and scripts call
``adamerge.run(adamerge.compose([...]))`` with no Hydra app around them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(os.environ.get("ADAMERGE_CONF", Path(__file__).resolve().parent.parent / "conf"))


def unique_suffix() -> str:
    """Process id + 4 random hex digits: two runs started in the same second (on one host or many sharing a
    file system) never share a run folder, so no record points at another run's coefficients or logs."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("adamerge.unique"):
        OmegaConf.register_new_resolver("adamerge.unique", unique_suffix, use_cache=True)


register_resolvers()


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The job config of ``adamerge <overrides>`` (a single run), ready for :func:`adamerge.run`.

    ``${hydra:...}`` interpolations are replaced by their values (run folder ``outputs/<name>/<time>_<id>``
    under the current directory, the chosen options), so nothing reads Hydra's runtime later.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    run_dir = Path(OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]).absolute()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(Path.cwd())
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} once, below
    job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(job):
        del job["hydra"]
        for key, value in (("method_name", choices.get("method")), ("model_name", choices.get("model"))):
            if key in job:
                job[key] = value
        if "paths" in job:
            for key in ("root_dir", "output_dir"):
                if key in job.paths:
                    job.paths[key] = OmegaConf.select(cfg, f"paths.{key}")
    return job

