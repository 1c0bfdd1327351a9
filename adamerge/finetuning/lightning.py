"""Fine-tuning one task's vision tower as a LightningModule, so it runs on a CPU, one GPU or DDP.

The task-vectors protocol (Ilharco et al. 2023; the checkpoints AdaMerging merges): only the image
encoder θ trains; the classification head W is the task's zero-shot head, built from the text tower
and frozen, with CLIP's logit scale folded in, so the loss is
    CE(normalise(f_θ(x)) · Wᵀ, y)
and every fine-tuned θₖ shares θ₀'s output space. AdamW, linear warm-up then cosine decay.
:func:`finetune_task` is the one fine-tuning path: ``adamerge-finetune`` and the embedded world's
builder both call it, each with its recipe (``conf/finetune/*.yaml``, ``conf/world/*.yaml``).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchmetrics.classification import MulticlassAccuracy

from adamerge.data.task import Task
from adamerge.finetuning.schedule import decay_groups, warmup_cosine
from adamerge.models.checkpoints import save_state_dict
from adamerge.models.heads import logits

log = logging.getLogger(__name__)

VAL_METRIC = "val_acc"  # what ModelCheckpoint ranks by (no "/": it is part of the checkpoint file names)
DECAY_CHOICES = ("all", "matrices")
SHUFFLES = ("epoch", "stream")


class VisionTowerFinetuner(L.LightningModule):
    """Trains a copy of ``visual``; ``head`` [C, D] is a frozen buffer (the zero-shot head).

    The module holds nothing else of CLIP: the text tower never enters the graph, and Lightning
    checkpoints hold the vision tower and the optimiser state only. ``decay='all'`` puts weight
    decay on every tensor as task_vectors does; ``'matrices'`` spares biases, norms and embeddings
    (CLIP's pre-training habit, used by the embedded world).
    """

    def __init__(self, visual: torch.nn.Module, head: torch.Tensor, lr: float = 1e-5, weight_decay: float = 0.1,
                 warmup_steps: int = 500, decay: str = "all"):
        super().__init__()
        if decay not in DECAY_CHOICES:
            raise ValueError(f"unknown weight-decay scope {decay!r}; valid: {', '.join(DECAY_CHOICES)}")
        if head.ndim != 2:
            raise ValueError(f"a zero-shot head is a [classes, dim] matrix; got shape {tuple(head.shape)}")
        self.visual = copy.deepcopy(visual).train().requires_grad_(True)  # never move the caller's θ₀
        self.register_buffer("head", head.detach().clone(), persistent=False)
        self.lr, self.weight_decay, self.warmup_steps, self.decay = lr, weight_decay, warmup_steps, decay
        self.val_acc = MulticlassAccuracy(num_classes=head.shape[0], average="micro")
        self.validated_at: tuple[int, float] | None = None  # (step, val acc) of the latest validation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits(self.visual(images), self.head)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        out = self(images)
        loss = F.cross_entropy(out, labels)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (out.argmax(-1) == labels).float().mean())
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.val_acc(self(images), labels)
        self.log(VAL_METRIC, self.val_acc, on_step=False, on_epoch=True, prog_bar=True)  # synced across ranks

    def on_validation_end(self):
        if not self.trainer.sanity_checking and VAL_METRIC in self.trainer.callback_metrics:
            self.validated_at = (self.global_step, float(self.trainer.callback_metrics[VAL_METRIC]))

    def configure_optimizers(self):
        params = (decay_groups(self.visual, self.weight_decay) if self.decay == "matrices"
                  else [{"params": [p for p in self.visual.parameters() if p.requires_grad],
                         "weight_decay": self.weight_decay}])
        optimizer = torch.optim.AdamW(params, lr=self.lr)
        total = int(self.trainer.estimated_stepping_batches)  # min(max_steps, epochs × batches per epoch)
        schedule = warmup_cosine(optimizer, total, self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def vision_state(self) -> dict[str, torch.Tensor]:
        """θₖ keyed like ``backbone.visual.state_dict()`` (what pools and merges read)."""
        return {k: v.detach().cpu().clone() for k, v in self.visual.state_dict().items()}


class StreamBatches(Sampler):
    """One seeded stream of permutations for the whole run: each pass over the data is the next permutation,
    cut into full batches (the incomplete remainder is dropped). A new epoch continues the stream."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if not 0 < batch_size <= size:
            raise ValueError(f"a batch of {batch_size} from {size} training images: lower finetune.batch_size")
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator)
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size].tolist()


class TaskDataModule(L.LightningDataModule):
    """The ``train`` and ``val`` splits of one task.

    ``batch_size`` is the *global* batch (128 in task_vectors): under DDP each rank loads
    ``batch_size / world size`` images. ``shuffle='epoch'``: the order of epoch e is a permutation drawn
    from ``seed + e`` (a ``DistributedSampler``, also on one device), so a resumed run sees the same batches
    as an uninterrupted one, and N ranks together see the same global batches as one device.
    ``shuffle='stream'``: :class:`StreamBatches` (one device; the embedded world's recipe).
    """

    def __init__(self, task: Task, batch_size: int = 128, num_workers: int = 0, val_batch_size: int | None = None,
                 seed: int = 0, shuffle: str = "epoch"):
        super().__init__()
        if shuffle not in SHUFFLES:
            raise ValueError(f"unknown finetune.shuffle {shuffle!r}; valid: {', '.join(SHUFFLES)}")
        self.task, self.batch_size, self.num_workers, self.seed = task, batch_size, num_workers, seed
        self.val_batch_size, self.shuffle = val_batch_size or batch_size, shuffle

    def _ranks(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _per_rank(self, size: int) -> int:
        world, _ = self._ranks()
        if size % world:
            raise ValueError(f"batch size {size} is not divisible by the {world} DDP processes; "
                             f"choose finetune.batch_size as a multiple of trainer.devices × nodes")
        return size // world

    def _split(self, split: str):
        dataset = self.task.split(split)
        if len(dataset) == 0:
            raise ValueError(f"task {self.task.name!r} has an empty {split!r} split: nothing to fine-tune on")
        return dataset

    def train_dataloader(self) -> DataLoader:
        dataset = self._split("train")
        world, rank = self._ranks()
        if self.shuffle == "stream":
            if world > 1:
                raise ValueError("finetune.shuffle=stream is a single-device order; use shuffle=epoch with DDP")
            return DataLoader(dataset, batch_sampler=StreamBatches(len(dataset), self.batch_size, self.seed),
                              num_workers=self.num_workers)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(dataset, batch_size=self._per_rank(self.batch_size), sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:  # Lightning shards it across DDP ranks
        world, _ = self._ranks()
        return DataLoader(self._split("val"), batch_size=max(1, self.val_batch_size // world), shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())


@dataclass(frozen=True)
class FinetuneRecipe:
    """The fine-tuning choices of one preset (``conf/finetune/*.yaml``); defaults are task_vectors'.

    The budget is per task in epochs, as in the literature (``epochs``; ``default_epochs`` for tasks
    not listed); ``max_steps`` (-1: none) caps it, e.g. for smoke runs. ``batch_size`` is global.
    """

    lr: float = 1e-5
    weight_decay: float = 0.1
    decay: str = "all"
    batch_size: int = 128
    warmup_steps: int = 500
    grad_clip_norm: float | None = 1.0
    epochs: dict[str, int] = field(default_factory=dict)
    default_epochs: int | None = None
    max_steps: int = -1
    val_every_n_steps: int | None = None  # None: validate after every epoch
    val_batch_size: int = 256
    keep_best: int = 2
    num_workers: int = 0
    shuffle: str = "epoch"  # epoch: seed + epoch per epoch, any number of ranks | stream: one stream, one device

    def __post_init__(self):
        if self.decay not in DECAY_CHOICES:
            raise ValueError(f"finetune.decay={self.decay!r} is not one of {', '.join(DECAY_CHOICES)}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"finetune.shuffle={self.shuffle!r} is not one of {', '.join(SHUFFLES)}")
        if self.keep_best < 1:
            raise ValueError(f"finetune.keep_best={self.keep_best}: keep at least one checkpoint")

    def epochs_for(self, task: str) -> int:
        """The task's budget in epochs (task_vectors: Cars 35 … SVHN 4), or an error saying how to set one."""
        for key in (task, task.lower()):
            if key in self.epochs:
                return int(self.epochs[key])
        if self.default_epochs is not None:
            return int(self.default_epochs)
        raise KeyError(f"no fine-tuning budget for task {task!r}: finetune.epochs has {sorted(self.epochs)} and "
                       f"finetune.default_epochs is null. Add finetune.epochs.{task}=N, set finetune.default_epochs=N, "
                       f"or cap the run with finetune.max_steps=N.")


@dataclass
class FinetuneOutcome:
    """What one fine-tuning run leaves: the module (final θₖ), its trainer, the top checkpoints by val accuracy
    (Lightning files, best first) and the final weights' val accuracy (NaN on ranks other than zero)."""

    module: VisionTowerFinetuner
    trainer: L.Trainer
    best: list[tuple[Path, float]]
    val_accuracy: float


def finetune_task(visual: torch.nn.Module, head: torch.Tensor, task: Task, recipe: FinetuneRecipe, *, seed: int,
                  ckpt_dir: str | Path, make_trainer, epochs: int = -1, ckpt_path: str | None = None,
                  device: str = "cpu") -> FinetuneOutcome:
    """Fine-tune ``visual`` (a copy) on ``task`` with ``recipe``: the one path of ``adamerge-finetune`` and of the
    embedded world. ``make_trainer(max_epochs=, callbacks=, **validation schedule)`` gives the Lightning Trainer
    (the CLI's from its config, the world's a plain CPU one); ``epochs`` is the budget (-1: ``max_steps`` alone)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from adamerge.evaluation.accuracy import dataset_accuracy

    module = VisionTowerFinetuner(visual, head, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                  warmup_steps=recipe.warmup_steps, decay=recipe.decay)
    data = TaskDataModule(task, batch_size=recipe.batch_size, num_workers=recipe.num_workers,
                          val_batch_size=recipe.val_batch_size, seed=int(seed), shuffle=recipe.shuffle)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}-val_acc{val_acc:.4f}",
                                 auto_insert_metric_name=False, monitor=VAL_METRIC, mode="max",
                                 save_top_k=recipe.keep_best, save_last=True)
    val_schedule = ({"val_check_interval": recipe.val_every_n_steps, "check_val_every_n_epoch": None}
                    if recipe.val_every_n_steps else {})
    trainer = make_trainer(max_epochs=epochs, callbacks=[checkpoint], **val_schedule)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return FinetuneOutcome(module, trainer, [], float("nan"))
    if module.validated_at is not None and module.validated_at[0] == trainer.global_step:
        val_accuracy = module.validated_at[1]  # the last validation saw the final weights
    else:  # the step cap ended the run between validations
        val_accuracy = dataset_accuracy(module.visual, module.head, task.split("val"), batch_size=recipe.val_batch_size,
                                        device=device)
    best = ranked_checkpoints(checkpoint.best_k_models)
    if len(best) < recipe.keep_best:
        log.warning("%s: only %d validation(s) ran, so %d best checkpoint(s) instead of %d; validate more often "
                    "(finetune.val_every_n_steps=N)", task.name, len(best), len(best), recipe.keep_best)
    return FinetuneOutcome(module, trainer, best, val_accuracy)


def vision_state_from_lightning_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """``(θ, global step)`` from a Lightning checkpoint this module wrote (tensors only, no pickled code)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("visual."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("visual.")}
    if not state:
        raise ValueError(f"{path} holds no vision-tower tensors ('visual.*'): not a fine-tuning checkpoint")
    return state, int(ckpt["global_step"])


def ranked_checkpoints(best_k_models: Mapping[str, torch.Tensor | float]) -> list[tuple[Path, float]]:
    """ModelCheckpoint's top-k as ``(path, val acc)``, best first; ties keep the earlier file (by name)."""
    scored = [(Path(p), float(s)) for p, s in best_k_models.items() if s is not None and math.isfinite(float(s))]
    return sorted(scored, key=lambda item: (-item[1], item[0].name))


def export_finetuned(folder: str | Path, task: str, final: Mapping[str, torch.Tensor], metadata: Mapping,
                     best: list[tuple[Path, float]], best_folder: str | Path | None = None) -> dict[str, Path | list[Path]]:
    """Write the native files the merge pools read, each atomically:

    ``folder/<task>.safetensors`` (the final θₖ) and ``folder/<task>/best-<i>.safetensors`` (the top
    checkpoints by val accuracy, best first: Extrapolation Merging's candidates). Older ``best-*`` files
    beyond this run's count are removed, so a pool never mixes runs.
    """
    folder = Path(folder)
    best_folder = Path(best_folder) if best_folder is not None else folder
    main = save_state_dict(folder / f"{task}.safetensors", final, {**metadata, "model": "finetuned"})
    written = []
    for rank, (path, score) in enumerate(best, start=1):
        state, step = vision_state_from_lightning_checkpoint(path)
        written.append(save_state_dict(best_folder / task / f"best-{rank}.safetensors", state,
                                       {**metadata, "model": f"best-{rank}", "steps": step, "val_accuracy": score,
                                        "lightning_checkpoint": str(path)}))
    for stale in (best_folder / task).glob("best-*.safetensors"):
        if stale not in written:
            stale.unlink()
    return {"final": main, "best": written}
