"""Extrapolation Merging in its own setting (Lin et al., arXiv 2503.04834): from an SFT run's checkpoints to a
searched, evaluated and written merged LLM — the runner of ``adamerge experiment=llm_demo`` and of the ``llm``
presets.

1. Rank the SFT checkpoints on validation (the trainer state's ``eval_loss``, or by evaluating each one);
   θ¹, θ² are the best two.
2. Rows, each scored on the test split of every evaluation task:
   Base (θ₀) · SFT final · SFT best (θ¹) · ExPO, θ¹ + α(θ¹ − θ₀), α searched on val ·
   Extrapolation Merging, β ExPO(θ¹, α) + (1 − β) ExPO(θ², α), (α, β) searched on val.
   The searches are the budgeted local search of the config tree's ``expo_searched`` and
   ``extrapolation_merging`` presets (start, steps, bounds, budget), scoring one live model set in place.
3. The merged model is written as a Hugging Face directory (base dtype and shards, the best checkpoint's
   config and tokenizer, ``merge_config.json`` with α, β, the checkpoints and the search trace), atomically,
   and re-loaded with ``AutoModelForCausalLM`` to check that it scores what its row says.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adamerge.llm.candidates import Candidates
from adamerge.llm.checkpoints import discover, rank, read_metrics
from adamerge.llm.evaluation import mean
from adamerge.results import append_record, check_writable, make_record, write_record_file
from adamerge.results.hydra_callback import RECORDS_FILE
from adamerge.results.records import write_records_file
from adamerge.runtime.process import start_process
from adamerge.runtime.provenance import provenance
from adamerge.runtime.reporting import print_config
from adamerge.search import local_search

log = logging.getLogger(__name__)
RANK_BY = ("trainer_state", "evaluate")


class LLMConfigError(ValueError):
    """An ``llm`` option that cannot work, found before any model is loaded."""


def _validate(llm: DictConfig) -> None:
    if llm.rank_by not in RANK_BY:
        raise LLMConfigError(f"llm.rank_by must be one of {', '.join(RANK_BY)}, got {llm.rank_by!r}")
    for name in ("expo", "extrapolation"):
        objective = llm[name].get("objective")
        if objective != "val":
            raise LLMConfigError(f"llm.{name}.objective={objective!r}: the LLM pipeline searches on the validation "
                                 "split (objective=val); set the start point and budget=1 for a fixed one")
    if llm.world is None and llm.base is None:
        raise LLMConfigError("llm.base is not set: give the base model directory (llm.base=/path/to/Llama-3-8B), "
                             "or use the offline world (experiment=llm_demo)")


def _resolve_inputs(cfg: DictConfig) -> dict:
    llm = cfg.llm
    if llm.world is not None:
        from adamerge.llm.world import build_world

        spec = OmegaConf.to_container(llm.world.spec, resolve=True)
        return {**build_world(cfg.paths.cache_dir, llm.world.name, spec, cfg.seed), "checkpoints": None}
    base = Path(llm.base)
    if not base.is_dir():
        raise LLMConfigError(f"llm.base {base} is not a directory")
    return {"base": base, "sft": Path(llm.sft_run) if llm.sft_run else None,
            "checkpoints": list(llm.checkpoints) if llm.checkpoints else None, "data": None}


def _search(score, method, models, candidates) -> tuple[dict, dict]:
    """(best point, trace) of ``method``'s local search, every candidate scored on val."""
    start, step, bounds = method.search_space()
    trace = []

    def objective(point):
        scores = score(candidates.set_merge(method.fixed_at(point), models), "val")
        trace.append({**point, "val": scores, "val_mean": mean(scores)})
        return mean(scores)

    found = local_search(objective, start, step, bounds, budget=method.budget, min_step=method.min_step,
                         desc=f"{method.label} search")
    log.info("%s: %s chosen on val (val mean %.1f, %d evaluations)", method.label,
             ", ".join(f"{k}={v:g}" for k, v in found.best.items()), 100 * found.value, found.evaluations)
    for warning in found.warnings:
        log.warning("%s: %s", method.label, warning)
    return found.best, {"best": found.best, "val_mean": found.value, "evaluations": found.evaluations,
                        "warnings": found.warnings, "trace": trace}


def run_llm(cfg: DictConfig) -> float:
    """Run the pipeline; return Extrapolation Merging's mean test score (what a sweeper optimises)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    llm = cfg.llm
    _validate(llm)
    process = start_process(cfg)
    records_dir = check_writable(Path(cfg.paths.results_dir) / "raw")
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config", True):
        print_config(cfg)
    expo, extrapolation = instantiate(llm.expo), instantiate(llm.extrapolation)  # bad options fail before loading

    inputs = _resolve_inputs(cfg)
    evaluator = instantiate(llm.evaluator, **({"data_dir": str(inputs["data"])} if inputs["data"] else {}))
    evaluator.check()
    found = discover(inputs["sft"], inputs["checkpoints"])
    if len(found) < 2:
        raise LLMConfigError(f"Extrapolation Merging needs at least two SFT checkpoints, found {len(found)}")
    tokenizer = AutoTokenizer.from_pretrained(found[-1].path)
    model = AutoModelForCausalLM.from_pretrained(inputs["base"], dtype="auto").to(process.device)
    candidates = Candidates(model, inputs["base"], [c.path for c in found], store=llm.store)
    index = {c.name: i + 1 for i, c in enumerate(found)}

    def score(model_, split):
        return evaluator.scores(model_, tokenizer, split)

    if llm.rank_by == "trainer_state":
        read_metrics(found, llm.rank_metric)
        values = {c.name: float(c.metrics[llm.rank_metric]) for c in found}
        greater = bool(llm.greater_is_better)
    else:
        values = {c.name: mean(score(candidates.set_model(index[c.name]), "val")) for c in found}
        greater = True
    ranked = rank(found, values, greater)
    # the final checkpoint: the highest step (a listed one without a step number: the last listed)
    final = found[-1] if any(c.step is None for c in found) else max(found, key=lambda c: c.step)
    best, second = ranked[0], ranked[1]
    log.info("checkpoints by %s: %s", llm.rank_metric if llm.rank_by == "trainer_state" else "val score",
             ", ".join(f"{c.name}={values[c.name]:.4g}" for c in ranked))

    rows: list[tuple[str, str, dict, dict]] = []  # (method key, label, test scores, extra)
    labels = llm.labels
    for key, i in (("base", 0), ("sft_final", index[final.name]), ("sft_best", index[best.name])):
        rows.append((key, labels[key], score(candidates.set_model(i), "test"),
                     {"checkpoint": None if i == 0 else found[i - 1].name}))
    alpha, expo_search = _search(score, expo, [index[best.name]], candidates)
    rows.append(("expo", expo.label, score(candidates.set_merge(expo.fixed_at(alpha), [index[best.name]]), "test"),
                 {"search": expo_search, "checkpoint": best.name}))
    pair = [index[best.name], index[second.name]]
    point, em_search = _search(score, extrapolation, pair, candidates)
    em_test = score(candidates.set_merge(extrapolation.fixed_at(point), pair), "test")
    rows.append(("extrapolation_merging", extrapolation.label, em_test,
                 {"search": em_search, "checkpoints": [best.name, second.name]}))

    written = None
    if llm.write_merged:
        written = _write_merged(cfg, inputs["base"], best, second, extrapolation.fixed_at(point), em_search, values,
                                run_dir)
        if llm.verify_written:
            reloaded = AutoModelForCausalLM.from_pretrained(written, dtype="auto").to(process.device)
            again = evaluator.scores(reloaded, tokenizer, "test")
            if again != em_test:
                raise RuntimeError(f"the written model {written} scores {again}, its row {em_test}: not recorded")
            del reloaded
        rows[-1][3]["written_to"] = str(written)

    records = []
    common = {"checkpoint_ranking": [{"name": c.name, "value": values[c.name]} for c in ranked],
              "rank_by": llm.rank_by, "rank_metric": llm.rank_metric if llm.rank_by == "trainer_state" else "val",
              "evaluator": type(evaluator).__name__, "stored_bytes": candidates.stored_bytes(),
              "seconds": round(time.time() - started, 1), "run_dir": str(run_dir)}
    config = OmegaConf.to_container(cfg, resolve=True)
    origin = provenance(process.device)
    model_name = str(llm.model_name) if llm.model_name else Path(inputs["base"]).name
    for key, label, test, extra in rows:
        records.append(make_record(experiment=cfg.name, method=key, label=label, model=model_name,
                                   seed=cfg.seed, accuracy=test, tasks=evaluator.task_names("test"),
                                   extra={**common, **extra}, config=config, provenance=origin))
    for record in records:
        append_record(records_dir / f"{cfg.name}.jsonl", record)
    write_records_file(run_dir / RECORDS_FILE, records)
    write_record_file(run_dir / "record.json", records[-1])  # the row a sweep's own table reads first
    _write_table(cfg, records)
    log.info("Extrapolation Merging: α=%.3g β=%.3g, test mean %.1f (%.0f s)", point["alpha"], point["beta"],
             100 * mean(em_test), time.time() - started)
    return mean(em_test)


def _write_merged(cfg, base, best, second, method, search, values, run_dir: Path) -> Path:
    from adamerge.model_dirs.merge import merge_model_dirs

    method_cfg = OmegaConf.create(OmegaConf.to_container(cfg.llm.extrapolation, resolve=True))
    method_cfg.objective = None
    method_cfg.start = dict(method.start)
    out = run_dir / "merged"
    return merge_model_dirs(base, [best.path, second.path], "extrapolation_merging", None, out, force=True,
                            copy_from=best.path, command=None, composed=(method, method_cfg, int(cfg.seed)),
                            log=log.info,
                            extra_record={"alpha": method.start["alpha"], "beta": method.start["beta"],
                                          "checkpoints": {"first": str(best.path), "second": str(second.path)},
                                          "checkpoint_scores": values, "search": search})


def _write_table(cfg, records) -> None:
    """This run's table (one seed): results/tables/<name>.md|.csv; a sweep over seeds writes the mean ± sd one."""
    from hydra.core.hydra_config import HydraConfig

    from adamerge.results.tables import build_table, print_table, write_tables

    try:  # composed through the Python API, Hydra's mode is unset: a single run
        multirun = HydraConfig.initialized() and getattr(HydraConfig.get().mode, "name", None) == "MULTIRUN"
    except ValueError:
        multirun = False
    if multirun:
        return
    table = build_table(records, row_order=[r["label"] for r in records])
    print_table(table)
    write_tables(table, Path(cfg.paths.results_dir) / "tables" / cfg.name)
