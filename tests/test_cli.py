"""The ``adamerge`` command end to end on the embedded world's tiny preset (slow: real subprocesses)."""

import platform
from pathlib import Path

import pytest
import torch

from adamerge.models.checkpoints import load_state_dict
from tests.cli_runner import adamerge, records

pytestmark = pytest.mark.slow


def test_smoke_run_end_to_end_writes_record_coefficients_and_checkpoint(tmp_path, embedded_cache):
    adamerge(["experiment=smoke", "threads=1"], tmp_path, embedded_cache)
    (record,) = records(tmp_path, "smoke")
    assert record["method"] == "adamerging_layerwise" and record["label"] == "Layer-wise AdaMerging"
    assert set(record["accuracy"]) == set(record["tasks"]) and len(record["tasks"]) >= 6
    assert record["extra"]["steps"] == 5
    # a CPU run keeps freed host memory (glibc only: mallopt)
    assert record["extra"]["host_memory_kept"] is (platform.libc_ver()[0] == "glibc")
    run_dir = Path(record["extra"]["run_dir"])
    lam = load_state_dict(run_dir / "coefficients.safetensors")["coefficients"]
    assert lam.shape[0] == len(record["tasks"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert list(ckpt["state_dict"]) == ["coefficients.raw"]
    assert (run_dir / "csv" / "metrics.csv").exists()
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "entropy/digits" in header and "batch_acc/digits" in header and "test_acc/avg" in header
    assert "max_steps" in (run_dir / "csv" / "hparams.yaml").read_text()
    assert (run_dir / "coefficients.png").exists() and (run_dir / "curves.png").exists()


def test_multirun_writes_one_record_per_job_and_one_table(tmp_path, embedded_cache):
    adamerge(["-m", "experiment=smoke", "threads=1", "method=pretrained,task_arithmetic,ties,adamerging_taskwise",
              "reference={Pretrained: {scenes: 50.0}}"], tmp_path, embedded_cache)
    assert [r["method"] for r in records(tmp_path, "smoke")] == ["pretrained", "task_arithmetic", "ties",
                                                                 "adamerging_taskwise"]
    table = (tmp_path / "results" / "tables" / "smoke.md").read_text()
    assert "Pretrained" in table and "Task Arithmetic (λ=0.3)" in table and "TIES-Merging" in table
    assert "| Pretrained (paper)" in table and "50.0" in table  # paper numbers beside ours
    assert (tmp_path / "results" / "tables" / "smoke.csv").exists()
    figures = sorted(p.name for p in (tmp_path / "results" / "figures" / "smoke").iterdir())
    assert figures == ["adamerging_taskwise-seed0-coefficients.png", "adamerging_taskwise-seed0-curves.png"]


def test_saved_coefficients_evaluate_without_training(tmp_path, embedded_cache):
    adamerge(["experiment=smoke", "threads=1", "method=adamerging_taskwise"], tmp_path, embedded_cache)
    (trained,) = records(tmp_path, "smoke")
    coeffs = trained["extra"]["coefficients_file"]
    adamerge(["experiment=smoke", "threads=1", "method=adamerging_taskwise", f"method.coefficients={coeffs}",
              "reuse_host_memory=false"], tmp_path, embedded_cache)
    reused = records(tmp_path, "smoke")[-1]
    assert reused["accuracy"] == trained["accuracy"]  # kept host memory changes speed, never results
    assert "steps" not in reused["extra"] and reused["extra"]["host_memory_kept"] is False


def test_unknown_method_fails_listing_valid_choices(tmp_path, embedded_cache):
    done = adamerge(["experiment=smoke", "method=adamergin"], tmp_path, embedded_cache, check=False)
    assert done.returncode != 0
    assert "adamerging_layerwise" in done.stderr and "task_arithmetic" in done.stderr


def test_coefficient_file_of_other_granularity_is_refused(tmp_path, embedded_cache):
    adamerge(["experiment=smoke", "threads=1", "method=adamerging_taskwise", "trainer.max_steps=1"],
             tmp_path, embedded_cache)
    coeffs = records(tmp_path, "smoke")[0]["extra"]["coefficients_file"]
    done = adamerge(["experiment=smoke", "threads=1", "method=adamerging_layerwise_plus",
                     f"method.coefficients={coeffs}"], tmp_path, embedded_cache, check=False)
    assert done.returncode != 0 and "does not fit this merge" in done.stderr
    assert "task-wise coefficients" in done.stderr and "TIES-trimmed" in done.stderr


def test_unwritable_results_dir_fails_before_any_expensive_work(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the results folder should go")
    cache = tmp_path / "fresh-cache"
    done = adamerge(["experiment=smoke", f"paths.results_dir={blocker}/results"], tmp_path, cache, check=False)
    assert done.returncode != 0
    assert str(blocker) in done.stderr and "paths.results_dir" in done.stderr
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing was built


def test_wandb_offline_run_holds_metrics_config_and_summary(tmp_path, embedded_cache):
    adamerge(["experiment=smoke", "threads=1", "logger=wandb", "logger.wandb.offline=true"], tmp_path,
             embedded_cache, env={"WANDB_MODE": "offline"})
    (record,) = records(tmp_path, "smoke")
    runs = list(Path(record["extra"]["run_dir"]).glob("wandb/offline-run-*"))
    assert len(runs) == 1  # one run per job: wandb.finish() ran
    (events,) = runs[0].glob("run-*.wandb")  # wandb's event log: config, history and summary records
    data = events.read_bytes()
    for expected in (b"max_steps", b"adamerging_layerwise", b"entropy/digits", b"batch_acc/digits", b"test_acc/avg",
                     b"test_accuracy", b"coefficients"):
        assert expected in data, expected


def test_parallel_launcher_runs_two_jobs(tmp_path, embedded_cache):
    adamerge(["-m", "experiment=smoke", "threads=1", "hydra/launcher=parallel", "method=pretrained,task_arithmetic"],
             tmp_path, embedded_cache)
    assert sorted(r["method"] for r in records(tmp_path, "smoke")) == ["pretrained", "task_arithmetic"]
    assert "Task Arithmetic (λ=0.3)" in (tmp_path / "results" / "tables" / "smoke.md").read_text()


def test_tensorboard_logger_writes_event_file(tmp_path, embedded_cache):
    adamerge(["experiment=smoke", "threads=1", "logger=tensorboard"], tmp_path, embedded_cache)
    (record,) = records(tmp_path, "smoke")
    events = list(Path(record["extra"]["run_dir"]).glob("tensorboard/events.out.tfevents.*"))
    assert events
    data = b"".join(e.read_bytes() for e in events)
    assert b"entropy/digits" in data and b"test_acc/avg" in data


def test_tensorboard_logger_for_a_method_without_training(tmp_path, embedded_cache):
    adamerge(["experiment=smoke", "threads=1", "logger=tensorboard", "method=task_arithmetic"], tmp_path, embedded_cache)
    (record,) = records(tmp_path, "smoke")
    events = list(Path(record["extra"]["run_dir"]).glob("tensorboard/events.out.tfevents.*"))
    assert b"test_acc/avg" in b"".join(e.read_bytes() for e in events)


def test_generalisation_evaluates_unseen_tasks_and_tabulates_them(tmp_path, embedded_cache):
    adamerge(["-m", "experiment=smoke", "threads=1", "method=task_arithmetic", "tasks.unseen=[digits,textures]"],
             tmp_path, embedded_cache)
    (record,) = records(tmp_path, "smoke")
    assert "digits" not in record["tasks"] and "textures" not in record["tasks"]
    unseen = record["extra"]["unseen_accuracy"]
    assert set(unseen) == {"digits", "textures"} and all(0.0 <= v <= 1.0 for v in unseen.values())
    table = (tmp_path / "results" / "tables" / "smoke.md").read_text()
    assert "digits (unseen)" in table and "Avg (unseen)" in table


def test_sweep_over_experiment_names_writes_one_table_per_name(tmp_path, embedded_cache):
    adamerge(["-m", "experiment=smoke", "threads=1", "method=pretrained,weight_averaging", "seed=0,1",
              "name=smoke_s${seed}", "reference={Pretrained: {scenes: 12.5}}"], tmp_path, embedded_cache)
    for seed in (0, 1):
        table = (tmp_path / "results" / "tables" / f"smoke_s{seed}.md").read_text()
        assert "Pretrained" in table and "Weight Averaging" in table and "| Pretrained (paper)" in table
        assert len(records(tmp_path, f"smoke_s{seed}")) == 2
