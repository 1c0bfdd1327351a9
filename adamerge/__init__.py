"""adamerge: learn how to merge fine-tuned models (AdaMerging, task arithmetic, TIES, ...)."""

from adamerge.compat.torchvision_ops import ensure_torchvision_importable

# Must run before anything imports torchvision (open_clip, lightning, torchmetrics do).
TORCHVISION_REPAIR = ensure_torchvision_importable()

__version__ = "0.1.0"

from adamerge.api import compose, run  # noqa: E402  (after the repair: the API imports nothing heavy until called)

__all__ = ["compose", "run", "__version__"]
