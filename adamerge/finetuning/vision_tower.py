"""Fine-tune a CLIP vision tower on one task with its frozen zero-shot head (the task-vectors protocol).

As in Ilharco et al., only the image encoder moves: the classification head is the zero-shot head
built from the text tower and stays fixed, so every fine-tuned model shares the pre-trained model's
output space and task vectors θₖ − θ₀ live in one weight space. AdamW, linear warm-up, cosine decay.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from adamerge.evaluation.accuracy import dataset_accuracy
from adamerge.finetuning.schedule import decay_groups, warmup_cosine
from adamerge.models.heads import logits


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    eval_every: int = 0  # >0: measure val accuracy every so many steps and keep the best checkpoints
    keep_best: int = 2
    seed: int = 0


@dataclass
class Checkpoint:
    step: int
    val_accuracy: float
    state_dict: dict[str, torch.Tensor]


@dataclass
class FinetuneResult:
    """The final vision state dict (θₖ), the best ``keep_best`` by val accuracy, and the val curve."""

    state_dict: dict[str, torch.Tensor]
    best: list[Checkpoint] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def dataset_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a small in-memory dataset (``TensorImages`` directly, anything else stacked)."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        return dataset.images, torch.as_tensor(dataset.labels)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def finetune_vision_tower(visual: torch.nn.Module, head: torch.Tensor, train: Dataset, *, val: Dataset | None = None,
                          config: FinetuneConfig = FinetuneConfig()) -> FinetuneResult:
    """Fine-tune a copy of ``visual`` with cross-entropy on ``logits(visual(x), head)``.

    ``visual`` and ``head`` are not modified. Returns state dicts keyed like ``visual.state_dict()``.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = copy.deepcopy(visual).train().requires_grad_(True)
    head = head.detach()
    images, labels = dataset_tensors(train)
    optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr)
    schedule = warmup_cosine(optimizer, config.steps, config.warmup_steps)
    gen = torch.Generator().manual_seed(config.seed)
    order, cursor = torch.randperm(len(labels), generator=gen), 0
    best: list[Checkpoint] = []
    history: list[tuple[int, float]] = []
    for step in range(1, config.steps + 1):
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(labels), generator=gen), 0
        batch = order[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        loss = F.cross_entropy(logits(model(images[batch]), head), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if val is not None and config.eval_every > 0 and (step % config.eval_every == 0 or step == config.steps):
            acc = dataset_accuracy(model, head, val, batch_size=512)
            model.train()
            history.append((step, acc))
            if len(best) < config.keep_best or acc > best[-1].val_accuracy:
                best = sorted(best + [Checkpoint(step, acc, _state(model))], key=lambda c: -c.val_accuracy)[:config.keep_best]
    model.eval().requires_grad_(False)
    return FinetuneResult(_state(model), best, history, time.perf_counter() - start)
