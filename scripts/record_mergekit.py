"""Record mergekit's outputs on tiny Llama directories, for tests/test_mergekit_parity.py to replay.

mergekit 0.1.5 needs transformers 5 (adamerge pins 4.x), so it lives in its own venv and CI never installs it;
this script runs it once and stores inputs and outputs (a few hundred KB of synthetic bf16 tensors) in
``tests/data/mergekit_tiny_llama.safetensors`` with the mergekit configs in its metadata. Re-record with::

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 && \\
        /tmp/mkvenv/bin/pip install mergekit==0.1.5 -c <(echo torch==2.13.0)
    .venv/bin/python scripts/record_mergekit.py --mergekit /tmp/mkvenv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import adamerge  # noqa: F401  (repairs torchvision before transformers imports it)
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "mergekit_tiny_llama.safetensors"
MODELS = ("ft1", "ft2", "ft3")

# case → (mergekit config without paths, the adamerge-merge-models arguments that should equal it)
CASES = {
    "linear": ({"merge_method": "linear", "parameters": {"normalize": True}, "weights": [1.0, 1.0, 1.0]},
               ["--method", "weight_averaging"]),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "weights": [0.3, 0.3, 0.3]},
                        ["--method", "task_arithmetic", "--lam", "0.3"]),
    "ties": ({"merge_method": "ties", "parameters": {"normalize": True}, "weights": [1.0, 1.0, 1.0],
              "density": 0.2}, ["--method", "ties_mergekit", "--keep", "0.2"]),
    "ties_lambda": ({"merge_method": "ties", "parameters": {"normalize": True, "lambda": 0.7},
                     "weights": [1.0, 1.0, 1.0], "density": 0.35},
                    ["--method", "ties_mergekit", "--keep", "0.35", "--lam", "0.7"]),
    "dare_ties_dense": ({"merge_method": "dare_ties", "weights": [1.0, 1.0, 1.0], "density": 1.0},
                        ["--method", "dare_ties_mergekit", "--p", "0"]),
    "expo": ({"merge_method": "task_arithmetic", "weights": [1.5], "models": ["ft1"]},
             ["--method", "expo", "--alpha", "0.5"]),
}


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=False, torch_dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])


def make_inputs(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """θ₀ and three fine-tunes in bf16: τ of mixed scales, so that magnitudes tie and signs conflict."""
    torch.manual_seed(0)
    config = tiny_config()
    base = {k: v.to(torch.bfloat16) for k, v in LlamaForCausalLM(config).state_dict().items()}
    states = {"base": base}
    gen = torch.Generator().manual_seed(1)
    for name in MODELS:
        states[name] = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
                        for k, v in base.items()}
    for name, state in states.items():
        write_dir(root / name, state, config)
    return states


def write_dir(folder: Path, state: dict[str, torch.Tensor], config: LlamaConfig) -> None:
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def mergekit_yaml(case: dict, root: Path) -> str:
    names = case.get("models", list(MODELS))
    models = []
    for name, weight in zip(names, case["weights"]):
        params = {"weight": weight}
        if "density" in case:
            params["density"] = case["density"]
        models.append({"model": str(root / name), "parameters": params})
    config = {"merge_method": case["merge_method"], "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    if case["merge_method"] != "linear":
        config["base_model"] = str(root / "base")
    if "parameters" in case:
        config["parameters"] = case["parameters"]
    return json.dumps(config)  # YAML is a superset of JSON


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit", required=True, help="path of mergekit-yaml in mergekit's own venv")
    args = parser.parse_args()
    version = subprocess.run([str(Path(args.mergekit).parent / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                             capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory(prefix="mergekit_record_") as tmp:
        root = Path(tmp)
        states = make_inputs(root)
        tensors = {f"input/{name}/{k}": v for name, state in states.items() for k, v in state.items()}
        configs = {}
        for case, (spec, _) in CASES.items():
            text = mergekit_yaml(spec, root)
            (root / f"{case}.yml").write_text(text)
            subprocess.run([args.mergekit, str(root / f"{case}.yml"), str(root / f"out_{case}"), "--no-copy-tokenizer",
                            "--no-write-model-card", "--quiet", "-j", "1"], check=True)
            merged = {}
            for file in sorted((root / f"out_{case}").glob("*.safetensors")):
                merged.update(load_file(file))
            tensors.update({f"output/{case}/{k}": v for k, v in merged.items()})
            configs[case] = json.loads(text.replace(str(root), "ROOT"))
    meta = {"mergekit": version[0], "torch": version[1], "models": json.dumps(MODELS),
            "config": tiny_config().to_json_string(), "mergekit_configs": json.dumps(configs),
            "adamerge_arguments": json.dumps({c: a for c, (_, a) in CASES.items()})}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB, {len(CASES)} cases, mergekit {version[0]})")


if __name__ == "__main__":
    main()
