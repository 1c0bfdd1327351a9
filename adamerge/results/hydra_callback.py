"""After a multirun, print and write the experiment's table: what a sweep is for."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ResultsTable(Callback):
    """On multirun end: one table per experiment name among the sweep's records →
    ``<results_dir>/tables/<name>.md|.csv`` (a sweep may set ``name`` per job, e.g. one per corruption).

    The newest record per (row, seed) wins, so re-running one method replaces its row; rows appear
    in the order the sweep ran them. Paper rows come from the ``reference`` each job resolved.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        from adamerge.results.records import keep_latest, read_records
        from adamerge.results.tables import build_table, print_table, write_tables

        HydraConfig.instance().set_config(config)  # so ${hydra:...} in paths resolves after the jobs
        results_dir = Path(config.paths.results_dir)
        raw = sorted((results_dir / "raw").glob("*.jsonl"))
        sweep_dir = Path(config.hydra.sweep.dir).resolve()

        def in_sweep(record: dict) -> bool:
            run_dir = Path(record["extra"].get("run_dir", "/")).resolve()
            if run_dir.is_relative_to(sweep_dir):
                return True
            # multirun/<name>/<time>/<job>: a job that sets its own name shares the sweep's (cached) time
            return run_dir.parent.name == sweep_dir.name and run_dir.parent.parent.parent == sweep_dir.parent.parent

        this_sweep = [r for path in raw for r in read_records(path) if in_sweep(r)]
        if not this_sweep:
            log.warning("no run records of this sweep in %s: no table written", results_dir / "raw")
            return
        this_sweep.sort(key=lambda r: r["time"])
        for name in dict.fromkeys(r["experiment"] for r in this_sweep):
            runs = [r for r in this_sweep if r["experiment"] == name]
            records = [r for r in read_records(results_dir / "raw" / f"{name}.jsonl") if r["experiment"] == name]
            order = list(dict.fromkeys(r["label"] for r in runs))
            reference = (runs[-1].get("config") or {}).get("reference")
            if reference is None and config.get("reference") is not None:
                reference = OmegaConf.to_container(config.reference, resolve=True)
            table = build_table(keep_latest(records), row_order=order, reference=reference)
            print_table(table)
            for path in write_tables(table, results_dir / "tables" / name):
                log.info("wrote %s", path)
            copy_figures(runs, results_dir / "figures" / name)


def copy_figures(records: list[dict], folder: Path) -> list[Path]:
    """The sweep's per-run figures (λ heatmaps, curves) as ``<folder>/<method>-<figure>.png``: small, kept in git."""
    copied = []
    for record in records:
        for figure in ("coefficients", "curves"):
            source = record["extra"].get(f"{figure}_plot")
            if source and Path(source).exists():
                folder.mkdir(parents=True, exist_ok=True)
                target = folder / f"{record['method']}-seed{record['seed']}-{figure}.png"
                shutil.copyfile(source, target)
                copied.append(target)
    return copied
