"""Run the ``adamerge`` command as a user would (a subprocess), offline, on one thread."""

import json
import os
import subprocess
import sys
from pathlib import Path


def adamerge(args, cwd, cache_dir, timeout=600, check=True, env=None):
    full_env = dict(os.environ, ADAMERGE_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
                    OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    done = subprocess.run([sys.executable, "-m", "adamerge", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def records(cwd, name):
    path = Path(cwd) / "results" / "raw" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
