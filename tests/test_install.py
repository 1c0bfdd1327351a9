"""Installing and running on a GPU box (issue 15, item 6): the demo installs only what it needs and leaves tracked
files alone, and a GPU that torch cannot use is said, never silently replaced by the CPU."""

import subprocess
from pathlib import Path

import pytest
import torch

from adamerge.runtime.process import resolve_device
from adamerge.validation import ConfigError, check_device

REPO = Path(__file__).resolve().parents[1]


def make_dry_run(target: str) -> str:
    return subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_make_demo_installs_the_package_alone_and_writes_outside_tracked_files():
    demo = make_dry_run("demo")
    installs = [line for line in demo.splitlines() if "pip install" in line]
    assert installs and all("[dev]" not in line and "-e ." in line for line in installs)
    (run,) = [line for line in demo.splitlines() if "adamerge experiment=demo" in line]
    results = Path(run.split("paths.results_dir=")[1].split()[0])
    ignored = subprocess.run(["git", "check-ignore", "-q", str(results / "tables" / "demo.md")], cwd=REPO)
    assert ignored.returncode == 0, f"{results} is not ignored by git: make demo would dirty the checkout"
    assert "[dev]" in make_dry_run("test")


@pytest.fixture()
def gpu_host(monkeypatch):
    """A host with an NVIDIA device file on which torch finds no usable CUDA (driver too old, CPU-only wheel)."""
    monkeypatch.setattr("adamerge.validation.gpu_devices", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


def test_a_gpu_that_a_cpu_only_torch_cannot_use_is_reported(gpu_host):
    gpu_host.setattr(torch.version, "cuda", None)
    problem = check_device("auto")
    assert "this host has a GPU (/dev/nvidia0)" in problem and "is a CPU-only build" in problem
    assert "Install on a GPU box" in problem and "device=cpu" in problem
    with pytest.raises(ConfigError, match="CPU-only build"):
        resolve_device("auto")
    assert check_device("cpu") is None and resolve_device("cpu") == "cpu"  # the CPU, asked for, is fine


def test_a_cuda_build_that_cannot_initialise_says_why(gpu_host):
    gpu_host.setattr(torch.version, "cuda", "12.8")

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).")

    gpu_host.setattr(torch.cuda, "init", init)
    problem = check_device("auto")
    assert "(CUDA 12.8) cannot use it: The NVIDIA driver on your system is too old" in problem
    assert "The NVIDIA driver on your system is too old" in check_device("cuda")


def test_no_gpu_means_the_cpu_without_a_word(monkeypatch):
    monkeypatch.setattr("adamerge.validation.gpu_devices", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") is None and resolve_device("auto") == "cpu"
