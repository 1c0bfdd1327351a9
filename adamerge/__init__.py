"""adamerge: learn how to merge fine-tuned models (AdaMerging, task arithmetic, TIES, ...)."""

from adamerge.compat.torchvision_ops import ensure_torchvision_importable

# Must run before anything imports torchvision (open_clip, lightning, torchmetrics do).
TORCHVISION_REPAIR = ensure_torchvision_importable()

__version__ = "0.1.0"


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
