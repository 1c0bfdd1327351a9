"""Where a number came from: code version, packages, hardware and the exact command, stored with every record.

A table cell that cannot be traced to a commit, a torch build and a command line cannot be reproduced; every
record (and every W&B run) carries this block so that a later reader can tell two runs apart.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

#: Distributions whose versions change numbers (kernels, defaults, file formats).
PACKAGES = ("adamerge", "torch", "open_clip_torch", "lightning", "hydra-core", "transformers", "safetensors",
            "lm_eval")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed versions (None where a package is absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=None)
def git_state(directory: str | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout the code runs from; ``commit`` None for an installed wheel.

    ``dirty`` counts tracked files only: untracked run outputs do not make the code differ from its commit.
    """
    where = Path(directory) if directory else Path(__file__).resolve().parents[2]
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    top = (git("rev-parse", "--show-toplevel") or "").strip()
    if not top or not (Path(top) / "adamerge").is_dir():  # not our checkout (a wheel inside someone's repo)
        return {"commit": None, "dirty": None, "changed": []}
    changed = [line[3:] for line in (git("status", "--porcelain", "--untracked-files=no") or "").splitlines()]
    return {"commit": (git("rev-parse", "HEAD") or "").strip() or None, "dirty": bool(changed), "changed": changed[:20]}


def hardware(device: str | None = None) -> dict[str, Any]:
    """CPU model and core count; the accelerator's model, count and CUDA version where torch sees one."""
    import torch

    info: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": _cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "torch_cuda": torch.version.cuda,
                            "device": device}
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        info.update(gpu=[torch.cuda.get_device_name(i) for i in range(count)], gpu_count=count)
    else:
        info.update(gpu=[], gpu_count=0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))  # what this process may use (cgroups, taskset), not the host's
    except AttributeError:
        return os.cpu_count()


def command_line() -> dict[str, Any]:
    """The overrides as Hydra parsed them and the output folder, when a Hydra app runs; argv otherwise."""
    out: dict[str, Any] = {"argv": list(sys.argv)}
    try:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf
    except ImportError:
        return out
    if HydraConfig.initialized():  # fields Hydra's runtime has not filled (compose without a run) stay None
        hydra = HydraConfig.get()

        def get(key: str):
            try:
                value = OmegaConf.select(hydra, key, default=None, throw_on_missing=False)
                return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except Exception:  # noqa: BLE001 - an unresolvable interpolation: unknown, not an error of the run
                return None

        multirun = str(get("mode")) in ("MULTIRUN", "RunMode.MULTIRUN")
        out.update(overrides=list(get("overrides.task") or []), output_dir=get("runtime.output_dir"),
                   job_name=get("job.name"), sweep_dir=get("sweep.dir") if multirun else None)
    return out


def provenance(device: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The block stored under ``record["provenance"]`` and in every logger's config."""
    cmd = command_line()
    if overrides is not None and "overrides" not in cmd:  # the Python API: compose()'s overrides
        cmd["overrides"] = list(overrides)
    return {"git": git_state(), "packages": package_versions(), "hardware": hardware(device), "command": cmd}
