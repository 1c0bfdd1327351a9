"""After a multirun, print and write the experiment's table: what a sweep is for."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ResultsTable(Callback):
    """On multirun end: records of experiment ``name`` → ``<results_dir>/tables/<name>.md|.csv``.

    The newest record per (row, seed) wins, so re-running one method replaces its row; rows appear
    in the order the sweep ran them.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        from adamerge.results.records import keep_latest, read_records
        from adamerge.results.tables import build_table, print_table, write_tables

        HydraConfig.instance().set_config(config)  # so ${hydra:...} in paths resolves after the jobs
        records_file = Path(config.paths.results_dir) / "raw" / f"{config.name}.jsonl"
        if not records_file.exists():
            log.warning("no run records in %s: no table written", records_file)
            return
        records = [r for r in read_records(records_file) if r["experiment"] == config.name]
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        this_sweep = [r for r in records if str(Path(r["extra"].get("run_dir", "/")).resolve()).startswith(sweep_dir)]
        order = list(dict.fromkeys(r["label"] for r in this_sweep))
        reference = config.get("reference")
        reference = OmegaConf.to_container(reference, resolve=True) if reference is not None else None
        table = build_table(keep_latest(records), row_order=order or None, reference=reference)
        print_table(table)
        for path in write_tables(table, Path(config.paths.results_dir) / "tables" / config.name):
            log.info("wrote %s", path)
        copy_figures(this_sweep, Path(config.paths.results_dir) / "figures" / config.name)


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
