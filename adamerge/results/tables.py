"""Paper-style tables from run records: one row per ``label``, one column per task, then ``Avg``.

Cells are accuracy in percent with one decimal, averaged over seeds; with two or more seeds the
cell also shows the *sample* standard deviation (ddof=1) over seeds, e.g. ``85.0 ± 7.1``.
``Avg`` is the mean over seeds of each run's mean over the table's tasks (and its std over seeds),
so it always matches the columns shown.

Command line (``adamerge-tables``)::

    adamerge-tables results/raw/demo.jsonl [more files or dirs] --out results/demo
        [--experiment NAME] [--all-records] [--tasks A,B,C] [--row LABEL ...] [--reference paper.json]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from adamerge.results.identity import distinguishing_keys, fingerprint, result_config, short_value
from adamerge.results.records import (
    RecordFormatError,
    ResultsDirError,
    keep_latest,
    read_records,
    write_text_atomic,
)

REFERENCE_SUFFIX = " (paper)"


class TableError(ValueError):
    """Records that cannot form one honest table (e.g. one row mixing different task sets)."""


@dataclass(frozen=True)
class Cell:
    """One table cell in percent; ``std`` is None with fewer than two seeds, ``mean`` None when unknown."""

    mean: float | None
    std: float | None = None

    def text(self) -> str:
        if self.mean is None:
            return "–"
        return f"{self.mean:.1f}" if self.std is None else f"{self.mean:.1f} ± {self.std:.1f}"


@dataclass(frozen=True)
class Row:
    label: str
    cells: dict[str, Cell]
    avg: Cell
    n_seeds: int | None  # None for reference ("paper") rows
    is_reference: bool = False
    unseen: dict[str, Cell] | None = None     # generalisation: tasks only evaluated, never merged
    unseen_avg: Cell | None = None


@dataclass(frozen=True)
class Table:
    tasks: list[str]
    rows: list[Row]
    unseen: tuple[str, ...] = ()   # generalisation columns, after Avg: each unseen task, then their Avg

    @property
    def header(self) -> list[str]:
        unseen = [f"{t} (unseen)" for t in self.unseen] + (["Avg (unseen)"] if self.unseen else [])
        return ["Method", *self.tasks, "Avg", *unseen]

    def _unseen_cells(self, row: Row) -> list[Cell]:
        if not self.unseen:
            return []
        cells = row.unseen or {}
        return [cells.get(t, Cell(None)) for t in self.unseen] + [row.unseen_avg or Cell(None)]

    def cell_texts(self) -> list[list[str]]:
        return [[row.label, *(row.cells[t].text() for t in self.tasks), row.avg.text(),
                 *(c.text() for c in self._unseen_cells(row))] for row in self.rows]

    def to_markdown(self) -> str:
        """GitHub Markdown with padded columns, so the plain text reads as a table too."""
        lines = [self.header, *([_escape_pipes(c) for c in row] for row in self.cell_texts())]
        widths = [max(len(line[i]) for line in lines) for i in range(len(self.header))]
        widths = [max(w, 4) for w in widths]  # room for ':---' / '---:'

        def render(cells: Sequence[str]) -> str:
            padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return "| " + " | ".join(padded) + " |"

        separator = "| " + " | ".join([":" + "-" * (widths[0] - 1)] + ["-" * (w - 1) + ":" for w in widths[1:]]) + " |"
        return "\n".join([render(lines[0]), separator, *map(render, lines[1:])]) + "\n"

    def to_csv(self) -> str:
        """Numbers in percent at full precision; empty where unknown (std with one seed, paper n_seeds)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        unseen = [*(f"unseen:{t}" for t in self.unseen), *(["unseen:avg"] if self.unseen else [])]
        writer.writerow(["method", *(c for t in self.tasks for c in (t, f"{t}_std")), "avg", "avg_std",
                         *(c for u in unseen for c in (u, f"{u}_std")), "n_seeds"])
        for row in self.rows:
            numbers = [v for t in self.tasks for v in (row.cells[t].mean, row.cells[t].std)]
            numbers += [row.avg.mean, row.avg.std]
            numbers += [v for c in self._unseen_cells(row) for v in (c.mean, c.std)]
            writer.writerow([row.label, *map(_csv_number, numbers), "" if row.n_seeds is None else row.n_seeds])
        return buffer.getvalue()


def _escape_pipes(text: str) -> str:
    return text.replace("|", "\\|")


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(round(value, 6))


def build_table(
    records: Iterable[Mapping[str, Any]],
    task_order: Sequence[str] | None = None,
    row_order: Sequence[str] | None = None,
    reference: Mapping[str, Mapping[str, float]] | None = None,
) -> Table:
    """Group ``records`` into rows (:func:`group_rows`: one label, one config up to the seed), averaging over seeds.

    Columns are ``task_order`` (which may pick a subset) or the first record's ``tasks``. Rows
    follow ``row_order`` (labels absent from the records are skipped; labels it does not name
    come after, in first-appearance order, so no result is hidden). ``reference`` maps a label to
    published numbers in percent (optionally with an ``"Avg"`` entry) and adds ``"<label> (paper)"``
    right after that label's row; or to ``{source: numbers}`` when several publications report the row,
    which adds one ``"<label> (<source>)"`` row per source, in the given order. Every record is counted:
    deduplicate first with
    :func:`~adamerge.results.records.keep_latest` if re-runs should replace older runs.
    """
    records = list(records)
    if not records:
        raise TableError("no run records to tabulate")
    tasks = list(task_order) if task_order is not None else list(records[0]["tasks"])
    groups = group_rows(records)

    by_label: dict[str, list[str]] = {}
    for row_label, group in groups.items():
        by_label.setdefault(group[0]["label"], []).append(row_label)
    labels = [row for label in (row_order or []) if label in by_label for row in by_label[label]]
    labels += [label for label in groups if label not in labels]
    unseen: list[str] = []
    for record in records:
        unseen += [t for t in (record.get("extra") or {}).get("unseen_accuracy", {}) if t not in unseen]
    rows: list[Row] = []
    for label in labels:
        rows.append(_measured_row(label, groups[label], tasks, subset_allowed=task_order is not None, unseen=unseen))
        plain = groups[label][0]["label"]
        if reference and plain in reference and by_label[plain][-1] == label:
            for source, numbers in _sources(plain, reference[plain]):
                rows.append(_reference_row(plain, numbers, tasks, unseen, source))
    return Table(tasks=tasks, rows=rows, unseen=tuple(unseen))


def group_rows(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows: records of one ``label`` *and* one resolved config up to the seed (:mod:`~adamerge.results.identity`).

    A label whose runs used different configurations becomes one row per configuration, each label followed by
    the keys that tell them apart (``Task-wise AdaMerging [optimizer.lr=0.001, trainer.max_steps=10]``): never one
    row averaging different experiments as if they were seeds.
    """
    by_label: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for record in records:
        by_label.setdefault(record["label"], {}).setdefault(fingerprint(record.get("config")), []).append(record)
    rows: dict[str, list[Mapping[str, Any]]] = {}
    for label, configs in by_label.items():
        if len(configs) == 1:
            rows[label] = next(iter(configs.values()))
            continue
        keys = distinguishing_keys([group[0].get("config") for group in configs.values()])
        for print_, group in configs.items():
            flat = result_config(group[0].get("config"))
            shown = ", ".join(f"{k}={short_value(flat.get(k, '∅'))}" for k in keys[:4])
            name = f"{label} [{shown}{', …' if len(keys) > 4 else ''}]"
            rows[name if name not in rows else f"{label} [config {print_}]"] = group
    return rows


def _measured_row(label: str, group: list[Mapping[str, Any]], tasks: list[str], subset_allowed: bool,
                  unseen: Sequence[str] = ()) -> Row:
    _check_consistent(label, group, tasks, subset_allowed)
    per_task = {t: _cell([r["accuracy"][t] for r in group]) for t in tasks}
    per_run_avg = [statistics.fmean(r["accuracy"][t] for t in tasks) for r in group]
    held_out = [(r.get("extra") or {}).get("unseen_accuracy") or {} for r in group]
    unseen_cells, unseen_avg = None, None
    if unseen and all(all(t in h for t in unseen) for h in held_out):
        unseen_cells = {t: _cell([h[t] for h in held_out]) for t in unseen}
        unseen_avg = _cell([statistics.fmean(h[t] for t in unseen) for h in held_out])
    return Row(label=label, cells=per_task, avg=_cell(per_run_avg), n_seeds=len(group), unseen=unseen_cells,
               unseen_avg=unseen_avg)


def _check_consistent(label: str, group: list[Mapping[str, Any]], tasks: list[str], subset_allowed: bool) -> None:
    """Refuse to average runs that measured different things; a silently mixed row would mislead. (Runs of different
    configurations never share a row: :func:`group_rows` splits them first.)"""
    first = group[0]
    for record in group[1:]:
        if set(record["tasks"]) != set(first["tasks"]):
            raise TableError(
                f"records for {label!r} disagree on the task set: {sorted(first['tasks'])} "
                f"(run {first['run_id']}) vs {sorted(record['tasks'])} (run {record['run_id']})"
            )
    models = sorted({r["model"] for r in group})
    if len(models) > 1:
        raise TableError(f"records for {label!r} mix models {models}; filter with --experiment or use distinct labels")
    missing = [t for t in tasks if t not in first["tasks"]]
    if missing:
        raise TableError(f"records for {label!r} have no accuracy for column(s) {missing}")
    extra = [t for t in first["tasks"] if t not in tasks]
    if extra and not subset_allowed:
        raise TableError(
            f"records for {label!r} also cover {extra}, which the table's columns {tasks} lack; "
            "pass task_order (--tasks) to choose the columns explicitly"
        )


def _cell(fractions: list[float]) -> Cell:
    percents = [100.0 * f for f in fractions]
    std = statistics.stdev(percents) if len(percents) >= 2 else None
    return Cell(mean=statistics.fmean(percents), std=std)


def _sources(label: str, entry: Mapping[str, Any]) -> list[tuple[str | None, Mapping[str, float]]]:
    """``numbers`` (one unnamed source) or ``{source: numbers}``; a mix of the two is a typo, refused."""
    nested = [isinstance(v, Mapping) for v in entry.values()]
    if not any(nested):
        return [(None, entry)]
    if not all(nested):
        raise TableError(f"reference for {label!r} mixes numbers with per-source entries: give either "
                         f"{{task: number}} or {{source: {{task: number}}}}, got keys {list(entry)}")
    return list(entry.items())


def _reference_row(label: str, numbers: Mapping[str, float], tasks: list[str], unseen: Sequence[str] = (),
                   source: str | None = None) -> Row:
    """Published numbers; unseen tasks' numbers are given as ``"<task> (unseen)"`` and ``"Avg (unseen)"``."""
    cells = {t: Cell(float(numbers[t]) if t in numbers else None) for t in tasks}
    avg = numbers.get("Avg", numbers.get("avg"))
    if avg is None and all(t in numbers for t in tasks):
        avg = statistics.fmean(float(numbers[t]) for t in tasks)
    unseen_cells = {t: Cell(float(numbers[f"{t} (unseen)"]) if f"{t} (unseen)" in numbers else None) for t in unseen}
    unseen_avg = numbers.get("Avg (unseen)")
    return Row(label=label + (REFERENCE_SUFFIX if source is None else f" ({source})"), cells=cells, avg=Cell(None if avg is None else float(avg)),
               n_seeds=None, is_reference=True, unseen=unseen_cells or None,
               unseen_avg=Cell(None if unseen_avg is None else float(unseen_avg)))


def write_tables(table: Table, out_stem: str | Path) -> tuple[Path, Path]:
    """Write ``<out_stem>.md`` and ``<out_stem>.csv``, each atomically; return both paths."""
    out_stem = Path(out_stem)
    markdown = write_text_atomic(out_stem.with_name(out_stem.name + ".md"), table.to_markdown())
    csv_path = write_text_atomic(out_stem.with_name(out_stem.name + ".csv"), table.to_csv())
    return markdown, csv_path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adamerge-tables", description="Turn adamerge run records into tables.")
    parser.add_argument("paths", nargs="+", type=Path, help=".jsonl record files or directories holding them")
    parser.add_argument("--out", type=Path, help="output stem: writes <OUT>.md and <OUT>.csv")
    parser.add_argument("--experiment", help="use only records of this experiment")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--latest", dest="latest", action="store_true", default=True,
                       help="keep only the newest record per (label, seed) (the default)")
    which.add_argument("--all-records", dest="latest", action="store_false",
                       help="average every record, re-runs included")
    parser.add_argument("--tasks", help="comma-separated column order (may pick a subset)")
    parser.add_argument("--row", dest="rows", action="append", metavar="LABEL", help="row order; repeat per label")
    parser.add_argument("--reference", type=Path,
                        help='JSON file {"label": {"task": percent, ..., "Avg": percent}} for "(paper)" rows, or '
                             '{"label": {"source": {...}}} for one "(source)" row per publication')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of the given records and, with ``--out``, write it as Markdown + CSV."""
    args = _parse_args(argv)
    try:
        records = read_records(args.paths)
        available = sorted({r["experiment"] for r in records})
        if args.experiment is not None:
            records = [r for r in records if r["experiment"] == args.experiment]
            if not records:
                raise TableError(f"no records for experiment {args.experiment!r}; found experiments {available}")
        elif len(available) > 1:  # one table mixing experiments would read as one comparison
            raise TableError(f"the records come from {len(available)} experiments {available}; pick one with "
                             f"--experiment NAME (one table per experiment)")
        if args.latest:
            records = keep_latest(records)
        reference = json.loads(args.reference.read_text(encoding="utf-8")) if args.reference else None
        task_order = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        table = build_table(records, task_order=task_order, row_order=args.rows, reference=reference)
        print_table(table)
        if args.out is not None:
            for path in write_tables(table, args.out):
                print(f"wrote {path}", file=sys.stderr)
    except (OSError, ValueError, ResultsDirError, RecordFormatError, TableError) as error:
        print(f"adamerge-tables: error: {error}", file=sys.stderr)
        return 1
    return 0


def print_table(table: Table) -> None:
    """Rich table on a terminal; plain Markdown when piped, so the output can be pasted or diffed."""
    if not sys.stdout.isatty():
        sys.stdout.write(table.to_markdown())
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    rich_table = RichTable(*table.header)
    for column in rich_table.columns[1:]:
        column.justify = "right"
    for row, texts in zip(table.rows, table.cell_texts()):
        rich_table.add_row(*map(escape, texts), style="dim" if row.is_reference else None)
    Console().print(rich_table)


if __name__ == "__main__":
    sys.exit(main())
