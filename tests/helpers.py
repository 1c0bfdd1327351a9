"""What many test files need: composing the real config tree, small tasks, an optimiser, a Lightning trainer,
and comparing state dicts. Fixtures built from these are in conftest.py."""

from __future__ import annotations

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from adamerge.data.task import Task, TensorImages
from adamerge.runtime.config import CONF_DIR


def compose_cfg(overrides=(), hydra: bool = True):
    """The composed config of ``adamerge <overrides>`` (with its ``hydra`` node when ``hydra``)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def make_tasks(n_tasks: int = 3, n: int = 24, classes: int = 4, splits=("train", "val", "test")) -> list[Task]:
    """``t0``, ``t1``, … with random 16-px images (the tiny tower's size) and labels in every split."""
    gen = torch.Generator().manual_seed(5)
    return [Task(f"t{i}", [f"c{j}" for j in range(classes)], ["a {}"],
                 {s: TensorImages(torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, classes, (n,), generator=gen))
                  for s in splits}) for i in range(n_tasks)]


def random_heads(tasks, dim: int = 32, classes: int = 4) -> dict[str, torch.Tensor]:
    return {t.name: torch.randn(classes, dim, generator=torch.Generator().manual_seed(i)) * 5 for i, t in enumerate(tasks)}


def adam(lr: float = 1e-2):
    return lambda params: torch.optim.Adam(params, lr=lr)


def trainer_factory(root, max_steps: int = 4, **kw):
    """``() -> Trainer``: a quiet CPU Lightning trainer of ``max_steps`` (the MergeContext's make_trainer)."""
    kw.setdefault("enable_checkpointing", False)
    return lambda: L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=root, **kw)


def assert_state_close(a, b, atol: float = 1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
