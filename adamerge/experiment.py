"""One run: compose backbone, tasks, pool and method from the config, merge, evaluate, record.

Kept free of ``@hydra.main`` so tests and notebooks can call :func:`run` on a composed config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from adamerge.adaptation.module import METRICS_FILE
from adamerge.evaluation.accuracy import accuracies
from adamerge.merging import check_finite
from adamerge.methods.base import MergeContext
from adamerge.models.export import save_merged
from adamerge.models.head_cache import cached_heads
from adamerge.plots.curves import adaptation_curves
from adamerge.results import append_record, check_writable, make_record, write_record_file
from adamerge.results.hydra_callback import RECORD_FILE
from adamerge.runtime.distributed import raise_with_rank_failures
from adamerge.runtime.process import start_process
from adamerge.runtime.provenance import provenance
from adamerge.runtime.reporting import finish_wandb, log_results, make_loggers, print_config, print_row
from adamerge.validation import validate_run_config

log = logging.getLogger(__name__)


def rescale_heads(heads: dict[str, torch.Tensor], backbone, scale: float | None) -> dict[str, torch.Tensor]:
    """Heads carry the model's logit scale; ``scale`` replaces it (argmax unchanged, softmax temperature not).

    Entropy-based methods (AdaMerging) and Fisher read the temperature: a small CLIP whose learned scale
    stayed far below real CLIP's 100 gives soft predictions, for which low entropy says little.
    """
    if scale is None:
        return heads
    current = float(backbone.logit_scale.exp())
    return {name: head * (float(scale) / current) for name, head in heads.items()}


def make_trainer_factory(cfg: DictConfig, loggers: list):
    def make_trainer() -> L.Trainer:
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    return make_trainer


def run(cfg: DictConfig) -> float:
    """Run the configured method; return the mean test accuracy (the metric sweepers optimise)."""
    try:
        return _run(cfg)
    finally:
        finish_wandb()


def _run(cfg: DictConfig) -> float:
    started = time.time()
    validate_run_config(cfg)  # every top-level option, before anything loads
    process = start_process(cfg)
    device = process.device
    records_dir = check_writable(Path(cfg.paths.results_dir) / "raw")  # fail before any expensive work
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config", True):
        print_config(cfg)

    method = instantiate(cfg.method)  # invalid method options fail here, before loading anything
    loggers = make_loggers(cfg, device)  # early too: a logger that cannot start (W&B without a key) fails before loading
    backbone = instantiate(cfg.model)
    tasks = instantiate(cfg.tasks, backbone=backbone)  # real datasets need its transform
    pool = instantiate(cfg.pool)
    names = [t.name for t in tasks]
    if getattr(method, "needs_checkpoints", True):
        theta0, finetuned = pool.load(names, backbone.visual)
    else:  # the method brings its own weights (method=evaluate_saved): no fine-tuned checkpoint is read
        theta0, finetuned = {k: v.detach().clone() for k, v in backbone.visual.state_dict().items()}, {}
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
    result.extra.update(save_merged(cfg, ctx, method, result))  # save_merged=true: <run_dir>/merged/ (rank 0)
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
        metrics_csv = run_dir / METRICS_FILE  # the adaptation's own log: whatever loggers, whole after a resume
        if result.steps is not None and metrics_csv.exists():
            curves = adaptation_curves(metrics_csv, run_dir / "curves.png", title=method.label)
            if curves is not None:
                result.figures["curves"] = str(curves)
        log_results(loggers, accuracy, step=result.steps or 0, images=dict(result.figures),
                    trained=result.steps is not None, unseen=result.extra.get("unseen_accuracy"), label=method.label)
        extra = dict(result.extra)
        if result.steps is not None:
            extra["steps"] = result.steps
        extra.update({f"{name}_plot": path for name, path in result.figures.items()})
        extra["seconds"] = {"load": round(loaded - started, 2), "method": round(merged - loaded, 2),
                            "evaluate": round(time.time() - merged, 2)}
        extra["run_dir"] = str(run_dir)
        extra["host_memory_kept"] = process.host_memory_kept
        extra["checkpoint_dtypes"] = dict(getattr(pool, "stored_dtypes", {}))
        record = make_record(experiment=cfg.name, method=cfg.method_name, label=method.label,
                             model=str(cfg.model_name), seed=cfg.seed, accuracy=accuracy, tasks=names, extra=extra,
                             config=OmegaConf.to_container(cfg, resolve=True), provenance=provenance(device))
        write_record_file(run_dir / RECORD_FILE, record)  # what this sweep's table reads
        append_record(records_dir / f"{cfg.name}.jsonl", record)
        print_row(method.label, accuracy)
        if "unseen_accuracy" in extra:
            print_row(f"{method.label}: unseen tasks", extra["unseen_accuracy"])
        log.info("%s: avg %.1f  (%s)", method.label, 100 * avg, extra["seconds"])
    return sum(val_accuracy.values()) / len(val_accuracy) if val_accuracy is not None else avg
