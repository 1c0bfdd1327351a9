"""After a multirun, print and write the experiment's table: what a sweep is for.

Only this sweep's records are read: every job leaves its record as ``record.json`` in its run folder, and
the table is built from the run folders of this sweep. Other experiments' files are never opened, so a
damaged record elsewhere cannot stop (or silently shorten) this table. A sweep that stops early (Ctrl-C,
a failed job) still prints the table of the jobs that finished, and writes it as ``<name>.partial.*``.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RECORD_FILE = "record.json"
RECORDS_FILE = "records.json"  # a run with several rows (the LLM pipeline) lists them all here


def sweep_run_dirs(sweep_dir: Path) -> list[Path]:
    """Run folders of this sweep: ``<sweep_dir>/<job>``, and ``multirun/<other name>/<same stamp>/<job>`` of jobs
    that set their own ``name`` (the stamp, time plus unique suffix, is resolved once per sweep)."""
    found = sorted(p.parent for p in sweep_dir.glob(f"*/{RECORD_FILE}"))
    root = sweep_dir.parent.parent
    if root.is_dir():
        found += sorted(p.parent for p in root.glob(f"*/{sweep_dir.name}/*/{RECORD_FILE}")
                        if p.parent.parent != sweep_dir)
    return found


def run_records(run_dir: Path) -> list[dict]:
    """The records a run folder holds: every row of ``records.json``, or its one ``record.json``."""
    import json

    from adamerge.results.records import RecordFormatError, read_record_file, validate_record

    if (run_dir / RECORDS_FILE).is_file():
        try:
            records = json.loads((run_dir / RECORDS_FILE).read_text(encoding="utf-8"))
            for record in records:
                validate_record(record)
        except (ValueError, TypeError, RecordFormatError) as error:
            raise RecordFormatError(f"{run_dir / RECORDS_FILE}: malformed run records: {error}") from error
        return records
    return [read_record_file(run_dir / RECORD_FILE)]


def sweep_records(sweep_dir: Path) -> list[dict]:
    return sorted((r for d in sweep_run_dirs(sweep_dir) for r in run_records(d)), key=lambda r: r["time"])


class ResultsTable(Callback):
    """On multirun end: one table per experiment name among the sweep's records →
    ``<results_dir>/tables/<name>.md|.csv`` (a sweep may set ``name`` per job, e.g. one per corruption).

    The table shows this sweep. ``table_history=true`` adds the earlier records of the same experiment name
    (``results/raw/<name>.jsonl``), the newest per (row, seed) winning, so re-running one row updates a table.
    Paper rows come from the ``reference`` each job resolved.
    """

    def __init__(self) -> None:
        self._finished = True

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._finished = False
        atexit.register(self._stopped_early, config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._finished = True
        try:
            self.write(config, partial=False)
        except Exception as err:  # Hydra would turn it into a warning and exit 0: a sweep without its table failed
            log.error("the sweep's jobs finished and kept their records (run folders, results/raw), but its table "
                      "could not be built: %s", err)
            raise SystemExit(f"adamerge: no table for this sweep: {err}") from err

    def _stopped_early(self, config: DictConfig) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            self.write(config, partial=True)
        except Exception as err:  # at exit: report, never mask the error that stopped the sweep
            sys.stderr.write(f"adamerge: no table for the finished jobs of the stopped sweep: {err}\n")

    def write(self, config: DictConfig, partial: bool) -> None:
        from hydra.core.hydra_config import HydraConfig

        from adamerge.results.records import keep_latest, read_records, write_text_atomic
        from adamerge.results.searches import choose, searched_keys
        from adamerge.results.tables import build_table, print_table, write_tables

        HydraConfig.instance().set_config(config)  # so ${hydra:...} in paths resolves after the jobs
        results_dir = Path(config.paths.results_dir)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        this_sweep = sweep_records(sweep_dir)
        if not this_sweep:
            log.warning("no run records in the run folders of this sweep (%s): no table written", sweep_dir)
            return
        if partial:
            sys.stderr.write(f"\nadamerge: the sweep stopped early; the table of its {len(this_sweep)} finished "
                             f"job(s) follows (written as <name>.partial.md/.csv)\n")
        history = bool(config.get("table_history", False))
        specs = swept_parameters(config)
        for name in dict.fromkeys(r["experiment"] for r in this_sweep):
            runs = [r for r in this_sweep if r["experiment"] == name]
            runs, searches = choose(runs, searched_keys(specs, runs), specs)
            for index, search in enumerate(searches):
                search.warnings += sweeper_disagreement(sweep_dir, search)
                if config.get("search_reevaluate", False) and not partial:
                    again = reevaluate(search, sweep_dir / "reevaluated" / f"{name}-{index}")
                    chosen_ids = {r["run_id"] for r in search.chosen.records}
                    runs = [r for r in runs if r["run_id"] not in chosen_ids] + again
            if searches:  # every trial, beside the table that shows the chosen one
                report = "\n".join(search.to_markdown(name) for search in searches)
                sys.stdout.write("\n" + report)
                path = write_text_atomic(results_dir / "tables" / f"{name}{'.partial' if partial else ''}.search.md",
                                         report)
                for search in searches:
                    log.info("chose %s; every trial in %s", search.label(), path)
                    for warning in search.warnings:
                        log.warning("%s: %s", name, warning)
            records = list(runs)
            if history and (results_dir / "raw" / f"{name}.jsonl").exists():
                ids = {r["run_id"] for r in runs}
                earlier = [r for r in read_records(results_dir / "raw" / f"{name}.jsonl")
                           if r["experiment"] == name and r["run_id"] not in ids]
                records = earlier + runs
            order = list(dict.fromkeys(r["label"] for r in runs))
            reference = (runs[-1].get("config") or {}).get("reference")
            if reference is None and config.get("reference") is not None:
                reference = OmegaConf.to_container(config.reference, resolve=True)
            table = build_table(keep_latest(records), row_order=order, reference=reference)
            print_table(table)
            if not partial:
                summarise_on_wandb(config, name, sweep_dir, table)
            stem = results_dir / "tables" / (f"{name}.partial" if partial else name)
            for path in write_tables(table, stem):
                log.info("wrote %s", path)
            copy_figures(runs, results_dir / "figures" / name)


def reevaluate(search, folder: Path) -> list[dict]:
    """Run the trial chosen on val once more, in a process of its own with the trial's own overrides (one run per
    seed it averaged), and return those records labelled as the search's row. A re-run that does not reproduce
    the trial's test numbers is said (a non-deterministic kernel, a changed file); the table shows the re-run."""
    import os
    import subprocess

    from adamerge.results.records import read_record_file

    rows = []
    for k, trial in enumerate(search.chosen.records):
        overrides = ((trial.get("provenance") or {}).get("command") or {}).get("overrides")
        if not overrides:
            search.warnings.append(f"run {trial['run_id']} recorded no overrides: the chosen trial is shown as run, "
                                   "not re-evaluated")
            rows.append(trial)
            continue
        run_dir = folder / str(k)
        command = [sys.executable, "-m", "adamerge", *overrides, "hydra.mode=RUN", f"hydra.run.dir={run_dir}",
                   "print_config=false"]
        log.info("re-evaluating the trial chosen on val: %s", " ".join(overrides))
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        if done.returncode != 0:
            raise RuntimeError(f"re-running the chosen trial failed (exit {done.returncode}): {' '.join(command)}\n"
                               f"{done.stderr[-2000:]}")
        record = read_record_file(run_dir / RECORD_FILE)
        if record["accuracy"] != trial["accuracy"]:
            worst = max(abs(record["accuracy"][t] - trial["accuracy"][t]) for t in record["tasks"])
            search.warnings.append(f"the re-run of the chosen trial (seed {trial['seed']}) differs from the trial by "
                                   f"up to {100 * worst:.2f} points on test; the table shows the re-run")
        else:
            search.notes.append(f"re-evaluated: the chosen trial (seed {trial['seed']}) run again in {run_dir} gave "
                                "the same test accuracy on every task")
        rows.append({**record, "label": search.label(), "extra": {**record["extra"], "reevaluates": trial["run_id"]}})
    return rows


def summarise_on_wandb(config: DictConfig, name: str, sweep_dir: Path, table) -> None:
    """With a W&B logger configured, the sweep's table as a W&B Table in a ``summary`` run of the sweep's group
    (the group its jobs used). A failure here is reported; the table on disk is already written."""
    loggers = OmegaConf.select(config, "logger", default=None) or {}
    conf = next((c for c in loggers.values() if c is not None and str(c.get("_target_", "")).endswith("WandbLogger")),
                None)
    if conf is None:
        return
    from adamerge.runtime.reporting import log_sweep_summary_wandb, sweep_group

    try:
        folder = log_sweep_summary_wandb(table, conf.get("group") or sweep_group(name, sweep_dir),
                                         project=conf.get("project") or "adamerge", entity=conf.get("entity"),
                                         save_dir=sweep_dir, offline=bool(conf.get("offline", False)),
                                         tags=["summary", name])
        log.info("sweep table logged to W&B (%s)", folder)
    except Exception as err:  # noqa: BLE001 - the dashboard is extra; the table files are the result
        log.warning("could not log the sweep table to W&B: %s", err)


def sweeper_disagreement(sweep_dir: Path, search) -> list[str]:
    """The Optuna sweeper's own verdict (``optimization_results.yaml``) against the trial the table shows: both rank
    by the value each job returned (mean val accuracy), so they must name the same parameters."""
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return []
    best = OmegaConf.to_container(OmegaConf.load(path)).get("best_params") or {}
    differing = {k: (v, search.chosen.params.get(k)) for k, v in best.items()
                 if k in search.chosen.params and search.chosen.params[k] != v}
    return [f"the sweeper's best parameters {best} differ from the trial chosen on val here ({differing}); "
            "did the jobs return mean val accuracy (optimized_metric=val)?"] if differing else []


def swept_parameters(config: DictConfig) -> dict[str, str]:
    """``{key: spec}`` of what this sweep varies: the sweeper's ``params`` and the command line's sweep overrides
    (``method.lam=0.1,0.2``, ``range(…)``, ``choice(…)``, ``interval(…)``)."""
    swept: dict[str, str] = {}
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if params:
        swept.update({str(k): str(v) for k, v in OmegaConf.to_container(params, resolve=False).items()})
    for override in OmegaConf.select(config, "hydra.overrides.task", default=None) or []:
        key, _, value = str(override).partition("=")
        if "," in value or value.startswith(("range(", "choice(", "interval(", "tag(")):
            swept[key] = value
    return swept


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
