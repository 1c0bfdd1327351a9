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
    """Run one composed config (:func:`compose`); returns the mean test accuracy (val with optimized_metric=val;
    an LLM experiment: Extrapolation Merging's mean test score)."""
    return runner(cfg)(cfg)


def runner(cfg):
    """The run function a composed config asks for: the LLM pipeline for an ``llm`` block (experiment=llm_demo and
    the llm presets), else the merge-and-evaluate run of the CLIP experiments."""
    if cfg.get("llm") is not None:
        from adamerge.llm.pipeline import run_llm

        return run_llm
    from adamerge.experiment import run

    return run
