"""Backbones, zero-shot heads, checkpoint files and pools: content-keyed caches and clear errors."""

import pytest
import torch

from adamerge.data.task import Task
from adamerge.merging import CheckpointMismatchError
from adamerge.models.checkpoints import CheckpointError, load_state_dict, save_state_dict
from adamerge.models.head_cache import cached_heads
from adamerge.models.heads import zero_shot_head
from adamerge.models.pool import CheckpointPool, MissingCheckpointError


def test_zero_shot_head_is_scaled_renormalised_mean_of_template_embeddings(tiny_backbone):
    head = zero_shot_head(tiny_backbone, ["cat", "dog"], ["a photo of a {}.", "a {}."])
    scale = tiny_backbone.clip.logit_scale.exp()
    torch.testing.assert_close(head.norm(dim=-1), torch.full((2,), float(scale)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(tiny_backbone.clip.encode_text(tiny_backbone.tokenizer(["a photo of a cat.", "a cat."])), dim=-1)
    expected = torch.nn.functional.normalize(emb.mean(0), dim=-1) * scale
    torch.testing.assert_close(head[0], expected, rtol=1e-5, atol=1e-5)


def test_head_cache_is_keyed_by_content(tiny_backbone, tmp_path):
    task = Task("pets", ["cat", "dog"], ["a photo of a {}."])
    first = cached_heads(tiny_backbone, [task], tmp_path)["pets"]
    assert len(list((tmp_path / "heads").glob("pets-*.safetensors"))) == 1
    again = cached_heads(tiny_backbone, [task], tmp_path)["pets"]
    assert torch.equal(first, again) and len(list((tmp_path / "heads").glob("*.safetensors"))) == 1
    renamed = Task("pets", ["cat", "wolf"], ["a photo of a {}."])
    changed = cached_heads(tiny_backbone, [renamed], tmp_path)["pets"]
    assert not torch.equal(changed[1], first[1]) and torch.equal(changed[0], first[0])
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 2
    with torch.no_grad():  # new text-tower weights: the old entry must not be served
        tiny_backbone.clip.text_projection.mul_(2.0)
    try:
        refreshed = cached_heads(tiny_backbone, [task], tmp_path)["pets"]
        assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 3
        torch.testing.assert_close(refreshed, zero_shot_head(tiny_backbone, task.classnames, task.templates))
    finally:
        with torch.no_grad():
            tiny_backbone.clip.text_projection.div_(2.0)


def test_pool_loads_and_names_tasks_without_checkpoints(tiny_backbone, tiny_models, tmp_path):
    theta0, ft = tiny_models
    save_state_dict(tmp_path / "a.safetensors", ft[0])
    save_state_dict(tmp_path / "b.safetensors", ft[1])
    pool = CheckpointPool(finetuned_dir=tmp_path)
    loaded0, loaded = pool.load(["a", "b"], tiny_backbone.visual)
    assert torch.equal(loaded["b"]["conv1.weight"], ft[1]["conv1.weight"])
    with pytest.raises(MissingCheckpointError) as err:
        pool.load(["a", "b", "cars", "dtd"], tiny_backbone.visual)
    assert "2 of 4 tasks" in str(err.value) and "cars" in str(err.value) and str(tmp_path) in str(err.value)


def test_pool_rejects_checkpoint_of_another_architecture(tiny_backbone, tiny_models, tmp_path):
    _, ft = tiny_models
    other = {k: v for k, v in ft[0].items() if not k.startswith("transformer.resblocks.1.")}
    other["positional_embedding"] = torch.zeros(6, 32)
    save_state_dict(tmp_path / "a.safetensors", other)
    with pytest.raises(CheckpointMismatchError) as err:
        CheckpointPool(finetuned_dir=tmp_path).load(["a"], tiny_backbone.visual)
    msg = str(err.value)
    assert "a.safetensors" in msg and "transformer.resblocks.1.attn.in_proj_weight" in msg
    assert "positional_embedding (6, 32) vs (5, 32)" in msg


def test_truncated_checkpoint_is_named(tiny_models, tmp_path):
    _, ft = tiny_models
    path = save_state_dict(tmp_path / "a.safetensors", ft[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="a.safetensors"):
        load_state_dict(path)


def test_pickled_checkpoint_is_never_unpickled(tmp_path):
    path = tmp_path / "finetuned.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="convert_legacy_checkpoints"):
        load_state_dict(path)


def test_save_is_atomic_and_leaves_no_temporary_files(tiny_models, tmp_path):
    _, ft = tiny_models
    save_state_dict(tmp_path / "x.safetensors", ft[0], metadata={"task": "x", "step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_head_logit_scale_changes_the_temperature_not_the_prediction(tiny_backbone):
    from adamerge.experiment import rescale_heads

    heads = {"a": torch.randn(5, 32, generator=torch.Generator().manual_seed(0))}
    assert rescale_heads(heads, tiny_backbone, None) is heads
    scaled = rescale_heads(heads, tiny_backbone, 100.0)
    current = float(tiny_backbone.clip.logit_scale.exp())
    torch.testing.assert_close(scaled["a"], heads["a"] * (100.0 / current))
    feats = torch.nn.functional.normalize(torch.randn(7, 32), dim=-1)
    assert torch.equal((feats @ scaled["a"].T).argmax(-1), (feats @ heads["a"].T).argmax(-1))
