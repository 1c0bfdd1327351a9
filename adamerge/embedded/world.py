"""Build, cache and load the embedded offline world: a small CLIP, its tasks and fine-tuned models.

Nothing is downloaded: the CLIP is pre-trained here, contrastively, on captioned pictures drawn
procedurally (and scikit-learn's digits); each task's vision tower is then fine-tuned with the
task-vectors protocol. A world lives in ``<cache_dir>/<preset>-v<version>-seed<seed>/``; a file
lock makes concurrent callers wait for one build, and ``manifest.json``, written last, marks a
world complete (an interrupted build is rebuilt, never half-used).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from adamerge.data.task import BenchmarkTasks, Task, TensorImages
from adamerge.embedded.captions import CaptionPool, caption_corpus
from adamerge.embedded.digits import digit_splits
from adamerge.embedded.presets import WORLD_VERSION, WorldPreset, get_preset
from adamerge.embedded.pretraining import pretrain_clip
from adamerge.embedded.tasks import SPLITS, TASK_NAMES, TASK_SPECS, TaskSpec, make_task_splits, task_spec
from adamerge.evaluation.accuracy import dataset_accuracy
from adamerge.finetuning.lightning import finetune_task, vision_state_from_lightning_checkpoint
from adamerge.merging import task_arithmetic, task_vector
from adamerge.models.backbone import Backbone, load_open_clip
from adamerge.models.checkpoints import save_state_dict
from adamerge.models.pool import CheckpointPool
from adamerge.runtime.process import QUIET_WARNINGS
from adamerge.runtime.progress import progress
from adamerge.models.heads import zero_shot_head
from adamerge.io import save_atomic, write_text_atomic

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SANITY_LAMBDAS = (0.1, 0.2, 0.3)  # task arithmetic θ₀ + λ·Στₖ measured at build, as a sanity check


def world_dir(cache_dir: str | Path, preset: str = "demo", seed: int = 0) -> Path:
    return Path(cache_dir).expanduser() / f"{preset}-v{WORLD_VERSION}-seed{seed}"


def read_manifest(world: Path) -> dict | None:
    """The manifest of a complete world of this version, or None."""
    try:
        manifest = json.loads((world / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("version") == WORLD_VERSION else None


def build_world(cache_dir: str | Path, *, preset: str = "demo", seed: int = 0) -> Path:
    """Build the world once (idempotent, safe across processes) and return its folder."""
    config = get_preset(preset)
    world = world_dir(cache_dir, preset, seed)
    if read_manifest(world) is not None:
        return world
    world.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(world) + ".lock"):
        if read_manifest(world) is not None:  # another process built it while we waited
            return world
        if world.exists():
            log.info("removing incomplete world %s", world)
            shutil.rmtree(world)
        world.mkdir(parents=True)
        _build(world, config, seed)
    return world


def _normalizer(backbone: Backbone) -> tuple[list[float], list[float]]:
    """The mean / std of the backbone's own preprocess (open_clip's OpenAI values by default)."""
    cfg = getattr(backbone.visual, "preprocess_cfg", {}) or {}
    return list(cfg.get("mean", OPENAI_DATASET_MEAN)), list(cfg.get("std", OPENAI_DATASET_STD))


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 ``[n, 3, S, S]`` -> float in the backbone's input format (open_clip's mean / std)."""
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return (images.float() / 255 - m) / s


def _build(world: Path, config: WorldPreset, seed: int) -> None:
    flush_before = torch.set_flush_denormal(True)  # denormals make late training steps ~1.5x slower on CPU
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def stage(name: str, began: float) -> None:
        timings[name] = round(time.perf_counter() - began, 2)
        log.info("embedded world [%s]: %s done in %.1f s", config.name, name, timings[name])

    try:
        t = time.perf_counter()
        torch.manual_seed(seed)
        backbone = load_open_clip(config.arch, weights_follow=True)  # pre-trained below
        mean, std = _normalizer(backbone)
        size = backbone.image_size
        data = {spec.name: make_task_splits(spec, config.split_sizes, size, seed) for spec in TASK_SPECS}
        for name, parts in data.items():
            _save_tensors(world / "data" / f"{name}.pt", {f"{split}_{kind}": tensor for split, (images, labels) in parts.items()
                                                          for kind, tensor in (("images", images), ("labels", labels))})
        digits_train = digit_splits(seed, config.split_sizes["test"], config.split_sizes["val"])["train"]
        pool = CaptionPool(config.pool_size, size, digits_train[0], digits_train[1], seed + 1)
        stage("task data and pre-training pictures", t)

        t = time.perf_counter()
        vocabulary = caption_corpus() + [tpl.format(c) for spec in TASK_SPECS for tpl in spec.templates for c in spec.classnames]

        def batches(n: int):
            images, captions, meanings = pool.batch(n)
            return normalize(images, mean, std), captions, meanings

        pretraining = pretrain_clip(backbone.clip, backbone.tokenizer, vocabulary, batches, replace(config.pretrain, seed=seed))
        save_state_dict(world / "clip.safetensors", backbone.clip.state_dict(), {"arch": config.arch, "preset": config.name})
        theta0 = {k: v.clone() for k, v in backbone.visual.state_dict().items()}
        save_state_dict(world / "pretrained.safetensors", theta0, {"arch": config.arch, "model": "pretrained"})
        stage(f"contrastive pre-training ({config.pretrain.steps} steps)", t)

        t = time.perf_counter()
        splits = {name: {s: TensorImages(normalize(x, mean, std), y) for s, (x, y) in parts.items()} for name, parts in data.items()}
        heads = {spec.name: zero_shot_head(backbone, spec.classnames, spec.templates) for spec in TASK_SPECS}
        results: dict[str, dict] = {}
        finetuned: dict[str, dict[str, torch.Tensor]] = {}
        total_steps = sum(_task_steps(config, spec) for spec in TASK_SPECS)
        with progress(total=total_steps, desc="fine-tuning tasks", unit="step") as bar:
            for index, spec in enumerate(TASK_SPECS):
                finetuned[spec.name], results[spec.name] = _finetune_task(
                    world, config, spec, index, backbone, heads[spec.name], splits[spec.name], seed, bar)
        stage("fine-tuning " + ", ".join(f"{n} {r['finetune_seconds']:.1f}s" for n, r in results.items()), t)

        t = time.perf_counter()
        sanity = _task_arithmetic_sanity(backbone.visual, theta0, finetuned, heads, splits)
        stage("task-arithmetic sanity check", t)
    finally:
        torch.set_flush_denormal(flush_before)
    manifest = {
        "version": WORLD_VERSION, "preset": config.name, "seed": seed, "arch": config.arch, "image_size": size,
        "mean": mean, "std": std, "torch_threads": torch.get_num_threads(),
        "tasks": [{"name": s.name, "classnames": s.classnames, "templates": s.templates,
                   "sizes": {k: len(data[s.name][k][1]) for k in SPLITS}} for s in TASK_SPECS],
        "accuracy": results, "task_arithmetic": sanity, "pretraining": pretraining,
        "timings": {**timings, "total": round(time.perf_counter() - start, 2)},
    }
    write_text_atomic(world / MANIFEST, json.dumps(manifest, indent=2))
    log.info("embedded world [%s] built in %.1f s: %s", config.name, manifest["timings"]["total"], world)


@contextmanager
def _quiet_lightning():
    """Lightning's hardware tips and known warnings, once per task, are noise inside a world build."""
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    with warnings.catch_warnings():
        for pattern in (r".*does not have many workers.*", *QUIET_WARNINGS):
            warnings.filterwarnings("ignore", message=pattern)
        lightning_log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            lightning_log.setLevel(level)


class _SharedStepsBar(L.Callback):
    """Advances one bar by each optimiser step, so a single bar (and ETA) spans every task's fine-tuning."""

    def __init__(self, bar, task: str):
        self.bar, self.task, self.seen = bar, task, 0

    def on_train_start(self, trainer, pl_module):
        self.seen = trainer.global_step
        self.bar.set_postfix(task=self.task, refresh=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bar.update(trainer.global_step - self.seen)
        self.seen = trainer.global_step


def _task_steps(config: WorldPreset, spec: TaskSpec) -> int:
    return config.finetune_steps.get(spec.name, config.finetune.max_steps)


def _finetune_task(world: Path, config: WorldPreset, spec: TaskSpec, index: int, backbone: Backbone,
                   head: torch.Tensor, splits: dict[str, TensorImages], seed: int, bar=None) -> tuple[dict, dict]:
    """Fine-tune one task's vision tower by the one fine-tuning path (adamerge-finetune's); save θₖ and the
    best-two-by-val checkpoints; measure. ``bar``: the build's fine-tuning bar, advanced per step."""
    steps = _task_steps(config, spec)
    recipe = replace(config.finetune, max_steps=steps, warmup_steps=max(1, steps // 10))
    task = Task(spec.name, list(spec.classnames), list(spec.templates), dict(splits))

    def make_trainer(callbacks=(), **kwargs):
        extra = [_SharedStepsBar(bar, spec.name)] if bar is not None else []
        return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=recipe.grad_clip_norm,
                         callbacks=[*callbacks, *extra], **kwargs)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"finetune-{spec.name}-") as ckpt_dir, _quiet_lightning():
        outcome = finetune_task(backbone.visual, head, task, recipe, seed=seed * 1000 + index, ckpt_dir=ckpt_dir,
                                make_trainer=make_trainer)
        final = outcome.module.vision_state()
        meta = {"arch": config.arch, "task": spec.name, "steps": steps}
        save_state_dict(world / "finetuned" / f"{spec.name}.safetensors", final, {**meta, "model": "finetuned"})
        best = []
        for rank, (path, score) in enumerate(outcome.best, start=1):
            state, step = vision_state_from_lightning_checkpoint(path)
            save_state_dict(world / "checkpoints" / spec.name / f"best-{rank}.safetensors", state,
                            {**meta, "model": f"best-{rank}", "step": step, "val_accuracy": score})
            best.append({"step": step, "val_accuracy": round(score, 4)})
    seconds = time.perf_counter() - started
    tuned = copy.deepcopy(backbone.visual)
    tuned.load_state_dict(final)
    return final, {
        "zero_shot": round(dataset_accuracy(backbone.visual, head, splits["test"]), 4),
        "finetuned": round(dataset_accuracy(tuned, head, splits["test"]), 4),
        "zero_shot_val": round(dataset_accuracy(backbone.visual, head, splits["val"]), 4),
        "finetuned_val": round(dataset_accuracy(tuned, head, splits["val"]), 4),
        "finetune_steps": steps, "finetune_seconds": round(seconds, 2), "best_checkpoints": best,
    }


def _task_arithmetic_sanity(visual: torch.nn.Module, theta0: dict, finetuned: dict, heads: dict, splits: dict) -> dict:
    """Test accuracy of θ₀ + λ·Σₖ(θₖ − θ₀) per task: merging should land between zero-shot and fine-tuned."""
    merged = copy.deepcopy(visual)
    vectors = [task_vector(ft, theta0) for ft in finetuned.values()]
    out = {}
    for lam in SANITY_LAMBDAS:
        merged.load_state_dict(task_arithmetic(theta0, vectors, lam))
        out[str(lam)] = {name: round(dataset_accuracy(merged, heads[name], splits[name]["test"]), 4) for name in heads}
    return out


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Plain tensors only, so loading with ``weights_only=True`` never unpickles code."""
    save_atomic(path, lambda tmp: torch.save(tensors, tmp))


# --- loaders used by Hydra configs -------------------------------------------------------------

def _complete_world(cache_dir: str | Path, preset: str, seed: int) -> tuple[Path, dict]:
    world = build_world(cache_dir, preset=preset, seed=seed)
    manifest = read_manifest(world)
    if manifest is None:
        raise RuntimeError(f"embedded world {world} has no valid {MANIFEST} after building")
    return world, manifest


def embedded_backbone(cache_dir: str | Path, preset: str = "demo", seed: int = 0) -> Backbone:
    """The world's pre-trained CLIP (building the world if needed), in eval mode, frozen."""
    world, manifest = _complete_world(cache_dir, preset, seed)
    return load_open_clip(manifest["arch"], weights=str(world / "clip.safetensors"))


def embedded_tasks(cache_dir: str | Path, preset: str = "demo", seed: int = 0,
                   names: list[str] | None = None, backbone: Backbone | None = None,
                   unseen: list[str] | None = None) -> BenchmarkTasks:
    """The world's tasks in their fixed, paper-like order, or those in ``names``, in that order;
    ``unseen`` tasks are only evaluated, never merged (the generalisation experiment).

    Images are float tensors already normalised for the world's backbone (``backbone``, which real
    datasets need for their transform, is accepted and unused).
    """
    held_out = [task_spec(n) for n in (unseen or [])]  # ValueError lists valid names
    chosen = ([task_spec(n) for n in names] if names is not None else
              [s for s in TASK_SPECS if s.name not in {h.name for h in held_out}])
    overlap = sorted({s.name for s in chosen} & {h.name for h in held_out})
    if overlap:
        raise ValueError(f"tasks {overlap} are both merged and 'unseen'; a task is one or the other")
    world, manifest = _complete_world(cache_dir, preset, seed)
    tasks = []
    for spec in [*chosen, *held_out]:
        tensors = torch.load(world / "data" / f"{spec.name}.pt", weights_only=True)
        splits = {s: TensorImages(normalize(tensors[f"{s}_images"], manifest["mean"], manifest["std"]), tensors[f"{s}_labels"])
                  for s in SPLITS}
        tasks.append(Task(name=spec.name, classnames=list(spec.classnames), templates=list(spec.templates), splits=splits))
    return BenchmarkTasks(tasks[:len(chosen)], tasks[len(chosen):])


def embedded_pool(cache_dir: str | Path, preset: str = "demo", seed: int = 0) -> dict:
    """``{"pretrained": Path, "finetuned": {task_name: Path}}``: the vision towers to merge."""
    world, _ = _complete_world(cache_dir, preset, seed)
    return {"pretrained": world / "pretrained.safetensors",
            "finetuned": {name: world / "finetuned" / f"{name}.safetensors" for name in TASK_NAMES}}


def embedded_best_checkpoints(cache_dir: str | Path, preset: str = "demo", seed: int = 0) -> dict[str, list[Path]]:
    """Each task's two best fine-tuning checkpoints by val accuracy (best first)."""
    world, _ = _complete_world(cache_dir, preset, seed)
    return {name: sorted((world / "checkpoints" / name).glob("best-*.safetensors")) for name in TASK_NAMES}


def embedded_checkpoint_pool(cache_dir: str, preset: str = "demo", seed: int = 0) -> CheckpointPool:
    """``pool=embedded``: θ₀, θₖ and each task's best two checkpoints of the world (built and cached on first use)."""
    found = embedded_pool(cache_dir, preset=preset, seed=seed)
    best = embedded_best_checkpoints(cache_dir, preset=preset, seed=seed)
    return CheckpointPool(pretrained=found["pretrained"], finetuned=dict(found["finetuned"]),
                          candidates={k: list(v) for k, v in best.items()})
