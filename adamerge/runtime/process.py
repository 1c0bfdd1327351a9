"""The process set-up every entry point does before anything else."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from adamerge.runtime.host_memory import keep_freed_host_memory_on

# Lightning warnings that describe what adamerge does on purpose: a frozen encoder kept in eval mode,
# checkpoints taken after the coefficient step, and a torch/Lightning pytree deprecation.
QUIET_WARNINGS = (r"Found \d+ module\(s\) in eval mode", r"Using ModelCheckpoint with manual optimization",
                  r".*LeafSpec.* is deprecated")


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu`` — unless the host has a GPU this torch cannot use, which is
    an error naming why (a run never falls back to the CPU unasked); other names as given (validated beforehand)."""
    if name == "auto":
        from adamerge.validation import ConfigError, unusable_gpu

        problem = unusable_gpu()
        if problem:
            raise ConfigError(problem)
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@dataclass(frozen=True)
class Process:
    device: str
    host_memory_kept: bool


def start_process(cfg) -> Process:
    """Quiet the known warnings, set Lightning's log level, threads, device, the CPU host-memory policy (once,
    process-wide: freed blocks are reused instead of faulted in afresh) and the seed."""
    import lightning as L

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning sets its logger to INFO when imported (after Hydra configured logging): hardware tips.
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO if cfg.get("verbose") else logging.WARNING)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.get("device", "auto"))
    kept = keep_freed_host_memory_on(device, cfg.get("reuse_host_memory", True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return Process(device=device, host_memory_kept=kept)
