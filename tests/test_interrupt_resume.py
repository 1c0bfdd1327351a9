"""SIGKILL mid-adaptation, then ``ckpt_path=…/last.ckpt``: the same final coefficients as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adamerge.models.checkpoints import load_state_dict
from tests.cli_runner import adamerge, records

pytestmark = pytest.mark.slow

ARGS = ["experiment=smoke", "threads=1", "method=adamerging_layerwise", "trainer.max_steps=150",
        "callbacks.checkpoint.every_n_train_steps=10", "print_config=false", "optimizer.lr=5e-3"]


def test_killed_run_resumes_to_the_same_coefficients(tmp_path, embedded_cache):
    full_dir, killed_dir, resumed_dir = (tmp_path / n for n in ("full", "killed", "resumed"))
    for d in (full_dir, killed_dir, resumed_dir):
        d.mkdir()
    adamerge(ARGS, full_dir, embedded_cache)  # also builds the world before the timed part
    env = dict(os.environ, ADAMERGE_CACHE=str(embedded_cache), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "adamerge", *ARGS], cwd=killed_dir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, ckpt = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        found = list(killed_dir.glob("outputs/smoke/*/checkpoints/last.ckpt"))
        if found and torch.load(found[0], weights_only=False)["global_step"] >= 30:
            ckpt = found[0]
            break
        time.sleep(0.2)
    assert ckpt is not None and proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list(killed_dir.glob("results/raw/*.jsonl"))  # the killed run recorded nothing
    stopped_at = torch.load(ckpt, weights_only=False)["global_step"]
    assert 30 <= stopped_at < 150
    adamerge([*ARGS, f"ckpt_path={ckpt}"], resumed_dir, embedded_cache)
    (full,) = records(full_dir, "smoke")
    (resumed,) = records(resumed_dir, "smoke")
    assert resumed["extra"]["steps"] == full["extra"]["steps"] == 150
    lam_full = load_state_dict(Path(full["extra"]["coefficients_file"]))["coefficients"]
    lam_resumed = load_state_dict(Path(resumed["extra"]["coefficients_file"]))["coefficients"]
    torch.testing.assert_close(lam_resumed, lam_full, atol=1e-6, rtol=0)
