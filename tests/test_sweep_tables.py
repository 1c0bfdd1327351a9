"""Tables that never mislead: one test per way a sweep's table used to (issue 15, item 1), and the provenance every
record carries (item 4)."""

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adamerge.results import build_table, keep_latest, make_record
from adamerge.results.searches import choose, searched_keys
from adamerge.results.tables import main
from adamerge.search.edges import bound_warnings, edge_warnings
from tests.cli_runner import adamerge, records


def trial(lr, val, test, seed=0, label="Task-wise AdaMerging", time="2026-01-01T00:00:00+00:00", steps=10):
    config = {"seed": seed, "threads": 1, "paths": {"output_dir": f"/runs/{lr}/{seed}"}, "trainer": {"max_steps": steps},
              "optimizer": {"lr": lr},
              "method": {"granularity": "task", "init": 0.3, "optimizer": {"lr": lr}}}  # an interpolated copy of lr
    return make_record(experiment="optuna_adamerging", method="adamerging_taskwise", label=label, model="m",
                       seed=seed, accuracy={"a": test, "b": test}, extra={"val_accuracy": {"a": val, "b": val}},
                       config=config, time=time, provenance={})


def test_optuna_trials_sharing_label_and_seed_give_the_best_trial_on_val_not_the_last():
    """The measured case: trials finished best, middling, worst-last; the row is the one chosen on val."""
    trials = [trial(3e-3, 0.511, 0.517, time="2026-01-01T00:00:01+00:00"),
              trial(1e-4, 0.480, 0.490, time="2026-01-01T00:00:02+00:00"),
              trial(9e-3, 0.500, 0.477, time="2026-01-01T00:00:03+00:00")]
    assert len(keep_latest(trials)) == 3  # the old (label, seed) key kept only the last trial
    kept, (search,) = choose(trials, searched_keys({"optimizer.lr": "tag(log, interval(1e-4, 1e-2))"}, trials),
                             {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))"})
    (row,) = build_table(keep_latest(kept)).rows
    assert row.avg.text() == "51.7" and row.n_seeds == 1
    assert "optimizer.lr=0.003" in row.label and "val 51.1" in row.label and "3 trials" in row.label
    report = search.to_markdown("optuna_adamerging")
    assert report.count("✓") == 1 and re.search(r"\| 0\.003 \| 51\.1 \| 51\.7 \| 1 \| ✓ \|", report)
    assert search.warnings == []  # 3e-3 is well inside [1e-4, 1e-2] on a log scale


def test_search_over_seeds_chooses_by_the_mean_val_of_each_trial_and_keeps_its_seeds():
    trials = [trial(1e-3, 0.60, 0.50, seed=0), trial(1e-3, 0.40, 0.52, seed=1),   # val mean 0.50
              trial(1e-2, 0.55, 0.40, seed=0), trial(1e-2, 0.55, 0.42, seed=1)]   # val mean 0.55
    kept, (search,) = choose(trials, ["optimizer.lr"])
    (row,) = build_table(kept).rows
    assert search.chosen.params == {"optimizer.lr": 0.01} and row.n_seeds == 2 and row.avg.text() == "41.0 ± 1.4"


def test_a_grid_edge_or_an_interval_bound_is_warned_about():
    tried = [{"method.lam": x / 10} for x in range(11)]
    assert edge_warnings({"method.lam": 1.0}, tried, {})[0].startswith("method.lam=1 was chosen at the edge of its grid")
    assert edge_warnings({"method.lam": 0.0}, tried, {}) and not edge_warnings({"method.lam": 0.3}, tried, {})
    assert not edge_warnings({"method.lam": 1.0}, tried[-2:], {})  # two values: no grid to be at the edge of
    spec = {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))"}
    assert "within 5% of the searched interval" in edge_warnings({"optimizer.lr": 9.5e-3}, [], spec)[0]
    assert not edge_warnings({"optimizer.lr": 1e-3}, [], spec)
    assert bound_warnings({"alpha": 0.0, "beta": 0.4}, {"alpha": (0.0, 2.0), "beta": (0.0, 1.0)})[0].startswith(
        "alpha=0 ended on a bound")
    from adamerge.search import local_search

    found = local_search(lambda p: -p["alpha"], {"alpha": 0.5}, {"alpha": 0.25}, {"alpha": (0.0, 1.0)}, budget=10)
    assert found.best == {"alpha": 0.0} and found.warnings[0].startswith("alpha=0 ended on a bound")


def test_an_in_run_lambda_grid_reports_its_choice_and_warns_at_the_edge(caplog):
    from adamerge.methods import TaskArithmetic

    theta0 = {"w": torch.zeros(3)}
    ctx = SimpleNamespace(pretrained=theta0, vectors=[{"w": torch.ones(3)}],
                          evaluate=lambda params, split: {"a": float(params["w"][0]) / 2})  # grows with λ
    method = TaskArithmetic(lam_grid=[0.0, 0.5, 1.0], label="Task Arithmetic (λ tuned)")
    with caplog.at_level(logging.INFO, logger="adamerge.methods.scaled"):
        result = method.run(ctx)
    assert result.extra["lambda"] == 1.0 and result.extra["val_avg"] == 0.5
    assert "edge of its grid" in result.extra["search_warnings"][0]
    assert "λ=1 chosen on val (val avg 50.0)" in caplog.text and "edge of its grid" in caplog.text


def test_runs_of_different_configs_under_one_label_become_rows_that_show_their_difference():
    runs = [trial(1e-3, 0.5, 0.55, seed=0, steps=10), trial(1e-3, 0.5, 0.53, seed=1, steps=10),
            trial(1e-2, 0.5, 0.50, seed=0, steps=40)]
    rows = build_table(keep_latest(runs)).rows
    assert [r.label for r in rows] == ["Task-wise AdaMerging [optimizer.lr=0.001, trainer.max_steps=10]",
                                       "Task-wise AdaMerging [optimizer.lr=0.01, trainer.max_steps=40]"]
    assert [r.n_seeds for r in rows] == [2, 1]


def test_adamerge_tables_refuses_to_merge_experiments_without_being_told(tmp_path, capsys):
    from adamerge.results import append_record

    append_record(tmp_path / "a.jsonl", trial(1e-3, 0.5, 0.5))
    other = trial(1e-3, 0.5, 0.6)
    other["experiment"] = "vitb32_8tasks"
    append_record(tmp_path / "b.jsonl", other)
    assert main([str(tmp_path)]) == 1
    assert "2 experiments ['optuna_adamerging', 'vitb32_8tasks']; pick one with --experiment" in capsys.readouterr().err
    assert main([str(tmp_path), "--experiment", "vitb32_8tasks"]) == 0
    assert "60.0" in capsys.readouterr().out


@pytest.mark.slow
def test_a_lambda_sweep_table_shows_this_sweep_only_and_the_lambda_chosen_on_val(tmp_path, embedded_cache):
    base = ["-m", "experiment=smoke", "threads=1", "method=task_arithmetic", "optimized_metric=val"]
    adamerge([*base, "method.lam=0.9"], tmp_path, embedded_cache)  # an older sweep of the same name
    done = adamerge([*base, "method.lam=0.0,0.5,1.0"], tmp_path, embedded_cache)
    runs = records(tmp_path, "smoke")[1:]
    vals = {lam: sum(r["extra"]["val_accuracy"].values()) / len(r["tasks"]) for r in runs
            for lam in [r["config"]["method"]["lam"]]}
    best = max(vals, key=vals.get)
    chosen = next(r for r in runs if r["config"]["method"]["lam"] == best)
    table = (tmp_path / "results" / "tables" / "smoke.md").read_text()
    assert table.count("Task Arithmetic") == 1 and "λ=0.9" not in table  # only this sweep, one chosen row
    assert f"chosen on val from 3 trials: method.lam={best:g}; val {100 * vals[best]:.1f}" in table
    assert f"{100 * chosen['avg']:.1f} |" in table
    report = (tmp_path / "results" / "tables" / "smoke.search.md").read_text()
    assert report.count("✓") == 1 and len([line for line in report.splitlines() if line.startswith("| ")]) == 4
    assert ("edge of its grid" in done.stdout + done.stderr) == (best in (0.0, 1.0))
    assert [r["extra"]["lambda"] for r in runs] == [0.0, 0.5, 1.0]  # each job returned and recorded its val score
    assert all(set(r["extra"]["val_accuracy"]) == set(r["tasks"]) for r in runs)
    # table_history=true brings the older sweep back, as its own row
    adamerge([*base, "method.lam=0.5", "table_history=true"], tmp_path, embedded_cache)
    assert "λ=0.9" in (tmp_path / "results" / "tables" / "smoke.md").read_text()


@pytest.mark.slow
def test_every_record_carries_provenance(tmp_path, embedded_cache):
    adamerge(["experiment=smoke", "threads=1", "method=task_arithmetic", "method.lam=0.4"], tmp_path, embedded_cache)
    (record,) = records(tmp_path, "smoke")
    origin = record["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", origin["git"]["commit"]) and isinstance(origin["git"]["dirty"], bool)
    assert origin["packages"]["torch"] == torch.__version__ and origin["packages"]["adamerge"]
    assert origin["packages"]["open_clip_torch"] and origin["packages"]["lightning"]
    hardware = origin["hardware"]
    assert hardware["cpu"] and hardware["cpu_count"] >= 1 and hardware["gpu_count"] == torch.cuda.device_count()
    assert hardware["device"] in ("cpu", "cuda")
    command = origin["command"]
    assert "method.lam=0.4" in command["overrides"] and command["output_dir"] == record["extra"]["run_dir"]
    run_copy = json.loads((Path(record["extra"]["run_dir"]) / "record.json").read_text())
    assert run_copy["provenance"] == origin


@pytest.mark.slow
def test_an_optuna_search_table_shows_the_trial_optuna_chose_with_its_parameters(tmp_path, embedded_cache):
    from omegaconf import OmegaConf

    adamerge(["experiment=smoke", "hparams_search=optuna_adamerging", "hydra.sweeper.n_trials=3", "threads=1",
              "method=adamerging_taskwise", "print_config=false"], tmp_path, embedded_cache)
    everything = records(tmp_path, "optuna_adamerging")
    runs = [r for r in everything if "/reevaluated/" not in r["extra"]["run_dir"]]
    assert len(runs) == 3 and len({r["config"]["optimizer"]["lr"] for r in runs}) == 3
    val = {r["run_id"]: sum(r["extra"]["val_accuracy"].values()) / len(r["tasks"]) for r in runs}
    best = max(runs, key=lambda r: val[r["run_id"]])
    (optuna,) = (tmp_path / "multirun" / "optuna_adamerging").glob("*/optimization_results.yaml")
    assert OmegaConf.load(optuna).best_params["optimizer.lr"] == best["config"]["optimizer"]["lr"]
    table = (tmp_path / "results" / "tables" / "optuna_adamerging.md").read_text()
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == 1 and f"optimizer.lr={best['config']['optimizer']['lr']:g}" in rows[0]
    assert f"val {100 * val[best['run_id']]:.1f}]" in rows[0] and rows[0].rstrip(" |").endswith(f"{100 * best['avg']:.1f}")
    (again,) = [r for r in everything if "/reevaluated/" in r["extra"]["run_dir"]]  # the chosen trial, run again
    assert again["accuracy"] == best["accuracy"] and again["seed"] == best["seed"]
    assert again["config"]["optimizer"]["lr"] == best["config"]["optimizer"]["lr"]
    report = (tmp_path / "results" / "tables" / "optuna_adamerging.search.md").read_text()
    assert "re-evaluated: the chosen trial (seed 0) run again" in report and "same test accuracy" in report


def test_a_sweep_whose_table_cannot_be_built_fails_instead_of_exiting_0(tmp_path):
    """Hydra turns a callback's exception into a warning; the table's builder must not let a sweep end 'fine'."""
    from hydra import compose, initialize_config_dir

    from adamerge.results.hydra_callback import RECORD_FILE, ResultsTable
    from adamerge.runtime.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=[f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                              f"paths.results_dir={tmp_path / 'results'}"], return_hydra_config=True)
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / RECORD_FILE).write_text('{"label": "torn"')
    with pytest.raises(SystemExit, match="no table for this sweep.*record.json"):
        ResultsTable().on_multirun_end(config)
