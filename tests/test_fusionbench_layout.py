"""FusionBench's checkpoints and datasets as they are: Hugging Face dataset folders (parquet, ``image`` +
``label``) or the local Hub cache, a CLIPModel θ₀ with CLIPVisionModel fine-tunes named like
``tanganke/clip-vit-base-patch32_<task>``, and the whole setting through the CLI, offline."""

from __future__ import annotations

import json

import pytest
import torch

from adamerge.data.errors import DatasetNotFoundError
from adamerge.data.hf_datasets import HFSource, hf_dataset_tasks, open_hf_split
from tests.cli_runner import adamerge, records
from tests.hf_fixtures import save_finetuned_towers, save_pretrained_clip, write_parquet_split

TASKS = ["eurosat", "mnist", "svhn"]
SOURCES = {"eurosat": {"path": "tanganke/eurosat"}, "mnist": {"path": "ylecun/mnist"},
           "svhn": {"path": "ufldl-stanford/svhn", "name": "cropped_digits"}}


@pytest.fixture(scope="module")
def fusionbench_root(tmp_path_factory):
    """<root>/models/openai/clip-vit-tiny (θ₀), <root>/models/tanganke/clip-vit-tiny_<task>, <root>/data/<hub id>."""
    root = tmp_path_factory.mktemp("fb")
    clip = save_pretrained_clip(root / "models" / "openai" / "clip-vit-tiny", seed=0)
    save_finetuned_towers(clip, root / "models" / "tanganke", [f"clip-vit-tiny_{t}" for t in TASKS], seed=2)
    for i, task in enumerate(TASKS):
        folder = root / "data" / SOURCES[task]["path"]
        if "name" in SOURCES[task]:  # a dataset with configs keeps each config's files in its own folder
            folder = folder / SOURCES[task]["name"]
        write_parquet_split(folder, "test", num_classes=10, n=24, seed=i)
        write_parquet_split(folder, "train", num_classes=10, n=40, seed=10 + i)
    return root


def test_a_downloaded_dataset_folder_is_read_with_its_labels(fusionbench_root, tmp_path):
    raw = open_hf_split("svhn", HFSource(**SOURCES["svhn"]), "test", fusionbench_root / "data",
                        hf_cache_dir=str(tmp_path / "hf"))
    assert len(raw) == 24
    image, label = raw.dataset[13]
    assert image.size == (20, 20) and label == 3
    assert raw.files and all(f.suffix == ".parquet" for f in raw.files)


def test_tasks_carry_the_literature_class_names_and_the_backbone_transform(fusionbench_root, tmp_path):
    from adamerge.data.classnames import CLASSNAMES
    from adamerge.models.hf_native import load_hf_clip_native

    backbone = load_hf_clip_native(str(fusionbench_root / "models" / "openai" / "clip-vit-tiny"))
    tasks = hf_dataset_tasks(TASKS, SOURCES, fusionbench_root / "data", backbone, splits={"test": "test", "train": "train"},
                             val_from_train=True, hf_cache_dir=str(tmp_path / "hf"), cache_dir=tmp_path / "cache")
    assert [t.name for t in tasks] == TASKS
    for task in tasks:
        assert task.classnames == list(CLASSNAMES[task.name])
        x, _ = task.split("test")[0]
        assert tuple(x.shape) == (3, 16, 16)  # the model's CLIPImageProcessor: shortest edge + centre crop
        assert len(task.split("val")) == 4 and len(task.split("train")) == 36  # 10 % held out, as task_vectors


def test_missing_dataset_says_what_to_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        open_hf_split("eurosat", HFSource("tanganke/eurosat"), "test", tmp_path / "data", hf_cache_dir=str(tmp_path))
    message = str(err.value)
    assert "hf download --repo-type dataset tanganke/eurosat --local-dir" in message


def test_a_dataset_of_another_task_is_refused(fusionbench_root, tmp_path):
    folder = tmp_path / "data" / "tanganke" / "gtsrb"
    write_parquet_split(folder, "test", num_classes=10, n=10)
    with pytest.raises(DatasetNotFoundError, match="10 classes but gtsrb has 43"):
        open_hf_split("gtsrb", HFSource("tanganke/gtsrb"), "test", tmp_path / "data", hf_cache_dir=str(tmp_path / "c"))


def test_the_local_hub_cache_is_read_offline(fusionbench_root, tmp_path, monkeypatch):
    """A dataset that `hf download --repo-type dataset` put in the Hub cache (no --local-dir) loads offline."""
    import shutil

    import datasets
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snapshot = hub / "datasets--tanganke--eurosat" / "snapshots" / ("0" * 40)
    shutil.copytree(fusionbench_root / "data" / "tanganke" / "eurosat", snapshot)
    (hub / "datasets--tanganke--eurosat" / "refs").mkdir(parents=True)
    (hub / "datasets--tanganke--eurosat" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(datasets.config, "HF_HUB_CACHE", str(hub), raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    raw = open_hf_split("eurosat", HFSource("tanganke/eurosat"), "test", tmp_path / "nowhere",
                        hf_cache_dir=str(tmp_path / "datasets-cache"))
    assert len(raw) == 24 and raw.dataset[5][1] == 5


@pytest.mark.slow
def test_fusionbench_setting_runs_through_the_cli(fusionbench_root, tmp_path):
    """model=hf_clip + pool=huggingface + tasks=fusionbench8 + protocol=fusionbench, offline, end to end."""
    models = fusionbench_root / "models"
    common = ["model=hf_clip", f"model.source={models / 'openai' / 'clip-vit-tiny'}", "pool=huggingface",
              f"pool.finetuned_dir={models}", "pool.hub_model=clip-vit-tiny", "tasks=fusionbench8",
              f"tasks.names=[{','.join(TASKS)}]", f"tasks.data_dir={fusionbench_root / 'data'}",
              f"tasks.hf_cache_dir={tmp_path / 'hf'}", "protocol=fusionbench", "threads=1", "print_config=false",
              "logger=none", "name=fb"]
    adamerge([*common, "method=adamerging_layerwise", "trainer.max_steps=3"], cwd=tmp_path, cache_dir=tmp_path / "c")
    record = records(tmp_path, "fb")[-1]
    assert record["tasks"] == TASKS and record["label"] == "Layer-wise AdaMerging"
    from adamerge.models.checkpoints import load_state_dict

    lam = load_state_dict(record["extra"]["coefficients_file"])["coefficients"]
    assert lam.shape[1] == 2 * 16 + 3 + 2 + 2  # CLIPVisionModel's parameters: q/k/v apart, no projection
    adamerge([*common, "method=ties", "pool.pattern=tanganke/%hub_model_%task"], cwd=tmp_path, cache_dir=tmp_path / "c")
    assert records(tmp_path, "fb")[-1]["label"] == "TIES-Merging"
    config = records(tmp_path, "fb")[-1]["config"]
    assert config["method"]["trim_count"] == "tower"
    json.dumps(config)


def test_merge_models_takes_a_clip_model_base_with_clip_vision_fine_tunes(fusionbench_root, tmp_path):
    """FusionBench's layout in adamerge-merge-models: the vision tensors are merged, the text tower, projections and
    logit scale (in no fine-tuned folder) are the base's, and the output loads as a CLIPModel."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from adamerge.model_dirs.cli import main

    models = fusionbench_root / "models"
    base = models / "openai" / "clip-vit-tiny"
    tuned = [models / "tanganke" / f"clip-vit-tiny_{t}" for t in TASKS]
    out = tmp_path / "merged"
    assert main(["--base", str(base), "--models", *map(str, tuned), "--method", "task_arithmetic", "--lam", "0.3",
                 "--out", str(out)]) == 0
    theta0 = load_file(str(base / "model.safetensors"))
    fts = [load_file(str(t / "model.safetensors")) for t in tuned]
    merged = load_file(str(out / "model.safetensors"))
    for key, value in theta0.items():
        if key.startswith("vision_model."):
            want = value + 0.3 * sum(ft[key] - value for ft in fts)
            torch.testing.assert_close(merged[key], want, atol=1e-6, rtol=0)
        else:
            assert torch.equal(merged[key], value), key
    config = json.loads((out / "merge_config.json").read_text())
    assert "text_model" in config["copied_from_base"] and "vision_model" not in config["copied_from_base"]
    CLIPModel.from_pretrained(str(out))


def test_merge_models_refuses_a_tower_missing_one_tensor(fusionbench_root, tmp_path):
    """A fine-tune that lacks part of a module the others hold is refused (never filled from the base)."""
    from safetensors.torch import load_file, save_file

    from adamerge.model_dirs.cli import main

    models = fusionbench_root / "models"
    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(str(models / "tanganke" / "clip-vit-tiny_mnist" / "model.safetensors"))
    del state["vision_model.post_layernorm.bias"]
    save_file(state, str(broken / "model.safetensors"))
    code = main(["--base", str(models / "openai" / "clip-vit-tiny"), "--models", str(broken),
                 str(models / "tanganke" / "clip-vit-tiny_svhn"), "--method", "weight_averaging", "--out", str(tmp_path / "o")])
    assert code != 0 and not (tmp_path / "o").exists()


PAPER8 = {"sun397": ("tanganke/sun397", None, "sun397"), "cars": ("tanganke/stanford_cars", None, "stanford-cars"),
          "resisc45": ("tanganke/resisc45", None, "resisc45"), "eurosat": ("tanganke/eurosat", None, "eurosat"),
          "svhn": ("ufldl-stanford/svhn", "cropped_digits", "svhn"), "gtsrb": ("tanganke/gtsrb", None, "gtsrb"),
          "mnist": ("ylecun/mnist", None, "mnist"), "dtd": ("tanganke/dtd", None, "dtd")}


@pytest.mark.slow
def test_the_fusionbench_preset_runs_on_its_layout(tmp_path):
    """experiment=paper/fusionbench_vit_b32_8tasks on tiny folders named as FusionBench's (one image per class)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from adamerge.cli import CONF_DIR
    from adamerge.data.classnames import CLASSNAMES
    from adamerge.experiment import run

    clip = save_pretrained_clip(tmp_path / "models" / "openai" / "clip-vit-tiny", seed=0)
    save_finetuned_towers(clip, tmp_path / "models" / "tanganke", [f"clip-vit-tiny_{hub}" for _, _, hub in PAPER8.values()])
    for i, (task, (path, config, _)) in enumerate(PAPER8.items()):
        folder = tmp_path / "data" / path / (config or "")
        write_parquet_split(folder, "test", num_classes=len(CLASSNAMES[task]), n=len(CLASSNAMES[task]), seed=i)
    ran = []
    for method in ("pretrained", "ties", "adamerging_layerwise"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", return_hydra_config=True, overrides=[
                "experiment=paper/fusionbench_vit_b32_8tasks", f"method={method}",
                f"model.source={tmp_path / 'models' / 'openai' / 'clip-vit-tiny'}",
                f"pool.finetuned_dir={tmp_path / 'models'}", "pool.hub_model=clip-vit-tiny",
                f"tasks.data_dir={tmp_path / 'data'}", f"tasks.hf_cache_dir={tmp_path / 'hf'}",
                f"paths.cache_dir={tmp_path / 'cache'}", f"paths.results_dir={tmp_path / 'results'}",
                f"paths.output_dir={tmp_path / 'out' / method}", "trainer.max_steps=1", "trainer.accelerator=cpu",
                "callbacks=none", "logger=none", "threads=1", "method_name=${hydra:runtime.choices.method}"])
        HydraConfig.instance().set_config(cfg)
        job = cfg.copy()
        with open_dict(job):
            del job["hydra"]
        assert 0.0 <= run(job) <= 1.0
        ran.append(method)
    done = records(tmp_path, "paper_fusionbench_vit_b32_8tasks")
    assert [r["method"] for r in done] == ran
    assert {r["label"] for r in done} <= set(cfg.reference)
    assert done[-1]["tasks"] == list(PAPER8)
