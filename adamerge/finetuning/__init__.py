"""Fine-tuning vision towers with frozen zero-shot heads (plain PyTorch, no Lightning)."""

from adamerge.finetuning.vision_tower import Checkpoint, FinetuneConfig, FinetuneResult, finetune_vision_tower

__all__ = ["Checkpoint", "FinetuneConfig", "FinetuneResult", "finetune_vision_tower"]
