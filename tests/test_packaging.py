"""adamerge installed from a built wheel (not the checkout) runs: the config tree and the architecture files ship
as package data; and the Python API composes and runs a config without a Hydra app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (found,) = dist.glob("adamerge-*.whl")
    return found


def test_the_wheel_holds_the_config_tree_and_architectures(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = sorted((REPO / "adamerge" / "conf").rglob("*.yaml"))
    assert conf and all(f"adamerge/{p.relative_to(REPO / 'adamerge').as_posix()}" in names for p in conf)
    archs = sorted((REPO / "adamerge" / "models" / "architectures").glob("*.json"))
    assert archs and all(f"adamerge/models/architectures/{p.name}" in names for p in archs)


@pytest.mark.slow
def test_an_installed_wheel_runs_outside_the_checkout(wheel, tmp_path, embedded_cache):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), ADAMERGE_CACHE=str(embedded_cache), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("ADAMERGE_CONF", None)

    def run(*args):
        done = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = run("-c", "import adamerge, adamerge.runtime.config as c; print(adamerge.__file__); print(c.CONF_DIR)")
    assert all(line.startswith(str(site)) for line in where.split())
    assert "method:" in run("-m", "adamerge", "--cfg", "job")
    run("-m", "adamerge", "experiment=smoke", "method=task_arithmetic", "threads=1", "print_config=false")
    (line,) = (work / "results" / "raw" / "smoke.jsonl").read_text().splitlines()
    assert json.loads(line)["label"] == "Task Arithmetic (λ=0.3)"


def test_the_python_api_composes_and_runs_without_a_hydra_app(tmp_path, embedded_cache, monkeypatch):
    """The README example: adamerge.compose(...) then adamerge.run(cfg), with no @hydra.main around them."""
    import adamerge

    monkeypatch.chdir(tmp_path)
    cfg = adamerge.compose(["experiment=smoke", "method=task_arithmetic", "threads=1", "print_config=false",
                            "logger=none", f"paths.cache_dir={embedded_cache}"])
    assert cfg.method_name == "task_arithmetic" and cfg.model_name == "tiny"
    assert "hydra" not in cfg and cfg.paths.output_dir.startswith(str(tmp_path / "outputs" / "smoke"))
    avg = adamerge.run(cfg)
    (line,) = (tmp_path / "results" / "raw" / "smoke.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["avg"] == pytest.approx(avg) and record["extra"]["run_dir"] == cfg.paths.output_dir
