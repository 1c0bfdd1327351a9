"""Test-wide settings: offline, one torch thread, W&B never online, the tiny open_clip architecture."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import adamerge  # noqa: E402,F401  (repairs torchvision before anything imports it)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_backbone():
    from adamerge.models.backbone import load_open_clip

    torch.manual_seed(0)
    return load_open_clip("adamerge-tiny")


@pytest.fixture()
def tiny_models(tiny_backbone):
    """θ₀ of the tiny vision tower and three fine-tuned versions (small random moves)."""
    gen = torch.Generator().manual_seed(1)
    theta0 = {k: v.clone() for k, v in tiny_backbone.visual.state_dict().items()}
    finetuned = [{k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()} for _ in range(3)]
    return theta0, finetuned


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One cache dir for the whole session, so the tiny embedded world is built once."""
    return tmp_path_factory.mktemp("adamerge-cache")


@pytest.fixture()
def ctx(tiny_backbone, tiny_models, tmp_path):
    """A MergeContext: three random tasks on the tiny tower, its three fine-tuned versions, random heads and a
    4-step CPU trainer."""
    from adamerge.methods import MergeContext
    from tests.helpers import make_tasks, random_heads, trainer_factory

    theta0, finetuned = tiny_models
    tasks = make_tasks()
    return MergeContext(backbone=tiny_backbone, tasks=tasks, pretrained=theta0,
                        finetuned={t.name: f for t, f in zip(tasks, finetuned)}, heads=random_heads(tasks),
                        run_dir=tmp_path, make_trainer=trainer_factory(tmp_path))
