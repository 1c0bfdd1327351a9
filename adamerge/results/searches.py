"""A search sweep (``hparams_search=lambda_grid``, ``optuna_adamerging``, any sweep with ``optimized_metric=val``)
as a table shows it: the trial chosen on *validation*, its parameters and val score in the row, every trial in a
report beside the table, and a warning when the choice sits at the edge of what was searched.

Trials share label and seed; without this the table would show whichever trial finished last.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from adamerge.results.identity import copies_of, fingerprint, result_config, short_value
from adamerge.search.edges import edge_warnings

#: Keys a sweep varies that are not searched parameters: seeds are averaged over, never chosen.
NOT_SEARCHED = ("seed",)


@dataclass
class Trial:
    params: dict[str, Any]
    records: list[dict[str, Any]]
    val: float | None     # mean over seeds of the mean validation accuracy over tasks (fraction)
    test: float           # the same on test


@dataclass
class Search:
    keys: list[str]
    trials: list[Trial]
    chosen: Trial
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def label(self) -> str:
        """The table row: the chosen trial's label, the values it was chosen with and its val score."""
        params = ", ".join(f"{k}={short_value(v)}" for k, v in self.chosen.params.items())
        return (f"{self.chosen.records[0]['label']} [chosen on val from {len(self.trials)} trials: {params}; "
                f"val {100 * self.chosen.val:.1f}]")

    def to_markdown(self, title: str) -> str:
        lines = [f"# {title}: {len(self.trials)} trials over {', '.join(self.keys)}, chosen on validation", "",
                 "| " + " | ".join([*self.keys, "val avg", "test avg", "seeds", "chosen"]) + " |",
                 "|" + "---:|" * (len(self.keys) + 3) + ":---:|"]
        for trial in sorted(self.trials, key=lambda t: -(t.val if t.val is not None else -1)):
            cells = [short_value(trial.params[k]) for k in self.keys]
            cells += ["–" if trial.val is None else f"{100 * trial.val:.1f}", f"{100 * trial.test:.1f}",
                      str(len(trial.records)), "✓" if trial is self.chosen else ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *(f"> {n}" for n in self.notes), *(f"> warning: {w}" for w in self.warnings)]
        return "\n".join(lines).rstrip() + "\n"


def searched_keys(sweeper_params: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The swept override keys that are config values of these runs (``method.lam``, ``optimizer.lr``), without
    seeds and group choices (``method=a,b`` compares methods; it does not search one)."""
    if not sweeper_params:
        return []
    flat = [result_config(r.get("config"), ignore=()) for r in records]
    keys = []
    for key in sweeper_params:
        name = str(key).lstrip("+~")
        if name in NOT_SEARCHED or not flat or not all(name in f for f in flat):
            continue
        keys.append(name)
    return keys


def choose(records: Sequence[Mapping[str, Any]], keys: Sequence[str],
           specs: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[Search]]:
    """Split ``records`` into groups that agree on everything but ``keys`` (and the seed); in each group with more
    than one trial keep the trial of best mean validation accuracy. Returns the records to tabulate (the chosen
    trials' and every record outside a search) and one :class:`Search` per group searched."""
    if not keys:
        return [dict(r) for r in records], []
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        ignore = [*keys, *copies_of(result_config(record.get("config")), keys)]
        groups.setdefault(fingerprint(record.get("config"), ignore=ignore), []).append(record)
    kept: list[dict[str, Any]] = []
    searches: list[Search] = []
    for group in groups.values():
        trials: dict[tuple, list[dict[str, Any]]] = {}
        for record in group:
            flat = result_config(record.get("config"))
            trials.setdefault(tuple(repr(flat.get(k)) for k in keys), []).append(dict(record))
        if len(trials) < 2:
            kept += [dict(r) for r in group]
            continue
        made = [_trial(keys, rs) for rs in trials.values()]
        scored = [t for t in made if t.val is not None]
        if not scored:
            kept += [dict(r) for r in group]  # nothing to choose by: every trial stays a row of its own
            continue
        chosen = max(scored, key=lambda t: t.val)  # first of equals: the order trials ran in
        search = Search(keys=list(keys), trials=made, chosen=chosen)
        search.warnings = edge_warnings(chosen.params, [t.params for t in made], specs or {})
        if len(scored) < len(made):
            search.warnings.append(f"{len(made) - len(scored)} trial(s) recorded no validation accuracy and could "
                                   "not be chosen (run the sweep with optimized_metric=val)")
        searches.append(search)
        kept += [{**r, "label": search.label()} for r in chosen.records]
    return kept, searches


def _trial(keys: Sequence[str], records: list[dict[str, Any]]) -> Trial:
    flat = result_config(records[0].get("config"))
    vals = [(r.get("extra") or {}).get("val_accuracy") for r in records]
    val = statistics.fmean(statistics.fmean(v.values()) for v in vals) if all(vals) else None
    test = statistics.fmean(r["avg"] for r in records)
    return Trial(params={k: flat.get(k) for k in keys}, records=records, val=val, test=test)
