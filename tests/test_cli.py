"""The ``adamerge`` command end to end on the embedded world's tiny preset (slow: real subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adamerge.models.checkpoints import load_state_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def adamerge(args, cwd, cache_dir, timeout=600, check=True):
    env = dict(os.environ, ADAMERGE_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "adamerge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def records(cwd, name):
    path = Path(cwd) / "results" / "raw" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_smoke_run_end_to_end_writes_record_coefficients_and_checkpoint(tmp_path, cache_dir):
    adamerge(["experiment=smoke", "threads=1"], tmp_path, cache_dir)
    (record,) = records(tmp_path, "smoke")
    assert record["method"] == "adamerging_layerwise" and record["label"] == "Layer-wise AdaMerging"
    assert set(record["accuracy"]) == set(record["tasks"]) and len(record["tasks"]) >= 6
    assert record["extra"]["steps"] == 5
    run_dir = Path(record["extra"]["run_dir"])
    lam = load_state_dict(run_dir / "coefficients.safetensors")["coefficients"]
    assert lam.shape[0] == len(record["tasks"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert list(ckpt["state_dict"]) == ["coefficients.raw"]
    assert (run_dir / "csv" / "metrics.csv").exists()
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "entropy/digits" in header and "batch_acc/digits" in header


def test_multirun_writes_one_record_per_job_and_one_table(tmp_path, cache_dir):
    adamerge(["-m", "experiment=smoke", "threads=1", "method=pretrained,task_arithmetic,ties"], tmp_path, cache_dir)
    assert [r["method"] for r in records(tmp_path, "smoke")] == ["pretrained", "task_arithmetic", "ties"]
    table = (tmp_path / "results" / "tables" / "smoke.md").read_text()
    assert "Pretrained" in table and "Task Arithmetic (λ=0.3)" in table and "TIES-Merging" in table
    assert (tmp_path / "results" / "tables" / "smoke.csv").exists()


def test_saved_coefficients_evaluate_without_training(tmp_path, cache_dir):
    adamerge(["experiment=smoke", "threads=1", "method=adamerging_taskwise"], tmp_path, cache_dir)
    (trained,) = records(tmp_path, "smoke")
    coeffs = trained["extra"]["coefficients_file"]
    adamerge(["experiment=smoke", "threads=1", "method=adamerging_taskwise", f"method.coefficients={coeffs}"],
             tmp_path, cache_dir)
    reused = records(tmp_path, "smoke")[-1]
    assert reused["accuracy"] == trained["accuracy"]
    assert "steps" not in reused["extra"]


def test_unknown_method_fails_listing_valid_choices(tmp_path, cache_dir):
    done = adamerge(["experiment=smoke", "method=adamergin"], tmp_path, cache_dir, check=False)
    assert done.returncode != 0
    assert "adamerging_layerwise" in done.stderr and "task_arithmetic" in done.stderr


def test_coefficient_file_of_other_granularity_is_refused(tmp_path, cache_dir):
    adamerge(["experiment=smoke", "threads=1", "method=adamerging_taskwise", "trainer.max_steps=1"],
             tmp_path, cache_dir)
    coeffs = records(tmp_path, "smoke")[0]["extra"]["coefficients_file"]
    done = adamerge(["experiment=smoke", "threads=1", "method=adamerging_layerwise_plus",
                     f"method.coefficients={coeffs}"], tmp_path, cache_dir, check=False)
    assert done.returncode != 0 and "does not fit this merge" in done.stderr
    assert "task-wise coefficients" in done.stderr and "TIES-trimmed" in done.stderr
