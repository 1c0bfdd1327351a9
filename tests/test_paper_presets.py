"""Every paper preset composes and runs: the real loaders on fake dataset folders in the real layouts,
the preset's pool of native checkpoints, a tiny open_clip architecture in place of the CLIP ViT."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from adamerge.runtime.config import CONF_DIR
from adamerge.experiment import run
from adamerge.models.backbone import load_open_clip
from adamerge.models.checkpoints import save_state_dict
from tests.cli_runner import records
from tests.fake_datasets import (make_cars, make_dtd, make_eurosat, make_gtsrb, make_mnist, make_resisc45,
                                 make_sun397, make_svhn)

pytestmark = pytest.mark.slow

TASKS = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
# The open_clip presets; FusionBench's (transformers CLIP, Hugging Face datasets) runs in test_fusionbench_layout.py.
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment" / "paper").glob("*.yaml") if not p.stem.startswith("fusionbench"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The eight datasets (a few images per class) and a fine-tuned tiny tower per task and backbone choice."""
    root = tmp_path_factory.mktemp("paper")
    data = root / "data"
    for make in (make_sun397, make_dtd, make_eurosat, make_resisc45, make_cars, make_gtsrb, make_mnist, make_svhn):
        make(data)
    torch.manual_seed(0)
    theta0 = load_open_clip("adamerge-tiny").visual.state_dict()
    gen = torch.Generator().manual_seed(1)
    for model in ("vit_b32", "vit_l14"):
        for task in TASKS:
            state = {k: v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                     for k, v in theta0.items()}
            save_state_dict(root / "checkpoints" / model / f"{task}.safetensors", state)
    return root


def compose_preset(preset, world, overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", return_hydra_config=True, overrides=[
            f"experiment=paper/{preset}", "model.arch=adamerge-tiny", "model.pretrained=null",
            f"paths.data_dir={world / 'data'}", f"paths.checkpoint_dir={world / 'checkpoints'}",
            f"paths.cache_dir={world / 'cache'}", f"paths.results_dir={world / 'results'}",
            f"paths.output_dir={world / 'out' / preset}", "trainer.max_steps=1", "trainer.accelerator=cpu",
            "trainer.precision=32-true", "callbacks=none", "logger=none", "threads=1", "eval_batch_size=64",
            "tasks.num_workers=0", "method_name=${hydra:runtime.choices.method}", *overrides])


def sweep_methods(cfg) -> list[str]:
    return str(cfg.hydra.sweeper.params.method).split(",")


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_preset_runs_on_fake_data(preset, world, monkeypatch):
    from torchvision.datasets import SVHN

    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)  # fake .mat files have no official MD5
    base = compose_preset(preset, world, [])
    assert base.reference, f"{preset} has no paper numbers"
    methods = sweep_methods(base)
    labels_with_reference = set(base.reference)
    # The main table runs every row; the others run one row without and one with adaptation.
    chosen = methods if preset == "vit_b32_8tasks" else [methods[0], "adamerging_layerwise"]
    extra = ["tasks.corruption=motion_blur"] if "robustness" in preset else []
    for method in chosen:
        cfg = compose_preset(preset, world, [f"method={method}", *extra])
        HydraConfig.instance().set_config(cfg)
        job = cfg.copy()
        with open_dict(job):
            del job["hydra"]  # as @hydra.main hands it to a job
        avg = run(job)
        assert 0.0 <= avg <= 1.0
    done = records(world, str(cfg.name))
    assert [r["method"] for r in done[-len(chosen):]] == chosen
    for record in done[-len(chosen):]:
        assert set(record["tasks"]) == set(cfg.tasks.names)
        if cfg.tasks.get("unseen"):
            assert set(record["extra"]["unseen_accuracy"]) == set(cfg.tasks.unseen)
    assert {r["label"] for r in done} & labels_with_reference, "no row label matches the paper's rows"
