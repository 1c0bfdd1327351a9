"""What a run reports: its config (a rich tree), a result row, the configured loggers and their final metrics.

One unit for people: every accuracy a logger shows (``test_acc/*``, ``unseen_acc/*``, ``batch_acc/*``, the
``test_accuracy`` table) is in percent, as the printed rows and the tables are; λ and entropy are as they are.
(Run records keep fractions: that is their schema.) Shared by the entry points; Lightning loggers write on
rank zero only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf


def sweep_group(name: str, folder: str | Path) -> str:
    """The W&B group of the runs started together: ``<name>-<stamp>``, the stamp being the sweep (or run)
    folder's name (time plus unique suffix), so a new sweep never lands in an old sweep's group."""
    return f"{name}-{Path(str(folder)).name}"


def wandb_group(cfg: DictConfig) -> str:
    """This job's group: its sweep's under ``-m`` (every job of a sweep shares it), else its own run folder's."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_group(cfg.name, HydraConfig.get().sweep.dir)
    return sweep_group(cfg.name, cfg.paths.output_dir)


def make_loggers(cfg: DictConfig, device: str | None = None) -> list:
    """The configured Lightning loggers, each given the resolved config and the run's provenance as
    hyperparameters (a W&B logger without a ``group``: :func:`wandb_group`)."""
    loggers = []
    for conf in (cfg.get("logger") or {}).values():
        if conf is None or "_target_" not in conf:
            continue
        wandb = str(conf._target_).endswith("WandbLogger") and conf.get("group") is None
        loggers.append(instantiate(conf, group=wandb_group(cfg)) if wandb else instantiate(conf))
    hparams = OmegaConf.to_container(cfg, resolve=True)
    if loggers:  # the run's commit, packages, hardware and command line, beside its config in every dashboard
        from adamerge.runtime.provenance import provenance

        hparams["provenance"] = provenance(device)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return loggers


def log_results(loggers: list, accuracy: dict[str, float], step: int, images: dict[str, str], trained: bool,
                unseen: dict[str, float] | None = None, label: str | None = None) -> None:
    """Final per-task accuracy (percent) to every logger; to W&B also as a table (a ``method`` column: the row
    label, ``label``) and the run's figures; to TensorBoard also the figures and the HParams tab (config and
    final accuracy).

    ``accuracy`` and ``unseen`` are fractions, as measured. ``trained``: a Trainer ran and has already
    finalised (closed) the loggers.
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    metrics = {f"test_acc/{name}": 100 * value for name, value in accuracy.items()}
    metrics["test_acc/avg"] = 100 * sum(accuracy.values()) / len(accuracy)
    for name, value in (unseen or {}).items():
        metrics[f"unseen_acc/{name}"] = 100 * value
    if unseen:
        metrics["unseen_acc/avg"] = 100 * sum(unseen.values()) / len(unseen)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            tensorboard_results(logger, metrics, images, step, trained=trained)
            continue
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):
            logger.log_table(key="test_accuracy", columns=["method", *accuracy, "avg"],
                             data=[[label or "", *(metrics[f"test_acc/{name}"] for name in accuracy),
                                    metrics["test_acc/avg"]]])
            for key, path in images.items():
                logger.log_image(key=key, images=[path])
        logger.save()


def flat_hparams(config: Mapping, prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"optimizer.lr": 0.001, "tasks.names": "['a', 'b']", …}``: the HParams tab takes scalars and strings
    only; keys are spelled as on the command line."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def tensorboard_results(logger, metrics: dict[str, float], images: dict[str, str], step: int, trained: bool) -> None:
    """Final metrics, the figures and the HParams entry (the config with the final metrics). After training
    they go to an event file of their own: re-opening the writer Lightning closed would reuse the training
    file's name (it is made of the second and the host) and overwrite the training curves."""
    writer = type(logger.experiment)(log_dir=logger.log_dir, filename_suffix=".results") if trained else logger.experiment
    if type(writer).__module__.startswith("tensorboardX"):
        from tensorboardX.summary import hparams
    else:
        from torch.utils.tensorboard.summary import hparams
    for summary in hparams(flat_hparams(logger.hparams), metrics):  # the run's config, from make_loggers
        writer._get_file_writer().add_summary(summary)
    for key, value in metrics.items():
        writer.add_scalar(key, value, step)
    for key, path in images.items():
        writer.add_image(f"figures/{key}", png_pixels(path), step, dataformats="HWC")
    if trained:
        writer.close()
    else:  # no trainer ran: the logger's writer is still open
        logger.finalize("success")


def png_pixels(path: str | Path):
    """An image file as an RGB uint8 array (H, W, 3), as ``add_image`` takes it."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def log_sweep_summary_wandb(table, group: str, project: str, entity: str | None = None,
                            save_dir: str | Path | None = None, offline: bool = False, key: str = "sweep_table",
                            **init) -> Path:
    """A finished sweep table (an :class:`adamerge.results.tables.Table`, cells in percent as printed) as a W&B
    Table, in a run of job_type ``summary`` in the sweep's ``group`` (:func:`sweep_group`): the sweep's result
    sits next to its jobs' runs. ``init``: more ``wandb.init`` arguments (tags, name). Returns the run's folder."""
    import wandb

    finish_wandb()  # a job's run must not receive the summary
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    init.setdefault("name", f"{group}-summary")
    run = wandb.init(project=project, entity=entity, group=group, job_type="summary",
                     dir=None if save_dir is None else str(save_dir), mode="offline" if offline else None, **init)
    try:
        run.log({key: wandb.Table(columns=list(table.header), data=[list(row) for row in table.cell_texts()])})
        return Path(run.dir).parent
    finally:
        run.finish()


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


def finish_wandb() -> None:
    """Close the W&B run if one is open: sequential multirun jobs must never share a W&B run."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


