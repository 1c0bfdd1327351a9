"""The ``adamerge-finetune`` command: fine-tune ONE task's vision tower (Hydra over ``conf/finetune.yaml``).

Writes what the merge pools read: ``<paths.checkpoint_dir>/<model>/<task>.safetensors`` (the final θₖ)
and ``<task>/best-1|2.safetensors`` (best by validation accuracy, best first); the run folder keeps
Lightning's resumable checkpoints. Kept free of ``@hydra.main`` below :func:`main` so tests call :func:`run`.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import adamerge  # noqa: F401  (torchvision repair before Hydra instantiates anything)
import hydra
from omegaconf import DictConfig, OmegaConf

from adamerge.runtime.config import CONF_DIR

log = logging.getLogger(__name__)
FINETUNE_KEYS = ("task", "seed", "finetuned_dir", "model", "tasks", "finetune", "trainer", "logger", "paths")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def main(cfg: DictConfig) -> float:
    return run(cfg)


def run(cfg: DictConfig) -> float:
    """Fine-tune ``cfg.task``; return the final model's validation accuracy (what a sweeper optimises)."""
    from adamerge.runtime.reporting import finish_wandb

    try:
        return _run(cfg)
    finally:
        finish_wandb()


def _run(cfg: DictConfig) -> float:
    from hydra.utils import instantiate

    from adamerge.finetuning.lightning import export_finetuned, finetune_task
    from adamerge.runtime.process import start_process
    from adamerge.runtime.progress_bar import StepProgressBar
    from adamerge.runtime.reporting import make_loggers, print_config
    from adamerge.models.head_cache import cached_heads
    from adamerge.results.records import ResultsDirError, check_writable

    started = time.time()
    if OmegaConf.is_missing(cfg, "task"):
        raise ValueError("say which task to fine-tune: adamerge-finetune task=<name> "
                         "(several, one job each: adamerge-finetune -m task=a,b,c)")
    process = start_process(cfg)  # on CPU, batches of 128 are far above glibc's mmap threshold: memory kept

    name = str(cfg.task)
    recipe = instantiate(cfg.finetune, _convert_="all")  # bad options fail here, before any loading
    max_steps = int(cfg.trainer.get("max_steps", -1))
    try:
        epochs = recipe.epochs_for(name)
    except KeyError:
        if max_steps <= 0:
            raise
        epochs = -1  # no epoch budget: max_steps alone ends the run
    try:
        out_dir = check_writable(Path(cfg.finetuned_dir))  # fail before any expensive work
    except ResultsDirError as err:
        raise ResultsDirError(f"cannot write fine-tuned checkpoints to {cfg.finetuned_dir!r} ({err.__cause__}); "
                              f"choose a writable folder: paths.checkpoint_dir=DIR (or $ADAMERGE_CHECKPOINTS)") from err
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Resuming continues in the interrupted run's checkpoint folder, so ModelCheckpoint keeps its top-k.
    ckpt_path, ckpt_dir = cfg.get("ckpt_path"), run_dir / "checkpoints"
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):  # Lightning's own names stay as they are
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; resume from an interrupted run's "
                                    f"checkpoints/last.ckpt (outputs/finetune/<model>/<task>/<time>/checkpoints/)")
        ckpt_dir = Path(ckpt_path).resolve().parent
    if cfg.get("print_config", True):
        print_config(cfg, keys=FINETUNE_KEYS, title="finetune config")

    backbone = instantiate(cfg.model)
    (task,) = instantiate(cfg.tasks, backbone=backbone, names=[name])  # real datasets need its transform
    head = cached_heads(backbone, [task], cfg.paths.get("cache_dir"))[task.name]
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    loggers = make_loggers(cfg)

    def make_trainer(callbacks=(), **kwargs):  # a bar over the run's steps (Lightning's counts an epoch's batches)
        bar = [StepProgressBar(f"fine-tuning {name}")] if cfg.trainer.get("enable_progress_bar", True) else []
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=[*callbacks, *bar], **kwargs)

    outcome = finetune_task(backbone.visual, head, task, recipe, seed=int(cfg.seed), ckpt_dir=ckpt_dir,
                            make_trainer=make_trainer, epochs=epochs, ckpt_path=ckpt_path, device=process.device)
    trainer, module, best, val_accuracy = outcome.trainer, outcome.module, outcome.best, outcome.val_accuracy
    if not trainer.is_global_zero:
        return float("nan")
    metadata = {"task": name, "backbone": str(cfg.model_name), "steps": int(trainer.global_step),
                "epochs": int(trainer.current_epoch), "val_accuracy": val_accuracy, "seed": int(cfg.seed),
                "recipe": OmegaConf.to_container(cfg.finetune, resolve=True), "run_dir": str(run_dir)}
    written = export_finetuned(out_dir, name, module.vision_state(), metadata, best)
    log.info("%s: %d steps, val accuracy %.1f%% (best %s) in %.0f s → %s", name, trainer.global_step,
             100 * val_accuracy, ", ".join(f"{100 * s:.1f}%" for _, s in best), time.time() - started,
             written["final"])
    return val_accuracy


if __name__ == "__main__":
    main()
