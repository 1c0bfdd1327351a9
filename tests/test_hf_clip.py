"""Hugging Face transformers CLIP checkpoints: renamed to open_clip exactly (same features), pooled from
folders or the local Hub cache, refused with named keys when wrong; the real-backbone configs compose and
fail fast offline."""

import hashlib
import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from adamerge.runtime.config import CONF_DIR
from tests import helpers
from adamerge.models.backbone import PretrainedWeightsUnavailable, load_open_clip
from adamerge.models.checkpoints import load_state_dict
from adamerge.models.hf_clip import (HFCheckpointError, HFCheckpointPool, HFCheckpointUnavailable, file_digest,
                                     hf_checkpoint_pool, hf_clip_to_open_clip, hf_vision_to_open_clip, load_hf_clip,
                                     read_hf_state_dict)

ARCH = "adamerge-hf-tiny"  # the open_clip twin of the tiny transformers config below (QuickGELU, same widths)
SCRIPT = Path(__file__).parents[1] / "scripts" / "convert_hf_clip.py"


def tiny_config() -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, vocab_size=49408),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=32)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every tensor random (layer norms included), so any swapped or transposed tensor changes the features."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def fine_tuned_tower(clip: CLIPModel, seed: int) -> CLIPVisionModel:
    """A CLIPVisionModel (no image projection) moved a little from ``clip``'s vision tower, as FusionBench saves them."""
    tower = CLIPVisionModel(clip.config.vision_config)
    tower.vision_model.load_state_dict(clip.vision_model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return tower.eval()


@pytest.fixture(scope="module")
def hf_clip() -> CLIPModel:
    return randomize(CLIPModel(tiny_config()), seed=0)


@pytest.fixture(scope="module")
def hf_dirs(hf_clip, tmp_path_factory):
    """A saved CLIPModel (θ₀) and two saved fine-tuned CLIPVisionModels, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("hf")
    hf_clip.save_pretrained(root / "pretrained")
    towers = {task: fine_tuned_tower(hf_clip, seed) for seed, task in enumerate(["alpha", "beta"], start=1)}
    for task, tower in towers.items():
        tower.save_pretrained(root / "finetuned" / task)
    return root, towers


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_converted_clip_gives_the_same_image_and_text_features(hf_clip):
    clip = load_open_clip(ARCH).clip
    clip.load_state_dict(hf_clip_to_open_clip(hf_clip.state_dict()), strict=True)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    tokens = load_open_clip(ARCH).tokenizer(["a photo of a cat", "two dogs on grass", "x"])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), hf_clip.get_image_features(pixel_values=images),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip.encode_text(tokens), hf_clip.get_text_features(input_ids=tokens),
                                   atol=1e-5, rtol=1e-5)
    assert clip.logit_scale.item() == hf_clip.logit_scale.item()
    # q/k/v fused in that order; the image projection stored transposed
    q, k, v = (hf_clip.state_dict()[f"vision_model.encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(clip.visual.transformer.resblocks[1].attn.in_proj_weight, torch.cat([q, k, v]))
    assert torch.equal(clip.visual.proj, hf_clip.visual_projection.weight.t())


def test_vision_tower_with_or_without_prefix_and_projection(hf_clip):
    full = hf_vision_to_open_clip(hf_clip.state_dict())
    tower = CLIPVisionModel(hf_clip.config.vision_config)
    tower.vision_model.load_state_dict(hf_clip.vision_model.state_dict())
    prefixed = {**tower.state_dict(), "vision_model.embeddings.position_ids": torch.arange(5)[None]}  # old buffer
    bare = {k[len("vision_model."):]: v for k, v in tower.state_dict().items()}  # transformers 5 drops the prefix
    assert_same(hf_vision_to_open_clip(prefixed, projection=full["proj"]), full)
    assert_same(hf_vision_to_open_clip(bare, projection=full["proj"]), full)
    with pytest.raises(HFCheckpointError, match="visual_projection.weight"):
        hf_vision_to_open_clip(prefixed)


def test_wrong_keys_are_named(hf_clip):
    state = dict(hf_clip.state_dict())
    del state["vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    state["vision_model.encoder.layers.0.self_attn.qkv.weight"] = torch.zeros(96, 32)
    with pytest.raises(HFCheckpointError) as err:
        hf_vision_to_open_clip(state, source="my-model")
    msg = str(err.value)
    assert "my-model" in msg and "missing 1: vision_model.encoder.layers.1.self_attn.k_proj.bias" in msg
    assert "unexpected 1: vision_model.encoder.layers.0.self_attn.qkv.weight" in msg
    with pytest.raises(HFCheckpointError, match="outside the CLIP vision tower: classifier.weight"):
        hf_vision_to_open_clip({**hf_clip.state_dict(), "classifier.weight": torch.zeros(3)})
    with pytest.raises(HFCheckpointError, match="not a whole transformers CLIPModel"):
        hf_clip_to_open_clip({k: v for k, v in hf_clip.state_dict().items() if not k.startswith("text_model.")})


def test_pickled_or_empty_folder_is_refused_without_reading_it(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(HFCheckpointError, match="never unpickles.*save_pretrained"):
        read_hf_state_dict(tmp_path / "bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFCheckpointError, match="no model.safetensors"):
        read_hf_state_dict(tmp_path / "empty")


def test_pool_converts_hf_folders_once_and_loads_them(hf_clip, hf_dirs, tmp_path):
    root, towers = hf_dirs
    backbone = load_hf_clip(str(root / "pretrained"), ARCH)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone.clip.encode_image(images), hf_clip.get_image_features(pixel_values=images),
                                   atol=1e-5, rtol=1e-5)
    pool = hf_checkpoint_pool(pretrained=str(root / "pretrained"), finetuned_dir=str(root / "finetuned"),
                              pattern="{task}", cache_dir=str(tmp_path / "cache"))
    theta0, finetuned = pool.load(["alpha", "beta"], backbone.visual)
    assert_same(theta0, backbone.visual.state_dict())
    for task, tower in towers.items():  # the missing projection comes from θ₀
        assert_same(finetuned[task], hf_vision_to_open_clip(tower.state_dict(), projection=theta0["proj"]))
    assert not torch.equal(finetuned["alpha"]["conv1.weight"], theta0["conv1.weight"])
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert len(files) == 3
    again = hf_checkpoint_pool(pretrained=str(root / "pretrained"), finetuned={"beta": str(root / "finetuned" / "beta")},
                               cache_dir=str(tmp_path / "cache"))
    _, second = again.load(["beta"], backbone.visual)  # converted files are reused, not rewritten
    assert_same(second["beta"], finetuned["beta"])
    assert sorted((tmp_path / "cache").glob("*.safetensors")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    both = [str(root / "finetuned" / t) for t in ("beta", "alpha")]  # e.g. two checkpoints of one task
    states = hf_checkpoint_pool(candidates={"alpha": both}, cache_dir=str(tmp_path / "cache")).load_candidates(
        "alpha", theta0)
    assert_same(states[0], finetuned["beta"])
    assert_same(states[1], finetuned["alpha"])


def fake_hub_cache(hub: Path, repo_id: str, folder: Path) -> Path:
    """The layout huggingface_hub writes: blobs named by sha256, snapshot files linking to them, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit / "model.safetensors"


def test_hub_ids_come_from_the_local_cache_only_and_missing_ones_fail_fast(hf_dirs, tmp_path):
    root, towers = hf_dirs
    hub = tmp_path / "hub"
    cached = fake_hub_cache(hub, "tanganke/clip-vit-base-patch32_mnist", root / "finetuned" / "alpha")
    # the Hub's blob name is the content hash, so it costs nothing to key the conversion cache by it
    assert file_digest(cached) == hashlib.sha256(cached.read_bytes()).hexdigest()
    backbone = load_hf_clip(str(root / "pretrained"), ARCH)
    pool = hf_checkpoint_pool(cache_dir=str(tmp_path / "cache"), hub_cache_dir=str(hub),
                              task_names={"MNIST": "mnist", "SUN397": "sun397", "Cars": "stanford-cars"})
    assert isinstance(pool, HFCheckpointPool)
    theta0, finetuned = pool.load(["mnist"], backbone.visual)  # task names match case-insensitively
    assert_same(finetuned["mnist"], hf_vision_to_open_clip(towers["alpha"].state_dict(), projection=theta0["proj"]))
    started = time.perf_counter()
    with pytest.raises(HFCheckpointUnavailable) as err:
        pool.load(["MNIST", "SUN397", "Cars"], backbone.visual)
    assert time.perf_counter() - started < 5
    msg = str(err.value)
    assert "2 Hugging Face model(s) unavailable" in msg and "does not download at run time" in msg
    assert "hf download tanganke/clip-vit-base-patch32_sun397 --include '*.json' '*.safetensors'" in msg
    assert "tanganke/clip-vit-base-patch32_stanford-cars" in msg and str(hub) in msg


def compose_cfg(overrides):
    cfg = helpers.compose_cfg(overrides)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.choices.model} (model_name)
    return cfg


def test_hydra_model_and_pool_configs_run_on_hf_folders(hf_clip, hf_dirs, tmp_path):
    root, towers = hf_dirs
    cfg = compose_cfg(["model=hf_clip", "model.native=false", f"model.source={root / 'pretrained'}", f"model.arch={ARCH}",
                       "pool=huggingface", f"pool.finetuned_dir={root / 'finetuned'}", "pool.pattern='{task}'",
                       f"paths.cache_dir={tmp_path}"])
    backbone, pool = instantiate(cfg.model), instantiate(cfg.pool)
    theta0, finetuned = pool.load(["alpha"], backbone.visual)
    assert_same(theta0, hf_vision_to_open_clip(hf_clip.state_dict()))
    assert_same(finetuned["alpha"], hf_vision_to_open_clip(towers["alpha"].state_dict(), projection=theta0["proj"]))
    assert list((tmp_path / "hf_clip").glob("*.safetensors"))


@pytest.mark.parametrize("name,arch", [("vit_b32", "ViT-B-32-quickgelu"), ("vit_b16", "ViT-B-16-quickgelu"),
                                       ("vit_l14", "ViT-L-14-quickgelu")])
def test_real_backbone_configs_compose(name, arch, tmp_path):
    cfg = compose_cfg([f"model={name}", "pool=native", f"paths.cache_dir={tmp_path}",
                       f"paths.checkpoint_dir={tmp_path / 'ckpt'}"])
    assert cfg.model._target_ == "adamerge.models.backbone.load_open_clip"
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.weights) == (arch, "openai", None)
    assert cfg.model.cache_dir == f"{tmp_path}/open_clip"
    assert cfg.pool.finetuned_dir == f"{tmp_path / 'ckpt'}/{name}"
    header = (CONF_DIR / "model" / f"{name}.yaml").read_text().splitlines()[:3]
    assert any(f"adamerge model={name}" in line for line in header)


def test_offline_pretrained_tag_fails_fast_and_says_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    cfg = compose_cfg(["model=vit_b32", f"paths.cache_dir={tmp_path}"])
    started = time.perf_counter()
    with pytest.raises(InstantiationException) as err:  # Hydra wraps it, keeping the message
        instantiate(cfg.model)
    assert time.perf_counter() - started < 10
    assert isinstance(err.value.__cause__, PretrainedWeightsUnavailable) and "could not load" in str(err.value)
    msg = str(err.value.__cause__)
    assert "ViT-B-32-quickgelu" in msg and "'openai'" in msg and f"{tmp_path}/open_clip" in msg
    assert "create_model_and_transforms" in msg and "model.weights=" in msg


def test_hf_backbone_config_fails_fast_offline_with_the_download_command(tmp_path):
    cfg = compose_cfg(["model=hf_clip", f"model.hub_cache_dir={tmp_path}"])
    started = time.perf_counter()
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.model)
    assert time.perf_counter() - started < 5
    assert isinstance(err.value.__cause__, HFCheckpointUnavailable)
    assert "hf download openai/clip-vit-base-patch32" in str(err.value.__cause__)


def test_convert_script_writes_native_files(hf_clip, hf_dirs, tmp_path):
    root, towers = hf_dirs
    spec = importlib.util.spec_from_file_location("convert_hf_clip", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path), f"pretrained={root / 'pretrained'}", str(root / "finetuned" / "beta")]) == 0
    theta0 = load_state_dict(tmp_path / "pretrained.safetensors")
    assert_same(theta0, hf_vision_to_open_clip(hf_clip.state_dict()))
    assert_same(load_state_dict(tmp_path / "beta.safetensors"),
                hf_vision_to_open_clip(towers["beta"].state_dict(), projection=theta0["proj"]))


def test_converted_backbone_reads_its_architecture_from_config_json(hf_clip, hf_dirs, tmp_path):
    """model.native=false model.arch=null: the open_clip twin is registered from config.json (no hand-written
    architecture), and gives the transformers model's features."""
    from adamerge.models.hf_native import HFBackboneError, hf_clip_backbone

    root, _ = hf_dirs
    backbone = hf_clip_backbone(str(root / "pretrained"), native=False, arch=None, cache_dir=str(tmp_path))
    assert backbone.name.startswith("hf-")
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(backbone.clip.encode_image(images), hf_clip.get_image_features(pixel_values=images),
                                   atol=1e-5, rtol=1e-5)
    small_vocab = tiny_config()
    small_vocab.text_config.vocab_size = 300
    CLIPModel(small_vocab).save_pretrained(tmp_path / "small-vocab")
    with pytest.raises(HFBackboneError, match="300 tokens.*model.native=true"):
        hf_clip_backbone(str(tmp_path / "small-vocab"), native=False, cache_dir=str(tmp_path))
