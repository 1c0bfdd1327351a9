"""One run: compose backbone, tasks, pool and method from the config, merge, evaluate, record.

Kept free of ``@hydra.main`` so tests and notebooks can call :func:`run` on a composed config.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from adamerge.adaptation.distributed import raise_with_rank_failures
from adamerge.adaptation.host_memory import keep_freed_host_memory_on
from adamerge.evaluation.accuracy import accuracies
from adamerge.merging import check_finite
from adamerge.methods.base import MergeContext
from adamerge.models.head_cache import cached_heads
from adamerge.plots.curves import adaptation_curves
from adamerge.results import append_record, check_writable, make_record, write_record_file
from adamerge.results.hydra_callback import RECORD_FILE
from adamerge.validation import validate_run_config

log = logging.getLogger(__name__)

# Lightning warnings that describe what adamerge does on purpose: a frozen encoder kept in eval mode,
# checkpoints taken after the coefficient step, and a torch/Lightning pytree deprecation.
QUIET_WARNINGS = (r"Found \d+ module\(s\) in eval mode", r"Using ModelCheckpoint with manual optimization",
                  r".*LeafSpec.* is deprecated")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def rescale_heads(heads: dict[str, torch.Tensor], backbone, scale: float | None) -> dict[str, torch.Tensor]:
    """Heads carry the model's logit scale; ``scale`` replaces it (argmax unchanged, softmax temperature not).

    Entropy-based methods (AdaMerging) and Fisher read the temperature: a small CLIP whose learned scale
    stayed far below real CLIP's 100 gives soft predictions, for which low entropy says little.
    """
    if scale is None:
        return heads
    current = float(backbone.logit_scale.exp())
    return {name: head * (float(scale) / current) for name, head in heads.items()}


def make_loggers(cfg: DictConfig) -> list:
    """The configured Lightning loggers, each given the resolved config as hyperparameters."""
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return loggers


def make_trainer_factory(cfg: DictConfig, loggers: list):
    def make_trainer() -> L.Trainer:
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    return make_trainer


def log_results(loggers: list, accuracy: dict[str, float], step: int, images: dict[str, str], trained: bool,
                unseen: dict[str, float] | None = None) -> None:
    """Final per-task accuracy to every logger; to W&B also as a table and the run's figures as images.

    ``trained``: a Trainer ran and has already finalised (closed) the loggers.
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    metrics = {f"test_acc/{name}": value for name, value in accuracy.items()}
    metrics["test_acc/avg"] = sum(accuracy.values()) / len(accuracy)
    for name, value in (unseen or {}).items():
        metrics[f"unseen_acc/{name}"] = value
    if unseen:
        metrics["unseen_acc/avg"] = sum(unseen.values()) / len(unseen)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            tensorboard_results(logger, metrics, step, finalize=not trained)
            continue
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):
            logger.log_table(key="test_accuracy", columns=[*accuracy, "avg"],
                             data=[[100 * v for v in accuracy.values()] + [100 * metrics["test_acc/avg"]]])
            for key, path in images.items():
                logger.log_image(key=key, images=[path])
        logger.save()


def tensorboard_results(logger, metrics: dict[str, float], step: int, finalize: bool) -> None:
    """Results in an event file of their own: re-opening the writer Lightning closed would reuse the
    training file's name (it is made of the second and the host) and overwrite the training curves."""
    if finalize:  # no trainer ran: the logger's writer is still open
        logger.log_metrics(metrics, step=step)
        logger.finalize("success")
        return
    writer = type(logger.experiment)(log_dir=logger.log_dir, filename_suffix=".results")
    for key, value in metrics.items():
        writer.add_scalar(key, value, step)
    writer.close()


RUN_KEYS = ("name", "seed", "model", "tasks", "pool", "method", "optimizer", "trainer", "logger", "paths")


@rank_zero_only
def print_config(cfg: DictConfig, keys=RUN_KEYS, title: str = "config") -> None:
    from rich import print as rprint
    from rich.tree import Tree

    tree = Tree(title, guide_style="dim")
    for key in keys:
        if key in cfg:
            value = cfg[key]
            text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
            tree.add(f"[bold]{key}[/bold]").add(text.rstrip())
    rprint(tree)


@rank_zero_only
def print_row(label: str, accuracy: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=label)
    for name in [*accuracy, "Avg"]:
        table.add_column(name, justify="right")
    values = [*accuracy.values(), sum(accuracy.values()) / len(accuracy)]
    table.add_row(*(f"{100 * v:.1f}" for v in values))
    Console().print(table)


def run(cfg: DictConfig) -> float:
    """Run the configured method; return the mean test accuracy (the metric sweepers optimise)."""
    try:
        return _run(cfg)
    finally:
        finish_wandb()


def finish_wandb() -> None:
    """Close the W&B run if one is open: sequential multirun jobs must never share a W&B run."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def _run(cfg: DictConfig) -> float:
    started = time.time()
    validate_run_config(cfg)  # every top-level option, before anything loads
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning sets its logger to INFO when imported (after Hydra configured logging): hardware tips.
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO if cfg.get("verbose") else logging.WARNING)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.get("device", "auto"))
    # CPU: activations and evaluation batches above glibc's mmap threshold would be faulted in afresh each time
    host_memory_kept = keep_freed_host_memory_on(device, cfg.get("reuse_host_memory", True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    records_dir = check_writable(Path(cfg.paths.results_dir) / "raw")  # fail before any expensive work
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config", True):
        print_config(cfg)

    method = instantiate(cfg.method)  # invalid method options fail here, before loading anything
    loggers = make_loggers(cfg)  # early too: a logger that cannot start (W&B without a key) fails before loading
    backbone = instantiate(cfg.model)
    tasks = instantiate(cfg.tasks, backbone=backbone)  # real datasets need its transform
    pool = instantiate(cfg.pool)
    names = [t.name for t in tasks]
    theta0, finetuned = pool.load(names, backbone.visual)
    heads = rescale_heads(cached_heads(backbone, tasks, cfg.paths.get("cache_dir")), backbone, cfg.get("head_logit_scale"))
    check_finite(heads, "the zero-shot heads", hint="The backbone's text tower gives NaN/Inf text features; check "
                 "its weights (and delete stale heads under <cache_dir>/heads).")
    loaded = time.time()
    ctx = MergeContext(backbone=backbone, tasks=tasks, pretrained=theta0, finetuned=finetuned, heads=heads,
                       run_dir=run_dir, seed=cfg.seed, device=device,
                       eval_batch_size=cfg.get("eval_batch_size", 256),
                       make_trainer=make_trainer_factory(cfg, loggers), ckpt_path=cfg.get("ckpt_path"), pool=pool,
                       image_encoder_extra=backbone.image_encoder_extra(), filled=dict(getattr(pool, "filled", {})))
    try:
        result = method.run(ctx)
    except Exception as err:  # in a multi-process job, surface the rank that failed first
        raise_with_rank_failures(run_dir, err, since=started)
        raise
    merged = time.time()
    for name, params in ({"merged": result.params} if result.per_task is None else result.per_task).items():
        check_finite(params, f"the {method.label} merge ({name})", hint="Its inputs were finite, so the method "
                     "diverged (e.g. a λ far outside [0, 1]); nothing is recorded.")
    if result.per_task is not None:
        accuracy = ctx.evaluate(result.per_task, per_task=True)
    else:
        accuracy = ctx.evaluate(result.params)
    avg = sum(accuracy.values()) / len(accuracy)
    unseen = list(getattr(tasks, "unseen", None) or [])
    if unseen:  # generalisation: tasks never merged, evaluated with their own zero-shot heads
        if result.params is None:
            log.warning("%s keeps one model per task: it has no merged model to evaluate on unseen tasks", method.label)
        else:
            unseen_heads = rescale_heads(cached_heads(backbone, unseen, cfg.paths.get("cache_dir")), backbone,
                                         cfg.get("head_logit_scale"))
            result.extra["unseen_accuracy"] = accuracies(backbone.visual, {t.name: result.params for t in unseen},
                                                         unseen_heads, unseen, "test", ctx.eval_batch_size, ctx.device)
    objective = cfg.get("optimized_metric", "test")
    val_accuracy = None
    if objective == "val":
        val_accuracy = (ctx.evaluate(result.per_task, split="val", per_task=True) if result.per_task is not None
                        else ctx.evaluate(result.params, split="val"))
        result.extra["val_accuracy"] = val_accuracy

    if rank_zero_only.rank == 0:
        metrics_csv = run_dir / "csv" / "metrics.csv"
        if "steps" in result.extra and metrics_csv.exists():
            curves = adaptation_curves(metrics_csv, run_dir / "curves.png", title=method.label)
            if curves is not None:
                result.extra["curves_plot"] = str(curves)
        images = {k: result.extra[f"{k}_plot"] for k in ("coefficients", "curves") if f"{k}_plot" in result.extra}
        log_results(loggers, accuracy, step=int(result.extra.get("steps", 0)), images=images,
                    trained="steps" in result.extra, unseen=result.extra.get("unseen_accuracy"))
        extra = dict(result.extra)
        extra["seconds"] = {"load": round(loaded - started, 2), "method": round(merged - loaded, 2),
                            "evaluate": round(time.time() - merged, 2)}
        extra["run_dir"] = str(run_dir)
        extra["host_memory_kept"] = host_memory_kept
        extra["checkpoint_dtypes"] = dict(getattr(pool, "stored_dtypes", {}))
        record = make_record(experiment=cfg.name, method=cfg.method_name, label=method.label,
                             model=str(cfg.model_name), seed=cfg.seed, accuracy=accuracy, tasks=names, extra=extra,
                             config=OmegaConf.to_container(cfg, resolve=True))
        write_record_file(run_dir / RECORD_FILE, record)  # what this sweep's table reads
        append_record(records_dir / f"{cfg.name}.jsonl", record)
        print_row(method.label, accuracy)
        if "unseen_accuracy" in extra:
            print_row(f"{method.label}: unseen tasks", extra["unseen_accuracy"])
        log.info("%s: avg %.1f  (%s)", method.label, 100 * avg, extra["seconds"])
    return sum(val_accuracy.values()) / len(val_accuracy) if val_accuracy is not None else avg
