"""Corrupted test sets (AdaMerging's robustness experiment) and the paper presets that use them.

Each corruption is checked as a function (deterministic, same size and mode, changes the image,
stronger with severity), through the real loader on a fake EuroSAT folder (only test images are
corrupted; the decode-once cache gives exactly the plain pipeline's tensors and keys each corruption
apart), and through Hydra: the robustness and generalisation presets compose, sweep what the paper
compares, and their reference rows carry exactly our methods' labels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from adamerge.runtime.config import CONF_DIR
from adamerge.data.benchmark import benchmark_tasks
from adamerge.data.corruptions import (CORRUPTION_FUNCTIONS, CORRUPTIONS, PROFILES, Corrupt, check_corruption,
                                       corrupt, with_corruption)
from adamerge.data.decode_cache import DecodedImages
from adamerge.data.task import TensorImages
from adamerge.results.tables import build_table
from tests.helpers import compose_cfg
from tests.fake_datasets import make_eurosat


def _picture(width=64, height=48, mode="RGB") -> Image.Image:
    """Smooth gradients plus texture: blur, noise, JPEG and contrast all have something to change."""
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b.resize(a.size), np.float64)).mean())


# --- the corruptions as functions -------------------------------------------------------------------

def test_the_paper_s_seven_corruptions_in_table_order():
    assert CORRUPTIONS == ("motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast",
                           "jpeg_compression")
    assert set(CORRUPTION_FUNCTIONS) == set(CORRUPTIONS)
    assert check_corruption("clean") is None and check_corruption(None) is None
    with pytest.raises(ValueError, match="valid: clean, motion_blur"):
        check_corruption("fog")
    with pytest.raises(ValueError, match="severity must be 1..5"):
        Corrupt("contrast", severity=6)
    with pytest.raises(ValueError, match="imagenet-c, cifar-10-c"):
        Corrupt("contrast", profile="imagenet")


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_each_corruption_is_deterministic_keeps_mode_and_size_and_changes_the_image(name, profile, mode):
    image = _picture(mode=mode)
    for severity in (1, 5):
        out = corrupt(image, name, severity, profile=profile)
        again = corrupt(image.copy(), name, severity, profile=profile)
        assert np.array_equal(np.asarray(out), np.asarray(again))  # seeded by the pixels: same image, same result
        assert out.mode == mode
        if name == "pixelate" and profile == "cifar-10-c":
            assert out.size == (32, 32)  # the reference's CIFAR pixelate ends at 32×32 whatever the input
        else:
            assert out.size == image.size
    strong = corrupt(image, name, 5, profile=profile)
    assert _diff(image, strong) > 0.2, f"{name} ({profile}) left the image (almost) unchanged"


def test_randomness_depends_on_the_image_and_the_seed():
    image, other = _picture(), _picture().transpose(Image.FLIP_LEFT_RIGHT)
    noise = np.asarray(corrupt(image, "gaussian_noise", 3), np.float64) - np.asarray(image, np.float64)
    noise_other = np.asarray(corrupt(other, "gaussian_noise", 3), np.float64) - np.asarray(other, np.float64)
    assert not np.allclose(noise, noise_other)  # two images do not share one noise field
    assert not np.array_equal(np.asarray(corrupt(image, "gaussian_noise", 3, seed=0)),
                              np.asarray(corrupt(image, "gaussian_noise", 3, seed=1)))
    assert corrupt(image, "clean") is image


@pytest.mark.parametrize("profile,names", [
    ("imagenet-c", ["gaussian_noise", "impulse_noise", "contrast", "motion_blur", "jpeg_compression"]),
    ("cifar-10-c", ["gaussian_noise", "impulse_noise", "contrast"]),
])
def test_stronger_with_severity(profile, names):
    image = _picture(160, 120)
    for name in names:
        diffs = [_diff(image, corrupt(image, name, s, profile=profile)) for s in range(1, 6)]
        assert all(a < b for a, b in zip(diffs, diffs[1:])), (name, diffs)


def test_contrast_and_noise_do_what_they_say():
    image = _picture()
    x = np.asarray(image, np.float64)
    low = np.asarray(corrupt(image, "contrast", 5), np.float64)  # c = 0.05 around the channel means
    assert low.std(axis=(0, 1)) == pytest.approx(0.05 * x.std(axis=(0, 1)), abs=1.0)
    impulse = np.asarray(corrupt(image, "impulse_noise", 5), np.float64)
    changed = impulse != x
    assert 0.2 < changed.mean() < 0.3 and set(np.unique(impulse[changed])) <= {0.0, 255.0}  # 27 % salt or pepper


def test_cached_and_plain_transforms_see_a_corrupt_step_first(tiny_backbone):
    composed = with_corruption(tiny_backbone.preprocess, "spatter", 3)
    assert isinstance(composed.transforms[0], Corrupt)
    assert composed.transforms[1:] == list(tiny_backbone.preprocess.transforms)
    assert "Corrupt(name='spatter', severity=3, seed=0, profile='imagenet-c')" in repr(composed)
    assert with_corruption(tiny_backbone.preprocess, "clean") is tiny_backbone.preprocess


# --- through the loader -----------------------------------------------------------------------------

def _images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_loader_corrupts_test_only_and_the_cache_agrees(tmp_path, tiny_backbone):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_eurosat(data)
    kw = dict(backbone=tiny_backbone, splits=["train", "val", "test"],
              train_augmentation=False)  # train images must be deterministic to compare
    clean = benchmark_tasks(["eurosat"], data, **kw)[0]
    noisy = benchmark_tasks(["eurosat"], data, corruption="gaussian_noise", severity=5, **kw)[0]
    cached = benchmark_tasks(["eurosat"], data, cache_dir=cache, corruption="gaussian_noise", severity=5, **kw)[0]

    for split in ("train", "val"):
        assert torch.equal(_images(noisy.split(split)), _images(clean.split(split)))
    assert not torch.equal(_images(noisy.split("test")), _images(clean.split("test")))
    assert [int(y) for _, y in (noisy.split("test")[i] for i in range(len(noisy.split("test"))))] == \
        [int(y) for _, y in (clean.split("test")[i] for i in range(len(clean.split("test"))))]

    fast = cached.split("test")
    assert isinstance(fast, TensorImages) and isinstance(fast.images, DecodedImages)
    assert torch.equal(fast.images[0:len(fast)], _images(noisy.split("test")))  # cache == plain corrupted pipeline
    assert torch.equal(cached.split("val").images[0:len(cached.split("val"))], _images(clean.split("val")))
    assert torch.equal(_images(noisy.split("test")),
                       _images(benchmark_tasks(["eurosat"], data, corruption="gaussian_noise", severity=5,
                                               **kw)[0].split("test")))  # a second build: same noise


def test_cache_keys_differ_per_corruption_and_severity(tmp_path, tiny_backbone):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_eurosat(data)

    def test_entries(**corruption):
        benchmark_tasks(["eurosat"], data, backbone=tiny_backbone, splits=["test"], cache_dir=cache, **corruption)
        return {p.name for p in (cache / "datasets").iterdir() if p.is_dir() and p.name.startswith("eurosat-test")}

    seen = [test_entries(), test_entries(corruption="clean"), test_entries(corruption="contrast", severity=2),
            test_entries(corruption="contrast", severity=4), test_entries(corruption="pixelate", severity=4),
            test_entries(corruption="pixelate", severity=4, corruption_profile="cifar-10-c"),
            test_entries(corruption="pixelate", severity=4)]
    assert [len(s) for s in seen] == [1, 1, 2, 3, 4, 5, 5]  # clean = no corruption; the same settings reuse theirs


def test_unknown_corruption_fails_before_reading_data(tmp_path, tiny_backbone):
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        benchmark_tasks(["eurosat"], tmp_path, backbone=tiny_backbone, corruption="snow")


# --- configs ------------------------------------------------------------------------------------------

def _compose(overrides):
    return compose_cfg(overrides)


def _sweep(cfg) -> dict[str, list[str]]:
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def _method_labels(methods) -> dict[str, str]:
    """Our row label of every swept method, as the run records it (the method object's ``label``)."""
    labels = {}
    for method in methods:
        cfg = _compose([f"method={method}"])
        labels[method] = instantiate(cfg.method).label
    return labels


def test_robustness_tasks_config_instantiates_corrupted_tasks(tmp_path, tiny_backbone):
    make_eurosat(tmp_path / "data")
    cfg = _compose(["tasks=robustness4", f"paths.data_dir={tmp_path / 'data'}", "paths.cache_dir=null",
                    "tasks.names=[eurosat]", "tasks.corruption=jpeg_compression"])
    header = (CONF_DIR / "tasks" / "robustness4.yaml").read_text().splitlines()[:10]
    assert any(line.lstrip("# ").startswith("adamerge ") and "tasks=robustness4" in line for line in header)
    assert cfg.tasks.severity == 2 and cfg.tasks.corruption_profile == "cifar-10-c"
    tasks = instantiate(cfg.tasks, backbone=tiny_backbone)
    plain = benchmark_tasks(["eurosat"], tmp_path / "data", backbone=tiny_backbone)[0]
    assert not torch.equal(_images(tasks[0].split("test")), _images(plain.split("test")))
    assert torch.equal(_images(tasks[0].split("val")), _images(plain.split("val")))
    assert list(_compose(["tasks=robustness4"]).tasks.names) == ["cars", "eurosat", "resisc45", "gtsrb"]


def test_robustness_preset_sweeps_methods_and_corruptions_with_a_reference_per_corruption():
    cfg = _compose(["experiment=paper/robustness_vit_b32"])
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.runtime.choices.model == "vit_b32" and cfg.hydra.runtime.choices.pool == "native"
    assert cfg.hydra.runtime.choices.tasks == "robustness4"
    sweep = _sweep(cfg)
    assert sweep["tasks.corruption"] == ["clean", *CORRUPTIONS]
    assert {"task_arithmetic", "ties", "adamerging_taskwise", "adamerging_taskwise_plus", "adamerging_layerwise",
            "adamerging_layerwise_plus"} <= set(sweep["method"])
    assert all((CONF_DIR / "method" / f"{m}.yaml").is_file() for m in sweep["method"])
    labels = set(_method_labels(sweep["method"]).values())
    for corruption in sweep["tasks.corruption"]:
        job = _compose(["experiment=paper/robustness_vit_b32", f"tasks.corruption={corruption}"])
        assert job.name == f"paper_robustness_vit_b32_{corruption}"  # one records file and table per corruption
        reference = OmegaConf.to_container(job.reference, resolve=True)
        assert set(reference) <= labels, set(reference) - labels
        for sources in reference.values():
            assert set(sources) <= {"WEMoE Tab. 5", "FusionBench"}
            for numbers in sources.values():
                assert set(numbers) == {"cars", "eurosat", "resisc45", "gtsrb", "Avg"}
                assert numbers["Avg"] == pytest.approx(np.mean([numbers[t] for t in list(job.tasks.names)]), abs=0.1)
        assert {"Task Arithmetic (λ=0.3)", "TIES-Merging", "Layer-wise AdaMerging"} <= {
            label for label, sources in reference.items() if "WEMoE Tab. 5" in sources}
    lw = OmegaConf.to_container(_compose(["experiment=paper/robustness_vit_b32",
                                          "tasks.corruption=motion_blur"]).reference, resolve=True)
    assert lw["Layer-wise AdaMerging"] == {
        "WEMoE Tab. 5": {"cars": 71.2, "eurosat": 74.6, "resisc45": 82.7, "gtsrb": 94.1, "Avg": 80.6},
        "FusionBench": {"cars": 72.4, "eurosat": 72.7, "resisc45": 85.3, "gtsrb": 94.3, "Avg": 81.2}}
    tasks = ["cars", "eurosat", "resisc45", "gtsrb"]
    runs = [{"label": label, "tasks": tasks, "accuracy": dict.fromkeys(tasks, 0.5), "model": "ViT-B-32-quickgelu",
             "run_id": str(i)} for i, label in enumerate(lw)]
    rows = [r.label for r in build_table(runs, reference=lw).rows]  # each publication its own named row
    assert rows[rows.index("Layer-wise AdaMerging") + 1:][:2] == ["Layer-wise AdaMerging (WEMoE Tab. 5)",
                                                                  "Layer-wise AdaMerging (FusionBench)"]


@pytest.mark.parametrize("split,seen,unseen", [
    ("mnist_eurosat", ["sun397", "cars", "resisc45", "dtd", "svhn", "gtsrb"], ["mnist", "eurosat"]),
    ("resisc45_svhn", ["sun397", "cars", "gtsrb", "eurosat", "dtd", "mnist"], ["resisc45", "svhn"]),
])
def test_generalisation_presets_compose_with_unseen_reference_columns(split, seen, unseen):
    preset = f"paper/generalisation_vit_b32_{split}"
    cfg = _compose([f"experiment={preset}"])
    assert list(cfg.tasks.names) == seen and list(cfg.tasks.unseen) == unseen
    assert cfg.name == f"paper_generalisation_vit_b32_{split}" and cfg.hydra.mode == RunMode.MULTIRUN
    header = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text().splitlines()[:10]
    assert any(line.lstrip("# ").startswith(f"adamerge experiment={preset}") for line in header)
    methods = _sweep(cfg)["method"]
    labels = set(_method_labels(methods).values())
    reference = OmegaConf.to_container(cfg.reference, resolve=True)
    assert set(reference) <= labels and {"Task Arithmetic (λ=0.3)", "TIES-Merging", "Layer-wise AdaMerging"} <= set(reference)
    for sources in reference.values():
        assert set(sources) <= {"WEMoE Tab. 4", "StatsMerging Tab. 3", "FusionBench"}
        for numbers in sources.values():
            assert set(numbers) == {*seen, "Avg", *(f"{t} (unseen)" for t in unseen), "Avg (unseen)"}
            assert numbers["Avg"] == pytest.approx(np.mean([numbers[t] for t in seen]), abs=0.1)
    # Both splits carry the AdaMerging paper's rows as copied by StatsMerging (for MNIST/EuroSAT only the TA
    # and TIES rows, where WEMoE's differ); a printed average that disagrees with its columns stays as
    # published and its header says so.
    for label in ("Task Arithmetic (λ=0.3)", "TIES-Merging"):
        assert "StatsMerging Tab. 3" in reference[label]
    for numbers in reference["Layer-wise AdaMerging++"].values():
        assert numbers["Avg (unseen)"] == pytest.approx(np.mean([numbers[f"{t} (unseen)"] for t in unseen]), abs=0.1)
