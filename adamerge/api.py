"""The Python API: compose a config from the tree and run it, as the command line does, with no Hydra app."""

from __future__ import annotations


def compose(overrides=(), config_name: str = "config"):
    """The job config of ``adamerge <overrides>``, composed from the config tree without a Hydra app::

        cfg = adamerge.compose(["method=task_arithmetic", "method.lam=0.3"])
        avg = adamerge.run(cfg)   # one run: merge, evaluate, record (as the command line does)
    """
    from adamerge.runtime.config import compose as _compose

    return _compose(overrides, config_name)


def run(cfg) -> float:
    """Run one composed config (:func:`compose`); returns the mean test accuracy (val with optimized_metric=val)."""
    from adamerge.experiment import run as _run

    return _run(cfg)
