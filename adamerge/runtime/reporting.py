"""What a run reports: its config (a rich tree), a result row, the configured loggers and their final metrics.

Shared by the entry points; Lightning loggers write on rank zero only.
"""

from __future__ import annotations

from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf


def make_loggers(cfg: DictConfig) -> list:
    """The configured Lightning loggers, each given the resolved config as hyperparameters."""
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return loggers


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


def finish_wandb() -> None:
    """Close the W&B run if one is open: sequential multirun jobs must never share a W&B run."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


