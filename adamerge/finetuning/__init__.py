"""Fine-tuning vision towers with frozen zero-shot heads: one path (:func:`finetune_task`, a Lightning module),
which ``adamerge-finetune`` and the embedded world's builder both use."""

from adamerge.finetuning.lightning import (FinetuneOutcome, FinetuneRecipe, TaskDataModule, VisionTowerFinetuner,
                                           export_finetuned, finetune_task)

__all__ = ["FinetuneOutcome", "FinetuneRecipe", "TaskDataModule", "VisionTowerFinetuner", "export_finetuned",
           "finetune_task"]
