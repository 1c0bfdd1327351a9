"""One pass over the composed config before anything loads: every option that cannot work is named.

Why up front: a wrong option found after training loses the run (an hour of GPU time) or, worse, is
found never and a wrong number is recorded. Method-specific options are checked by the method's own
constructor, which the run calls right after this pass, still before any checkpoint is read.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

OPTIMIZED_METRICS = ("test", "val")
SAVE_DTYPES = ("stored", "float32", "float16", "bfloat16")  # save_merged_dtype (adamerge/models/export.py save_dtype)


class ConfigError(ValueError):
    """Options that cannot work, each with where it is set and what would."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_device(device: str) -> str | None:
    """A problem with ``device``, or None: cuda requested on a host without a usable CUDA is refused."""
    import torch

    if device == "cpu":
        return None
    if device == "auto":
        return unusable_gpu()
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            return (f"device={device} but CUDA is not available on this host (torch {torch.__version__}, "
                    f"built for CUDA {torch.version.cuda or 'none'}{_cuda_failure()}); use device=cpu, or install "
                    f"the CUDA build of torch for this driver (README: 'Install on a GPU box')")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            return f"device={device}: this host has {torch.cuda.device_count()} CUDA device(s)"
        return None
    return f"device={device!r}: valid are auto, cpu, cuda, cuda:<index>"


def gpu_devices() -> list[str]:
    """NVIDIA device files of this host: a GPU is there whether or not this torch can use it."""
    return sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))


def unusable_gpu() -> str | None:
    """device=auto on a host with a GPU that torch cannot use: said, never silently run on the CPU instead."""
    import torch

    gpus = gpu_devices()
    if not gpus or torch.cuda.is_available():
        return None
    build = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
             else f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it{_cuda_failure()}")
    return (f"device=auto: this host has a GPU ({', '.join(gpus)}) but {build}. Install the CUDA build of the pinned "
            f"torch for this driver (README: 'Install on a GPU box'), or pass device=cpu to run on the CPU on purpose")


def _cuda_failure() -> str:
    """Why CUDA did not initialise, in torch's words (driver too old, no driver, …)."""
    import torch

    if torch.version.cuda is None:
        return ""
    try:
        torch.cuda.init()
    except Exception as error:  # noqa: BLE001 - any reason torch gives is the one to show
        return f": {str(error).strip().splitlines()[0]}"
    return ""


#: Config targets of the embedded offline world: its tasks and checkpoints exist only for its own CLIP.
EMBEDDED_TARGETS = {"model": "adamerge.embedded.world.embedded_backbone",
                    "tasks": "adamerge.embedded.world.embedded_tasks",
                    "pool": "adamerge.embedded.world.embedded_checkpoint_pool"}


def _target(cfg: DictConfig, group: str) -> str | None:
    node = cfg.get(group)
    return node.get("_target_") if isinstance(node, DictConfig) else None


def _choice(group: str) -> str | None:
    """The option chosen for ``group`` on the command line or in defaults (Hydra's runtime choices), if known."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def check_world(cfg: DictConfig) -> str | None:
    """The embedded world's tasks and pool need its own CLIP (their images, heads and fine-tuned towers belong to
    it; a native pool of towers fine-tuned on it is fine); a mix with a real backbone is named with what to choose."""
    embedded = {g: _target(cfg, g) == t for g, t in EMBEDDED_TARGETS.items() if cfg.get(g) is not None}
    if embedded.get("model", False) or not any(embedded.values()):
        return None
    choices = {g: _choice(g) or _target(cfg, g) for g in embedded}
    mixed = ", ".join(f"{g}={choices[g]}" for g in embedded)
    return (f"{mixed} mix the embedded offline world with other parts: its tasks and fine-tuned checkpoints exist "
            f"only for its own tiny CLIP. Use model=embedded tasks=embedded pool=embedded (or tiny for all three), "
            f"or a real backbone (model=vit_b32|hf_clip|…) with real tasks (tasks=paper8|fusionbench8) and a real "
            f"pool (pool=native|huggingface)")


def validate_run_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of the run's top-level options."""
    world = check_world(cfg)
    if world:  # the other checks would only trip over the mix's unresolvable interpolations
        raise ConfigError("invalid configuration — nothing was loaded or run:\n  - " + world)
    problems: list[str] = []
    metric = cfg.get("optimized_metric", "test")
    if metric not in OPTIMIZED_METRICS:
        problems.append(f"optimized_metric={metric!r}: valid are {', '.join(OPTIMIZED_METRICS)}")
    device_problem = check_device(str(cfg.get("device", "auto")))
    if device_problem:
        problems.append(device_problem)
    if not _positive_int(cfg.get("eval_batch_size", 256)):
        problems.append(f"eval_batch_size={cfg.get('eval_batch_size')!r}: must be an integer ≥ 1")
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(f"seed={seed!r}: must be an integer ≥ 0")
    threads = cfg.get("threads")
    if threads is not None and not _positive_int(threads):
        problems.append(f"threads={threads!r}: must be null or an integer ≥ 1")
    scale = cfg.get("head_logit_scale")
    if scale is not None and not (_finite_number(scale) and scale > 0):
        problems.append(f"head_logit_scale={scale!r}: must be null or a finite number > 0")
    tasks = cfg.get("tasks") or {}
    names = tasks.get("names") if isinstance(tasks, DictConfig) else None
    unseen = tasks.get("unseen") if isinstance(tasks, DictConfig) else None
    for key, listed in (("tasks.names", names), ("tasks.unseen", unseen)):
        if listed is None:
            continue
        listed = [str(n) for n in listed]
        twice = sorted(n for n, c in Counter(n.lower() for n in listed).items() if c > 1)
        if twice:
            problems.append(f"{key} lists {', '.join(twice)} more than once: each task is merged once "
                            f"(its task vector would be counted twice)")
        if not listed and key == "tasks.names":
            problems.append("tasks.names=[]: merge at least one task")
    if names is not None and unseen is not None:
        both = sorted({str(n).lower() for n in names} & {str(n).lower() for n in unseen})
        if both:
            problems.append(f"{', '.join(both)} both merged (tasks.names) and unseen (tasks.unseen): a task is one or the other")
    trainer = cfg.get("trainer") or {}
    steps = trainer.get("max_steps") if isinstance(trainer, DictConfig) else None
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        problems.append(f"trainer.max_steps={steps!r}: must be an integer ≥ 0")
    optimizer = cfg.get("optimizer") or {}
    lr = optimizer.get("lr") if isinstance(optimizer, DictConfig) else None
    if lr is not None and not (_finite_number(lr) and lr > 0):
        problems.append(f"optimizer.lr={lr!r}: must be a finite number > 0")
    path = cfg.get("ckpt_path")
    if path == "last":
        problems.append("ckpt_path=last would look in this run's new (always empty) folder and silently start "
                        "afresh: give the interrupted run's <run>/checkpoints/last.ckpt")
    elif path and not Path(str(path)).is_file():
        problems.append(f"ckpt_path={path}: no such file (give a run's checkpoints/last.ckpt)")
    for flag in ("table_history", "search_reevaluate", "save_merged"):
        if not isinstance(cfg.get(flag, False), bool):
            problems.append(f"{flag}={cfg.get(flag)!r}: must be true or false")
    dtype = cfg.get("save_merged_dtype", "stored")
    if dtype not in SAVE_DTYPES:
        problems.append(f"save_merged_dtype={dtype!r}: valid are {', '.join(SAVE_DTYPES)}")
    method = cfg.get("method") or {}
    coefficients = method.get("coefficients") if isinstance(method, DictConfig) else None
    if coefficients and not Path(str(coefficients)).is_file():
        problems.append(f"method.coefficients={coefficients}: no such file (give a run's coefficients.safetensors)")
    if problems:
        raise ConfigError("invalid configuration — nothing was loaded or run:\n  - " + "\n  - ".join(problems))
