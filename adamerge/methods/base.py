"""What every merge method receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from adamerge.data.task import Task
from adamerge.merging.task_vectors import TaskVectorView

if TYPE_CHECKING:  # the CLIP side, imported where it runs: model-directory merges never load open_clip
    from adamerge.models.backbone import Backbone

StateDict = dict[str, torch.Tensor]
TRIM_COUNTS = ("image_encoder", "tower")


@dataclass
class MergeContext:
    backbone: Backbone
    tasks: list[Task]
    pretrained: StateDict                 # θ₀ of the vision tower
    finetuned: dict[str, StateDict]       # θₖ per task name
    heads: dict[str, torch.Tensor]        # frozen zero-shot heads per task name
    run_dir: Path
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 256
    make_trainer: Callable | None = None  # () -> lightning.Trainer, for methods that train
    ckpt_path: str | None = None          # resume a training method from this Lightning checkpoint
    pool: object | None = None            # the CheckpointPool: methods that need more checkpoints per task
    # TIES's n (see adamerge/merging/ties.py): zero-τ entries of the official ImageEncoder beside the tower,
    # and per task the tensors its fine-tuned file lacked (filled in from θ₀, outside the trimming domain)
    image_encoder_extra: int = 0
    filled: dict[str, frozenset] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @cached_property
    def vectors(self) -> list[StateDict]:
        """τₖ per task, computed tensor by tensor on access (no second full copy of every checkpoint)."""
        return [TaskVectorView(self.finetuned[n], self.pretrained, source=f"fine-tuned checkpoint of {n!r}")
                for n in self.task_names]

    def ties_rule(self, trim_count: str, zero_sign: str = "majority") -> dict:
        """Keyword arguments of the TIES functions for ``trim_count``: 'image_encoder' counts, as the official
        AdaMerging code, the ImageEncoder's text-side tensors (zero τ) in n; 'tower' counts the tower as the
        fine-tuned checkpoints hold it (FusionBench). Tensors filled in from θ₀ are never counted in 'tower'."""
        if trim_count not in TRIM_COUNTS:
            raise ValueError(f"unknown TIES trim_count {trim_count!r}; valid: {', '.join(TRIM_COUNTS)}")
        if trim_count == "image_encoder":
            return {"zero_sign": zero_sign, "extra_zeros": self.image_encoder_extra}
        return {"zero_sign": zero_sign, "uncounted": [self.filled.get(n, frozenset()) for n in self.task_names]}

    def evaluate(self, params: StateDict | Mapping[str, StateDict], split: str = "test", per_task: bool = False) -> dict[str, float]:
        from adamerge.evaluation.accuracy import accuracies

        by_task = params if per_task else {n: params for n in self.task_names}
        return accuracies(self.backbone.visual, by_task, self.heads, self.tasks, split, self.eval_batch_size, self.device)


@dataclass
class MergeResult:
    """Either one merged tower (``params``) or one tower per task (``per_task``, e.g. Individual).

    ``steps``: optimiser steps a Lightning trainer ran (None: no trainer ran); ``figures``: name → image file
    (the λ heatmap, the adaptation curves); ``extra``: what else the run record keeps (chosen λ, timings, …)."""

    params: StateDict | None = None
    per_task: dict[str, StateDict] | None = None
    extra: dict = field(default_factory=dict)
    steps: int | None = None
    figures: dict[str, str] = field(default_factory=dict)


TensorMerge = Callable[[str], torch.Tensor]


class NeedsEvaluation(ValueError):
    """A method (or an option of it) that needs data or an evaluation, asked to merge weights alone."""


class Method:
    """A merge method. ``label`` is the table row (a join key of the presets' reference numbers); every
    ``conf/method/*.yaml`` states it, so the row names live in the config tree. Built without one (library use),
    a method is labelled by its class name.

    ``run`` merges in a :class:`MergeContext` (CLIP: tasks, heads, data). ``weights_merger`` merges weights
    alone — model directories of any architecture, tensor by tensor — for the methods that need no data."""

    label = "Method"
    models_taken: tuple[int, int | None] = (1, None)  # (min, max) models weights_merger takes
    needs_checkpoints = True  # False: the method brings its own weights (evaluate_saved); the pool is not read

    def run(self, ctx: MergeContext) -> MergeResult:  # pragma: no cover - interface
        raise NotImplementedError

    def weights_merger(self, base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                       seed: int = 0) -> TensorMerge:
        """``merged(key)`` for every floating-point key of ``base``; ``base`` and ``models`` read each tensor on
        access (in the compute dtype), so a merge streams through models far larger than memory."""
        raise NeedsEvaluation(f"{type(self).__name__} ({self.label}) needs data (images, labels or an evaluation), "
                              "not weights alone; run it in an experiment: adamerge method=…")

    def check_models(self, count: int) -> None:
        low, high = self.models_taken
        if count < low or (high is not None and count > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ValueError(f"{self.label} takes {wanted} fine-tuned model(s), got {count}")


def one(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A one-tensor state dict: the state-dict functions of adamerge.merging, applied tensor by tensor."""
    return {key: value}


def no_evaluation(**options) -> None:
    """Refuse options that choose by evaluation (a λ grid, a search objective) when weights are merged alone."""
    set_ = [f"{name}={value!r}" for name, value in options.items() if value not in (None, [], ())]
    if set_:
        raise NeedsEvaluation(f"{', '.join(set_)} chooses by evaluating candidates, which merging weights alone cannot "
                              "do; give fixed values (lam_grid=null, objective=null) or run the search in an experiment")


class LabelMismatch(ValueError):
    """A row label that says something else than the method's options (it would name a wrong row)."""


def require_label(label: str, wrong: dict[str, bool], fix: str) -> str:
    """Refuse a ``label`` that says something false about the options: ``wrong`` maps what the label would
    wrongly claim to whether it does (e.g. ``{"'++' without TIES trimming": "++" in label and not trimmed}``).
    Free labels that claim nothing (``method.label=mine``) pass."""
    false = [claim for claim, is_false in wrong.items() if is_false]
    if false:
        raise LabelMismatch(f"row label {label!r} would mislead: {'; '.join(false)}. {fix}")
    return label
