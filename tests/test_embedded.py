"""The embedded offline world: builds, caches, loads, and its models behave as the paper's do."""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import adamerge  # noqa: F401,E402  (repairs torchvision before open_clip is imported)
import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from adamerge.data.task import Task, TensorImages  # noqa: E402
from adamerge.embedded import (TASK_NAMES, build_world, embedded_backbone, embedded_best_checkpoints,  # noqa: E402
                               embedded_pool, embedded_tasks, read_manifest, world_dir)
from adamerge.embedded.digits import digit_splits  # noqa: E402
from adamerge.evaluation.accuracy import dataset_accuracy  # noqa: E402
from adamerge.finetuning import FinetuneRecipe, finetune_task  # noqa: E402
from adamerge.models.backbone import load_open_clip  # noqa: E402
from adamerge.models.checkpoints import load_state_dict  # noqa: E402
from adamerge.models.heads import zero_shot_head  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny world built once for the module: (cache dir, world dir, first build seconds)."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("embedded-cache")
    start = time.perf_counter()
    world = build_world(cache, preset="tiny", seed=0)
    return cache, world, time.perf_counter() - start


def test_tiny_world_has_every_file_and_a_manifest(tiny):
    cache, world, seconds = tiny
    assert world == world_dir(cache, "tiny", 0) and world.name.startswith("tiny-v")
    manifest = read_manifest(world)
    assert manifest["preset"] == "tiny" and manifest["seed"] == 0 and manifest["arch"] == "adamerge-tiny"
    assert [t["name"] for t in manifest["tasks"]] == TASK_NAMES
    assert (world / "clip.safetensors").is_file() and (world / "pretrained.safetensors").is_file()
    for name in TASK_NAMES:
        assert (world / "finetuned" / f"{name}.safetensors").is_file()
        assert (world / "data" / f"{name}.pt").is_file()
        assert 1 <= len(embedded_best_checkpoints(cache, "tiny", 0)[name]) <= 2
    assert manifest["timings"]["total"] > 0 and seconds < 60


def test_second_call_reuses_the_cache(tiny):
    cache, world, _ = tiny
    stamp = (world / "manifest.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_world(cache, preset="tiny", seed=0) == world
    pool = embedded_pool(cache, preset="tiny", seed=0)
    assert time.perf_counter() - start < 1.0
    assert (world / "manifest.json").stat().st_mtime_ns == stamp
    assert pool["pretrained"].is_file() and set(pool["finetuned"]) == set(TASK_NAMES)
    assert all(p.is_file() for p in pool["finetuned"].values())


def test_incomplete_world_is_rebuilt_not_used(tmp_path):
    world = world_dir(tmp_path, "tiny", 1)
    (world / "finetuned").mkdir(parents=True)
    (world / "finetuned" / "scenes.safetensors").write_bytes(b"half a file")
    assert build_world(tmp_path, preset="tiny", seed=1) == world
    assert read_manifest(world)["seed"] == 1
    assert len(load_state_dict(world / "finetuned" / "scenes.safetensors")) > 0


def test_tasks_are_many_distinct_and_include_real_digits(tiny):
    cache, world, _ = tiny
    tasks = embedded_tasks(cache, preset="tiny", seed=0)
    assert [t.name for t in tasks] == TASK_NAMES and len(tasks) >= 6
    for task in tasks:
        assert len(task.classnames) == len(set(task.classnames)) >= 3
        assert 2 <= len(task.templates) <= 4 and all("{}" in t for t in task.templates)
    digits = next(t for t in tasks if t.name == "digits")
    assert digits.classnames == [str(d) for d in range(10)]
    sizes = read_manifest(world)["tasks"][TASK_NAMES.index("digits")]["sizes"]
    parts = digit_splits(0, sizes["test"], sizes["val"])
    sklearn_targets = torch.as_tensor(load_digits().target)
    for split in ("train", "val", "test"):
        _, labels, index = parts[split]
        got = digits.split(split).labels
        assert torch.equal(got, sklearn_targets[index][: len(got)])  # the real scikit-learn labels
    assert set(digits.split("test").labels.tolist()) == set(range(10))
    all_index = torch.cat([parts[s][2] for s in ("train", "val", "test")])
    assert len(set(all_index.tolist())) == len(all_index)  # digit splits are disjoint


def test_splits_are_disjoint_sized_and_normalised(tiny):
    cache, world, _ = tiny
    manifest = read_manifest(world)
    size = manifest["image_size"]
    for task, meta in zip(embedded_tasks(cache, preset="tiny", seed=0), manifest["tasks"]):
        seen = {}
        for split in ("train", "val", "test"):
            data = task.split(split)
            assert isinstance(data, TensorImages) and len(data) == meta["sizes"][split] > 0
            assert data.images.dtype == torch.float32 and data.images.shape[1:] == (3, size, size)
            assert data.labels.min() >= 0 and data.labels.max() < len(task.classnames)
            assert -3 < data.images.mean() < 3 and data.images.std() > 0.05  # mean/std normalised, not [0, 255]
            seen[split] = {img.numpy().tobytes() for img in data.images}
        assert not seen["train"] & seen["test"] and not seen["val"] & seen["test"], task.name
        assert meta["sizes"]["test"] >= meta["sizes"]["val"]


def test_unknown_task_name_lists_valid_names(tiny):
    cache, _, _ = tiny
    with pytest.raises(ValueError, match="valid names: scenes, shapes, colors"):
        embedded_tasks(cache, preset="tiny", seed=0, names=["imagenet"])
    picked = embedded_tasks(cache, preset="tiny", seed=0, names=["digits", "colors"])
    assert [t.name for t in picked] == ["digits", "colors"]


def test_backbone_is_the_frozen_pretrained_clip(tiny):
    cache, world, _ = tiny
    backbone = embedded_backbone(cache, preset="tiny", seed=0)
    assert not backbone.clip.training and not any(p.requires_grad for p in backbone.clip.parameters())
    pretrained = load_state_dict(embedded_pool(cache, preset="tiny", seed=0)["pretrained"])
    assert pretrained.keys() == backbone.visual.state_dict().keys()
    assert all(torch.equal(v, pretrained[k]) for k, v in backbone.visual.state_dict().items())


def test_finetuned_models_beat_zero_shot_on_their_own_tasks(tiny):
    cache, world, _ = tiny
    backbone = embedded_backbone(cache, preset="tiny", seed=0)
    pool = embedded_pool(cache, preset="tiny", seed=0)
    recorded = read_manifest(world)["accuracy"]
    gains = []
    for task in embedded_tasks(cache, preset="tiny", seed=0):
        head = zero_shot_head(backbone, task.classnames, task.templates)
        zero_shot = dataset_accuracy(backbone.visual, head, task.split("test"))
        tuned = load_open_clip("adamerge-tiny").visual
        tuned.load_state_dict(load_state_dict(pool["finetuned"][task.name]))
        finetuned = dataset_accuracy(tuned, head, task.split("test"))
        assert zero_shot == pytest.approx(recorded[task.name]["zero_shot"], abs=1e-3)
        assert finetuned == pytest.approx(recorded[task.name]["finetuned"], abs=1e-3)
        gains.append(finetuned - zero_shot)
    assert sum(gains) / len(gains) > 0.15
    assert sum(g > 0 for g in gains) >= 6


def test_finetuning_moves_only_the_vision_tower():
    torch.manual_seed(0)
    backbone = load_open_clip("adamerge-tiny")
    head = zero_shot_head(backbone, ["red", "green", "blue"], ["a {} thing.", "something {}."])
    before = {k: v.clone() for k, v in backbone.clip.state_dict().items()}
    head_before = head.clone()
    images = torch.randn(48, 3, backbone.image_size, backbone.image_size)
    data = TensorImages(images, torch.arange(48) % 3)
    task = Task("colors", ["red", "green", "blue"], ["a {} thing."], {"train": data, "val": data})
    recipe = FinetuneRecipe(lr=1e-2, warmup_steps=2, batch_size=16, max_steps=6, val_every_n_steps=2,
                            decay="matrices", grad_clip_norm=None, shuffle="stream")
    with tempfile.TemporaryDirectory() as ckpt_dir:
        outcome = finetune_task(backbone.visual, head, task, recipe, seed=0, ckpt_dir=ckpt_dir, make_trainer=lambda **kw:
                                L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                                          enable_model_summary=False, num_sanity_val_steps=0, **kw))
    after = backbone.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # text tower, logit scale, θ₀: untouched
    assert torch.equal(head, head_before) and not head.requires_grad
    state = outcome.module.vision_state()
    assert state.keys() == backbone.visual.state_dict().keys()
    changed = [k for k, v in state.items() if not torch.equal(v, before[f"visual.{k}"])]
    assert "conv1.weight" in changed and len(changed) > len(state) // 2
    assert len(outcome.best) == 2 and outcome.best[0][1] >= outcome.best[1][1]
    assert outcome.trainer.global_step == 6 and outcome.module.validated_at[0] == 6


def _caption_batches(size: int):
    """Random pictures captioned by four colour words: enough for a few contrastive steps."""
    words = ["red", "green", "blue", "yellow"]

    def batches(n: int):
        captions = [f"a {words[i % 4]} thing." for i in range(n)]
        return torch.randn(n, 3, size, size), captions, captions
    return [f"a {w} thing." for w in words], batches


def test_pretraining_holds_a_fixed_logit_scale_when_asked():
    from adamerge.embedded.pretraining import PretrainConfig, pretrain_clip

    torch.manual_seed(0)
    backbone = load_open_clip("adamerge-tiny")
    vocabulary, batches = _caption_batches(backbone.image_size)
    before = {k: v.clone() for k, v in backbone.clip.state_dict().items()}
    stats = pretrain_clip(backbone.clip, backbone.tokenizer, vocabulary, batches,
                          PretrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1,
                                         logit_scale=100.0, learn_logit_scale=False))
    assert backbone.clip.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    assert stats["logit_scale"] == pytest.approx(100.0, rel=1e-5)
    assert not torch.equal(before["visual.conv1.weight"], backbone.clip.visual.conv1.weight)  # the towers still train
    head = zero_shot_head(backbone, ["red", "blue"], ["a {} thing."])
    assert head.norm(dim=1).tolist() == pytest.approx([100.0, 100.0], rel=1e-4)  # heads carry the fixed scale

    default = load_open_clip("adamerge-tiny")
    initial = default.clip.logit_scale.item()
    pretrain_clip(default.clip, default.tokenizer, vocabulary, batches,
                  PretrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1))
    assert default.clip.logit_scale.item() != initial  # default: CLIP's learnt temperature, as in `demo`

    with pytest.raises(ValueError, match="logit_scale"):
        pretrain_clip(default.clip, default.tokenizer, vocabulary, batches,
                      PretrainConfig(steps=1, batch_size=8, logit_scale=1000.0))


def test_demo100_differs_from_demo_only_in_the_temperature():
    from dataclasses import replace

    from adamerge.embedded.presets import get_preset

    demo, demo100 = get_preset("demo"), get_preset("demo100")
    assert demo.pretrain.logit_scale is None and demo.pretrain.learn_logit_scale  # the default world is untouched
    assert demo100.pretrain.logit_scale == 100.0 and not demo100.pretrain.learn_logit_scale
    assert replace(demo100, name="demo", pretrain=replace(demo100.pretrain, logit_scale=None,
                                                          learn_logit_scale=True)) == demo


def test_world_built_with_a_fixed_logit_scale_keeps_it(tmp_path, monkeypatch):
    from adamerge.embedded import presets

    worlds = tmp_path / "worlds"  # a preset of one's own: a YAML file with a base, as in adamerge/conf/world/
    worlds.mkdir()
    (worlds / "tiny.yaml").write_text((presets.WORLD_DIR / "tiny.yaml").read_text())
    (worlds / "tiny100.yaml").write_text(
        "base: tiny\nname: tiny100\nsplit_sizes: {train: 64, val: 32, test: 32}\npool_size: 256\n"
        "pretrain: {steps: 10, logit_scale: 100.0, learn_logit_scale: false}\nfinetune: {max_steps: 4, val_every_n_steps: 2}\n")
    monkeypatch.setattr(presets, "WORLD_DIR", worlds)
    world = build_world(tmp_path, preset="tiny100", seed=0)
    assert read_manifest(world)["pretraining"]["logit_scale"] == pytest.approx(100.0, rel=1e-5)
    clip = load_state_dict(world / "clip.safetensors")
    assert clip["logit_scale"].exp().item() == pytest.approx(100.0, rel=1e-5)
    backbone = embedded_backbone(tmp_path, preset="tiny100", seed=0)
    assert backbone.clip.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_final_logit_scale_keeps_the_zero_shot_argmax():
    from adamerge.embedded.pretraining import PretrainConfig, pretrain_clip

    runs = {}
    for final in (None, 100.0):
        torch.manual_seed(0)
        backbone = load_open_clip("adamerge-tiny")
        vocabulary, batches = _caption_batches(backbone.image_size)
        stats = pretrain_clip(backbone.clip, backbone.tokenizer, vocabulary, batches,
                              PretrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, final_logit_scale=final))
        runs[final] = (backbone, stats)
    (plain, _), (rescaled, stats) = runs[None], runs[100.0]
    assert plain.clip.logit_scale.exp().item() < 20 and stats["logit_scale"] == pytest.approx(100.0, rel=1e-5)
    same = {k: v for k, v in rescaled.clip.state_dict().items() if k != "logit_scale"}
    assert all(torch.equal(v, plain.clip.state_dict()[k]) for k, v in same.items())  # training itself unchanged
    images = torch.randn(16, 3, plain.image_size, plain.image_size)
    heads = [zero_shot_head(b, ["red", "green", "blue"], ["a {} thing."]) for b in (plain, rescaled)]
    a, b = (torch.nn.functional.normalize(m.visual(images), dim=-1) @ h.T for m, h in zip((plain, rescaled), heads))
    assert torch.equal(a.argmax(1), b.argmax(1)) and b.abs().max() > a.abs().max()
