"""adamerge-merge-models on tiny Hugging Face causal LMs: each method's formula, the output layout and dtype,
the self-documenting merge_config.json, and the refusals (mismatched model, pickles, existing output,
failure half-way)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import adamerge  # noqa: F401  (before anything imports torchvision)
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models as token_models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adamerge.model_dirs import MERGE_CONFIG, ModelDirError, merge_model_dirs
from adamerge.model_dirs import merge as merge_module
from adamerge.model_dirs.cli import main

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64


def tiny_llama(hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w3".."w63", built offline, so the merged folder can be used end to end."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_variant(theta0: dict, move: dict, folder: Path, **save_kwargs) -> dict:
    """Save θ₀ + move as a model directory (same config); return its fp32 state dict."""
    model = tiny_llama()
    state = {k: theta0[k] + move[k] for k in theta0}
    model.load_state_dict(state)
    model.save_pretrained(folder, **save_kwargs)
    return state


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """θ₀ (single file + tokenizer, and a sharded copy), two "SFT" versions (one sharded differently), two
    versions whose task vectors agree in sign everywhere, a wider model and a pickle-only directory."""
    root = tmp_path_factory.mktemp("zoo")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    base.save_pretrained(root / "base_sharded", max_shard_size="20KB")
    theta0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    noise = lambda: {k: 0.02 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()}  # noqa: E731
    states = {"base": theta0,
              "sft1": save_variant(theta0, noise(), root / "sft1", max_shard_size="40KB"),
              "sft2": save_variant(theta0, noise(), root / "sft2")}
    sign = {k: torch.where(torch.rand(v.shape, generator=gen) < 0.5, -1.0, 1.0) for k, v in theta0.items()}
    for name in ("agree1", "agree2"):
        states[name] = save_variant(theta0, {k: sign[k] * (v.abs() + 1e-3) for k, v in noise().items()}, root / name)
    tiny_llama(hidden=48).save_pretrained(root / "wide")
    base.save_pretrained(root / "pickled", safe_serialization=False)
    return root, states


def run(*args) -> int:
    return main([str(a) for a in args])


def loaded_state(folder: Path, **kwargs) -> dict:
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).state_dict()


def assert_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=key)


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders the atomic writer would leave if it failed to clean up."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def tau(states, name):
    return {k: states[name][k] - states["base"][k] for k in states["base"]}


def test_task_arithmetic_matches_formula_runs_and_documents_itself(zoo, tmp_path):
    root, states = zoo
    out = tmp_path / "merged"
    assert run("--base", root / "base", "--models", root / "sft1", root / "sft2",
               "--method", "task_arithmetic", "--lam", 0.3, "--out", out) == 0
    t1, t2 = tau(states, "sft1"), tau(states, "sft2")
    assert_state(loaded_state(out), {k: v + 0.3 * (t1[k] + t2[k]) for k, v in states["base"].items()})
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)  # copied from the base with config.json
    batch = tokenizer(["w3 w4 w5 w6"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()

    record = json.loads((out / MERGE_CONFIG).read_text())
    assert record["method"] == "task_arithmetic" and record["title"] == "Task Arithmetic (λ=0.3)"
    assert record["method_config"] == {"_target_": "adamerge.methods.TaskArithmetic", "lam": 0.3, "lam_grid": None,
                                       "label": "Task Arithmetic (λ=0.3)"}
    assert "θ = θ₀ + λ Σₖ τₖ" in record["description"]  # the YAML header of conf/method/task_arithmetic.yaml
    assert record["base"]["path"] == str((root / "base").resolve())
    assert [m["path"] for m in record["models"]] == [str((root / n).resolve()) for n in ("sft1", "sft2")]
    assert record["models"][0]["index"] == "model.safetensors.index.json"
    assert len(record["models"][0]["index_sha256"]) == 64
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(record["copied_files"])
    assert record["output"]["tensors"] == len(states["base"]) and record["output"]["dtypes"] == {"torch.float32": 21}
    assert record["command"].startswith("adamerge-merge-models --base")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("method, models, params, formula", [
    ("expo", ["sft1"], ["--alpha", 0.5],
     lambda s, k: s["sft1"][k] + 0.5 * (s["sft1"][k] - s["base"][k])),
    ("extrapolation_merging", ["sft1", "sft2"], ["--alpha", 0.5, "--beta", 0.3],
     lambda s, k: 0.3 * (1.5 * s["sft1"][k] - 0.5 * s["base"][k]) + 0.7 * (1.5 * s["sft2"][k] - 0.5 * s["base"][k])),
    ("expo", ["sft1", "sft2"], ["--alpha", 0.5],  # two models: each extrapolated, then task arithmetic λ = 0.3
     lambda s, k: s["base"][k] + 0.3 * 1.5 * (s["sft1"][k] + s["sft2"][k] - 2 * s["base"][k])),
    ("extrapolation_merging", ["sft1", "sft2"], [],  # the config tree's start point: α = 0, β = 0.5
     lambda s, k: 0.5 * s["sft1"][k] + 0.5 * s["sft2"][k]),
    ("weight_averaging", ["sft1", "sft2"], [],
     lambda s, k: (s["sft1"][k] + s["sft2"][k]) / 2),
    ("dare_task_arithmetic", ["sft1", "sft2"], ["--p", 0, "--lam", 0.7],  # p = 0 drops nothing: task arithmetic
     lambda s, k: s["base"][k] + 0.7 * (s["sft1"][k] + s["sft2"][k] - 2 * s["base"][k])),
])
def test_method_matches_its_formula(zoo, tmp_path, method, models, params, formula):
    root, states = zoo
    out = tmp_path / method
    assert run("--base", root / "base", "--models", *[root / m for m in models], "--method", method, *params,
               "--out", out) == 0
    assert_state(loaded_state(out), {k: formula(states, k) for k in states["base"]})


def test_ties_keep_one_without_sign_conflict_is_task_arithmetic(zoo, tmp_path):
    """With every entry kept and both task vectors agreeing in sign, the official dis-sum (ties) is τ₁ + τ₂ and
    mergekit's disjoint mean (ties_mergekit) is (τ₁ + τ₂)/2."""
    root, states = zoo
    models = ["--models", root / "agree1", root / "agree2"]
    assert run("--base", root / "base", *models, "--method", "ties", "--keep", 1, "--lam", 0.3,
               "--out", tmp_path / "ties") == 0
    assert run("--base", root / "base", *models, "--method", "ties_mergekit", "--keep", 1, "--lam", 0.6,
               "--out", tmp_path / "ties_mergekit") == 0
    t1, t2 = tau(states, "agree1"), tau(states, "agree2")
    expected = {k: v + 0.3 * (t1[k] + t2[k]) for k, v in states["base"].items()}
    assert_state(loaded_state(tmp_path / "ties"), expected)
    assert_state(loaded_state(tmp_path / "ties_mergekit"), expected)


def test_ties_on_directories_is_the_state_dict_ties_exactly(zoo, tmp_path):
    """`ties` on model directories streams (a radix-select threshold per whole task vector, the majority sign in
    a first pass, agreeing entries accumulated row by row): the very numbers of ties_merge on the state dicts."""
    from adamerge.merging import ties_merge, task_vector
    root, states = zoo
    out = tmp_path / "ties"
    assert run("--base", root / "base", "--models", root / "sft1", root / "sft2", root / "agree1", "--method", "ties",
               "--out", out) == 0
    vectors = [task_vector(states[n], states["base"]) for n in ("sft1", "sft2", "agree1")]
    expected = ties_merge(states["base"], vectors, keep=0.2, lam=0.3, merge="sum")
    merged = loaded_state(out)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    moved = sum(int((merged[k] != v).sum()) for k, v in states["base"].items()) / sum(map(torch.numel, merged.values()))
    assert 0.2 < moved < 0.6  # three trims to 20 % (about half of a random union survives the sign election)


def test_ties_mergekit_trims_each_tensor_to_exactly_k(zoo, tmp_path):
    """ties_mergekit keeps exactly max(1, int(0.2 n)) entries of each tensor per model, so at most twice that
    many of a tensor's n entries move with two models."""
    root, states = zoo
    out = tmp_path / "ties"
    assert run("--base", root / "base", "--models", root / "sft1", root / "sft2", "--method", "ties_mergekit",
               "--keep", 0.2, "--out", out) == 0
    for key, value in loaded_state(out).items():
        k = max(1, int(0.2 * value.numel()))
        moved = int((value != states["base"][key]).sum())
        assert k <= moved <= 2 * k, (key, moved, k)


def test_dare_drops_with_per_tensor_seeded_masks(zoo, tmp_path):
    """One model, λ = 1: the output is θ₀ + mask ⊙ τ / (1 − p), masks reproducible and different per tensor."""
    root, states = zoo
    args = ["--base", root / "base", "--models", root / "sft1", "--method", "dare_task_arithmetic",
            "--p", 0.5, "--lam", 1, "--seed", 3]
    assert run(*args, "--out", tmp_path / "a") == 0
    assert run(*args, "--out", tmp_path / "b") == 0
    merged, t1 = loaded_state(tmp_path / "a"), tau(states, "sft1")
    masks = {}
    for key, value in merged.items():
        delta = value - states["base"][key]
        masks[key] = delta != 0
        torch.testing.assert_close(delta[masks[key]], 2 * t1[key][masks[key]], rtol=1e-5, atol=1e-6)
    kept = torch.cat([m.flatten() for m in masks.values()]).float().mean().item()
    assert 0.45 < kept < 0.55
    layer = "model.layers.0.self_attn"
    assert not torch.equal(masks[f"{layer}.q_proj.weight"], masks[f"{layer}.o_proj.weight"])  # same shape, own mask
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bf16_models_are_merged_in_float32_and_written_in_bf16(zoo, tmp_path):
    root, states = zoo
    half = {}
    for name in ("base", "sft1"):
        half[name] = {k: v.to(torch.bfloat16) for k, v in states[name].items()}
        model = tiny_llama().to(torch.bfloat16)
        model.load_state_dict(half[name])
        model.save_pretrained(tmp_path / name)
    out = tmp_path / "expo"
    assert run("--base", tmp_path / "base", "--models", tmp_path / "sft1", "--method", "expo", "--alpha", 1,
               "--out", out) == 0
    merged = loaded_state(out, dtype="auto")
    for key, value in merged.items():
        theta, theta0 = half["sft1"][key].float(), half["base"][key].float()
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, (theta + (theta - theta0)).to(torch.bfloat16)), key


@pytest.mark.slow
def test_sharded_base_gives_sharded_output_via_subprocess(zoo, tmp_path):
    """`python -m adamerge.model_dirs.cli` as a user runs it; the output has the base's shards and index."""
    root, states = zoo
    out = tmp_path / "merged"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "adamerge.model_dirs.cli", "--base", str(root / "base_sharded"),
                           "--models", str(root / "sft1"), str(root / "sft2"), "--method", "task_arithmetic",
                           "--lam", "0.3", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stderr
    base_index = json.loads((root / "base_sharded" / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    shards = sorted(set(base_index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in states["base"].values())
    t1, t2 = tau(states, "sft1"), tau(states, "sft2")
    assert_state(loaded_state(out), {k: v + 0.3 * (t1[k] + t2[k]) for k, v in states["base"].items()})


def write_dir(folder: Path, tensors: dict) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_any_directory_non_float_tensors_come_from_the_base(tmp_path):
    base = write_dir(tmp_path / "base", {"w": torch.zeros(3), "step": torch.tensor([7])})
    ft = write_dir(tmp_path / "ft", {"w": torch.ones(3), "step": torch.tensor([9])})
    (tmp_path / "base" / "notes.txt").write_text("kept")
    merge_model_dirs(base, [ft], "task_arithmetic", {"lam": 0.5}, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["w"], torch.full((3,), 0.5)) and torch.equal(merged["step"], torch.tensor([7]))
    assert (tmp_path / "out" / "notes.txt").read_text() == "kept"


def test_overflow_in_the_base_dtype_names_the_tensor(tmp_path):
    base = write_dir(tmp_path / "base", {"ok": torch.zeros(2, dtype=torch.float16),
                                         "big": torch.full((2,), 1000.0, dtype=torch.float16)})
    ft = write_dir(tmp_path / "ft", {"ok": torch.ones(2, dtype=torch.float16),
                                     "big": torch.full((2,), 60000.0, dtype=torch.float16)})
    with pytest.raises(ModelDirError, match=r"merged tensor big has inf/NaN entries in torch.float16"):
        merge_model_dirs(base, [ft], "expo", {"alpha": 1.0}, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_mismatched_model_is_refused_naming_tensors(zoo, tmp_path, capsys):
    root, _ = zoo
    assert run("--base", root / "base", "--models", root / "sft1", root / "wide", "--method", "task_arithmetic",
               "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"model directory {root / 'wide'}" in err
    assert "model.embed_tokens.weight (64, 48) vs (64, 32)" in err and "fine-tuned from --base" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_pickle_only_directory_is_refused(zoo, tmp_path, capsys):
    root, _ = zoo
    assert run("--base", root / "base", "--models", root / "pickled", "--method", "expo", "--alpha", 0.5,
               "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "never unpickles" in err and "safe_serialization=True" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_without_force_and_left_intact(zoo, tmp_path, capsys):
    root, states = zoo
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    args = ["--base", root / "base", "--models", root / "sft1", "--method", "expo", "--alpha", 0.5, "--out", out]
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "pass --force to replace it" in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"
    assert run(*args, "--force") == 0
    assert not (out / "mine.txt").exists() and (out / MERGE_CONFIG).is_file()
    assert leftovers(tmp_path) == []


def test_failure_half_way_leaves_no_output(zoo, tmp_path, monkeypatch):
    """The third shard fails to write: no output folder, no temporary folder; an existing output survives."""
    root, _ = zoo
    real_save, calls = merge_module.save_file, []

    def failing_save(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_save(tensors, path, **kwargs)

    monkeypatch.setattr(merge_module, "save_file", failing_save)
    inputs = dict(base=root / "base_sharded", models=[root / "sft1", root / "sft2"], method="task_arithmetic",
                  params={"lam": 0.3})
    with pytest.raises(OSError, match="disk full"):
        merge_model_dirs(out=tmp_path / "new", **inputs)
    assert len(calls) == 3 and not (tmp_path / "new").exists() and leftovers(tmp_path) == []

    calls.clear()
    old = tmp_path / "old"
    old.mkdir()
    (old / "mine.txt").write_text("precious")
    with pytest.raises(OSError, match="disk full"):
        merge_model_dirs(out=old, force=True, **inputs)
    assert sorted(p.name for p in old.iterdir()) == ["mine.txt"] and leftovers(tmp_path) == []


def test_argument_errors_are_explicit(zoo, tmp_path, capsys):
    root, _ = zoo
    base, out = ["--base", root / "base"], ["--out", tmp_path / "out"]
    with pytest.raises(SystemExit) as exit_info:
        run(*base, "--models", root / "sft1", "--method", "magic", *out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'magic'" in err and "'extrapolation_merging'" in err and "'dare_ties'" in err
    cases = [
        (["--models", root / "sft1", "--method", "extrapolation_merging"], "takes exactly 2 fine-tuned model(s)"),
        (["--models", root / "sft1", "--method", "expo", "--alpha", 1, "--lam", 2],
         "--lam does not apply to --method expo"),
        (["--models", root / "sft1", root / "sft2", "--method", "extrapolation_merging", "--set", "objective=val"],
         "objective='val' chooses by evaluating candidates"),
        (["--models", root / "sft1", "--method", "ties", "--set", "lam_grid=[0.1,0.2]"],
         "lam_grid=[0.1, 0.2] chooses by evaluating candidates"),
        (["--models", root / "sft1", "--method", "ties", "--set", "lam"], "expected KEY=VALUE"),
        (["--models", root / "sft1", "--method", "ties", "--keep", 0], "keep fraction must be in (0, 1]"),
        (["--models", root / "sft1", "--method", "dare_ties", "--p", 1], "drop rate method.p must be in [0, 1)"),
        (["--models", root / "sft1", "--method", "ties_mergekit", "--set", "trim_scope=vector"],
         "use it with trim_scope=tensor"),
        (["--models", root / "missing", "--method", "weight_averaging"], "model directory not found"),
    ]
    for args, message in cases:
        assert run(*base, *args, *out) == 1
        assert message in capsys.readouterr().err, message
    assert run(*base, "--models", root / "sft1", "--method", "expo", "--alpha", 1,
               "--out", root / "base", "--force") == 1
    assert "would replace input directory" in capsys.readouterr().err
    assert (root / "base" / "model.safetensors").is_file() and not (tmp_path / "out").exists()


def test_help_explains_every_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    from adamerge.runtime.config import CONF_DIR
    for name in ("weight_averaging", "task_arithmetic", "ties", "ties_mergekit", "expo", "extrapolation_merging",
                 "dare_task_arithmetic", "dare_ties", "dare_ties_mergekit", "dare_linear_mergekit"):
        assert f"\n  {name}\n" in text, name
        first_line = (CONF_DIR / "method" / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0][2:]
        assert first_line in text, name  # the YAML header is the help: one source of formulas
    for absent in ("adamerging_layerwise", "fisher", "regmean", "task_arithmetic_tuned", "expo_searched"):
        assert f"\n  {absent}\n" not in text, absent  # they need data or an evaluation
