"""adamerge-merge-models against mergekit 0.1.5, replayed from a recording.

mergekit needs transformers 5 (adamerge pins 4.x), so CI does not install it: ``scripts/record_mergekit.py`` ran
mergekit once in its own venv on tiny bf16 Llama directories (base + 3 fine-tunes) and stored inputs, outputs and
the mergekit configs in ``tests/data/mergekit_tiny_llama.safetensors``. Here the same inputs go through adamerge's
mergekit-convention presets and every output tensor is compared; the adamerge-side reference of each convention is
also written out below from mergekit's definitions (``merge_methods/generalized_task_arithmetic.py``,
``sparsify.py``), so a re-recording with another mergekit version shows which side moved.
"""

import json
from pathlib import Path

import adamerge  # noqa: F401  (before transformers imports torchvision)
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adamerge.model_dirs.cli import main

RECORD = Path(__file__).parent / "data" / "mergekit_tiny_llama.safetensors"


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_inputs")
    with safe_open(str(RECORD), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(RECORD)
    inputs, outputs = {}, {}
    for key, value in tensors.items():
        kind, name, tensor = key.split("/", 2)
        (inputs if kind == "input" else outputs).setdefault(name, {})[tensor] = value
    for name, state in inputs.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(meta["config"])
        save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})
    return root, inputs, outputs, json.loads(meta["mergekit_configs"]), json.loads(meta["adamerge_arguments"])


def adamerge_output(recording, case, tmp_path, extra=()):
    root, _, _, configs, arguments = recording
    models = [Path(m["model"]).name for m in configs[case]["models"]]
    out = tmp_path / case
    assert main(["--base", str(root / "base"), "--models", *[str(root / m) for m in models],
                 *arguments[case], *extra, "--out", str(out)]) == 0
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("case", ["linear", "ties", "ties_lambda", "dare_ties_dense", "expo"])
def test_bit_identical_to_mergekit(recording, case, tmp_path):
    """Weight averaging, ExPO, and TIES / dense DARE-TIES under mergekit's conventions (per tensor, exactly
    int(n·density) kept by argsort order, zero sum → +1, normalised or summed): every bf16 tensor equal."""
    expected = recording[2][case]
    got = adamerge_output(recording, case, tmp_path)
    assert got.keys() == expected.keys()
    differing = {k: int((got[k] != expected[k]).sum()) for k in expected if not torch.equal(got[k], expected[k])}
    assert differing == {}, differing


def test_task_arithmetic_within_one_bf16_ulp_of_mergekit(recording, tmp_path):
    """θ₀ + λ Σ τ: mergekit scales each τ by its weight before summing, adamerge sums then scales by λ — the
    same number up to float32 rounding, so at most 1 bf16 ulp apart after the cast."""
    expected = recording[2]["task_arithmetic"]
    got = adamerge_output(recording, "task_arithmetic", tmp_path)
    for key, want in expected.items():
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
        assert ((got[key].float() - want.float()).abs() <= ulp * 1.0001).all(), key


def test_official_ties_differs_from_mergekit_where_the_conventions_do(recording, tmp_path):
    """`ties` (one threshold over the whole vector, ties at it kept, majority sign, dis-sum, λ 0.3) is a different
    merge than mergekit's `ties`: most tensors differ; ties_mergekit is the one to compare with mergekit."""
    expected = recording[2]["ties"]
    got = adamerge_output(recording, "ties", tmp_path, extra=["--method", "ties"])
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert len(differ) > len(expected) // 2


def test_references_of_mergekit_conventions_written_out(recording):
    """The mergekit rules, written here from their definition, reproduce the recording: trim to exactly
    k = max(1, int(n·density)) by argsort of |τ| (float32), elect +1 where Σ ≥ 0, disjoint mean."""
    _, inputs, outputs, configs, _ = recording
    density = configs["ties"]["models"][0]["parameters"]["density"]
    base = inputs["base"]
    for key, b in base.items():
        deltas = []
        for name in ("ft1", "ft2", "ft3"):
            tau = inputs[name][key].float() - b.float()
            k = max(1, int(density * tau.numel()))
            mask = torch.zeros(tau.numel())
            mask[torch.argsort(tau.abs().reshape(-1), descending=True)[:k]] = 1
            deltas.append(tau * mask.view(tau.shape))
        stack = torch.stack(deltas)
        majority = (stack.sum(0) >= 0).float() * 2 - 1
        agree = (stack.sign() == majority).float()
        divisor = agree.sum(0)
        divisor[divisor == 0] = 1
        reference = (b.float() + (stack * agree).sum(0) / divisor).to(torch.bfloat16)
        assert torch.equal(reference, outputs["ties"][key]), key


def test_dare_l1_rescale_is_mergekit_rescale():
    """mergekit's DARE rescale (``rescale: true``) brings each masked tensor back to its own L1 norm; adamerge's
    ``rescale: l1`` does the same on the same mask (the masks themselves come from different generators)."""
    from adamerge.merging.dare import rescaled
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(50, 7, generator=gen)
    keep = torch.rand(50, 7, generator=gen) >= 0.6
    masked = tau * keep
    reference = masked * (tau.abs().sum() / masked.abs().sum())
    assert torch.equal(rescaled(tau, keep, 0.6, "l1"), reference)
    assert torch.equal(rescaled(tau, torch.zeros_like(keep), 0.6, "l1"), torch.zeros_like(tau))  # below eps: not scaled
