"""Fine-tuning vision towers with frozen zero-shot heads: the plain loop (the embedded world's) and the
Lightning module behind ``adamerge-finetune`` (imported on first use, so the plain loop needs no Lightning)."""

from adamerge.finetuning.vision_tower import Checkpoint, FinetuneConfig, FinetuneResult, finetune_vision_tower

_LIGHTNING = ("FinetuneRecipe", "TaskDataModule", "VisionTowerFinetuner", "export_finetuned")

__all__ = ["Checkpoint", "FinetuneConfig", "FinetuneResult", "finetune_vision_tower", *_LIGHTNING]


def __getattr__(name: str):
    if name in _LIGHTNING:
        from adamerge.finetuning import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
