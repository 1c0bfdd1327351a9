"""Legacy pickled whole-module checkpoints convert to native safetensors without running their code."""

import subprocess
import sys
import types

import torch

from adamerge.models.checkpoints import load_state_dict
from adamerge.models.legacy import read_legacy_checkpoint, vision_tower

RAN = []


def pickle_like_task_vectors(clip, path):
    """torch.save of ``src.modeling.ImageEncoder`` wrapping an open_clip model, as the old code did."""
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def __setstate__(self, state):  # would run if the converter imported this class
            RAN.append("code from the pickle ran")
            super().__setstate__(state)

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    modeling.ImageEncoder = ImageEncoder
    sys.modules.update({"src": src, "src.modeling": modeling})
    try:
        torch.save(ImageEncoder(clip), path)
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]


def test_legacy_module_pickle_converts_to_the_vision_tower(tiny_backbone, tmp_path):
    pickle_like_task_vectors(tiny_backbone.clip, tmp_path / "zeroshot.pt")
    state = vision_tower(read_legacy_checkpoint(tmp_path / "zeroshot.pt"))
    expected = tiny_backbone.visual.state_dict()
    assert list(state) == list(expected)
    for key in expected:
        assert torch.equal(state[key], expected[key]), key
    assert RAN == []


def test_converter_script_writes_native_pool(tiny_backbone, tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "MNIST").mkdir(parents=True)
    pickle_like_task_vectors(tiny_backbone.clip, legacy / "zeroshot.pt")
    original = tiny_backbone.visual.proj.detach().clone()
    with torch.no_grad():
        tiny_backbone.visual.proj.add_(1.0)
    try:
        pickle_like_task_vectors(tiny_backbone.clip, legacy / "MNIST" / "finetuned.pt")
        finetuned_proj = tiny_backbone.visual.proj.detach().clone()
    finally:
        with torch.no_grad():
            tiny_backbone.visual.proj.copy_(original)
    done = subprocess.run([sys.executable, "scripts/convert_legacy_checkpoints.py", str(legacy), "--out",
                           str(tmp_path / "native")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mnist = load_state_dict(tmp_path / "native" / "mnist.safetensors")
    pretrained = load_state_dict(tmp_path / "native" / "pretrained.safetensors")
    assert torch.equal(mnist["proj"], finetuned_proj)
    assert torch.equal(pretrained["proj"], tiny_backbone.visual.proj.detach())
