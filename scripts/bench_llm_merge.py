"""Merging LLM directories: adamerge-merge-models beside mergekit, wall time and peak resident memory.

A synthetic Llama in bf16 (random weights; base + 3 fine-tunes = base + noise; 1 GB shards) is written once;
then each tool merges it in its own process, interleaved (adamerge, mergekit, adamerge, mergekit), with the
same threads. Peak RSS is the child's ``VmHWM`` (its resident high-water mark since exec — what cgroups and SLURM
``--mem`` limit; ``ru_maxrss`` would also count the pages a fork inherits from this driver), polled from
``/proc/<pid>/status`` with its split into anonymous and file-backed memory. The last run's two outputs are
compared tensor by tensor (bf16 bits). Results: ``results/bench_llm_merge/<date>.{json,md}`` (a new name
``<date>-2`` … rather than overwriting an earlier run of the same day).

    .venv/bin/python scripts/bench_llm_merge.py --mergekit /tmp/mkvenv/bin/mergekit-yaml      # ≈ 1.0 B parameters
    .venv/bin/python scripts/bench_llm_merge.py --layers 2 --hidden 512 --repeats 1 --mergekit …  # a quick look

Equivalent configurations (tests/test_mergekit_parity.py pins that they give the same tensors):
task_arithmetic λ 0.3 ↔ mergekit task_arithmetic weight 0.3; ties_mergekit keep 0.2 ↔ mergekit ties density 0.2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("ft1", "ft2", "ft3")


def build(root: Path, layers: int, hidden: int, intermediate: int, vocab: int, shard: str) -> int:
    """Write base + 3 fine-tunes (bf16, sharded) unless present; return the parameter count."""
    import adamerge  # noqa: F401  (repairs torchvision before transformers)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128 or 1,
                         num_key_value_heads=max(1, hidden // 512), tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    count = sum(s.numel() for s in shapes.values())
    if all((root / n / "config.json").is_file() for n in ("base", *MODELS)):
        return count
    gen = torch.Generator().manual_seed(0)
    for name in ("base", *MODELS):
        print(f"writing {name} ({count / 1e9:.2f} B parameters)", flush=True)
        gen.manual_seed(0)
        base = {k: (0.02 * torch.randn(s, generator=gen)).to(torch.bfloat16) for k, s in shapes.items()}
        if name != "base":
            noise = torch.Generator().manual_seed(hash(name) % 2**31)
            base = {k: (v.float() + 0.002 * torch.randn(v.shape, generator=noise)).to(torch.bfloat16)
                    for k, v in base.items()}
        _save_sharded(root / name, base, config, shard)
        del base
    return count


def _save_sharded(folder: Path, state: dict, config, shard: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    split = split_torch_state_dict_into_shards(state, max_shard_size=shard)
    for file, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / file), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def measure(command: list[str], env: dict) -> dict:
    """Run ``command``; its wall time, peak RSS (VmHWM) and peak anonymous / file-backed RSS (polled)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, status, _ = os.wait4(proc.pid, 0)
    stop.set()
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    if status != 0:
        raise RuntimeError(f"{command[0]} failed ({status}):\n{stderr[-3000:]}")
    gib = 1024 ** 2
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peaks["VmHWM"] / gib, 2),
            "peak_anon_gib": round(peaks["RssAnon"] / gib, 2), "peak_file_gib": round(peaks["RssFile"] / gib, 2)}


def compare_outputs(ours: Path, theirs: Path) -> dict:
    """How many tensors and entries of the two merged directories differ (exact bits)."""
    import torch

    from adamerge.model_dirs import ModelDir

    a, b = ModelDir(ours), ModelDir(theirs)
    if a.weight_map.keys() != b.weight_map.keys():
        return {"same_keys": False, "only_adamerge": sorted(a.weight_map.keys() - b.weight_map.keys())[:5],
                "only_mergekit": sorted(b.weight_map.keys() - a.weight_map.keys())[:5]}
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    differing = entries = total = 0
    worst = 0.0
    for key in sorted(a.weight_map):
        x, y = a.tensor(key), b.tensor(key)
        total += x.numel()
        if x.dtype != y.dtype or x.shape != y.shape:
            differing += 1
            entries += x.numel()
            continue
        diff = int((x.view(bits[x.element_size()]) != y.view(bits[y.element_size()])).sum())
        if diff:
            differing += 1
            entries += diff
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return {"same_keys": True, "tensors": len(a.weight_map), "entries": total, "tensors_differing": differing,
            "entries_differing": entries, "max_abs_diff": worst}


def mergekit_config(root: Path, method: str) -> str:
    params = {"weight": 0.3} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
    config = {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(root / m), "parameters": params} for m in MODELS]}
    if method == "ties":
        config["parameters"] = {"normalize": True}
    path = root / f"mergekit_{method}.yml"
    path.write_text(json.dumps(config))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit", help="mergekit-yaml of mergekit's own venv (omit: adamerge only)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_llm_merge"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard", default="1GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    args = parser.parse_args()

    root = args.root / f"llama_{args.layers}x{args.hidden}"
    count = build(root, args.layers, args.hidden, args.intermediate, args.vocab, args.shard)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    adamerge_bin = str(Path(sys.executable).parent / "adamerge-merge-models")
    ours = {"task_arithmetic": ["--method", "task_arithmetic", "--lam", "0.3"],
            "ties": ["--method", "ties_mergekit", "--keep", "0.2"]}
    rows, comparisons = [], {}
    for method in args.methods:
        for repeat in range(args.repeats):
            for tool in ("adamerge", "mergekit") if args.mergekit else ("adamerge",):
                out = root / f"out_{tool}_{method}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                if tool == "adamerge":
                    command = [adamerge_bin, "--base", str(root / "base"), "--models", *[str(root / m) for m in MODELS],
                               *ours[method], "--out", str(out)]
                else:
                    command = [args.mergekit, mergekit_config(root, method), str(out), "--no-copy-tokenizer",
                               "--no-write-model-card", "--quiet", "-j", str(args.threads)]
                result = measure(command, env)
                rows.append({"tool": tool, "method": method, "repeat": repeat + 1, **result})
                print(json.dumps(rows[-1]), flush=True)
                if repeat + 1 < args.repeats or not args.mergekit:
                    subprocess.run(["rm", "-rf", str(out)], check=True)
        if args.mergekit:  # the last pair's outputs: the same tensors?
            outs = [root / f"out_{tool}_{method}" for tool in ("adamerge", "mergekit")]
            comparisons[method] = compare_outputs(*outs)
            print(method, json.dumps(comparisons[method]), flush=True)
            for out in outs:
                subprocess.run(["rm", "-rf", str(out)], check=True)

    day = dt.date.today().isoformat()
    folder = ROOT / "results" / "bench_llm_merge"
    folder.mkdir(parents=True, exist_ok=True)
    stamp, n = day, 1
    while (folder / f"{stamp}.json").exists():
        n += 1
        stamp = f"{day}-{n}"
    record = {"date": day, "name": stamp, "parameters": count, "layers": args.layers, "hidden": args.hidden,
              "intermediate": args.intermediate, "vocab": args.vocab, "shard": args.shard, "threads": args.threads,
              "dtype": "bfloat16", "models": 1 + len(MODELS), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "rows": rows, "outputs_compared": comparisons}
    (folder / f"{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Merging a synthetic {count / 1e9:.2f} B-parameter Llama (bf16, base + 3, {args.shard} shards, "
             f"{args.threads} threads, {stamp})", "",
             "Each run in its own process, interleaved, warm page cache. Peak RSS: `VmHWM`; anonymous / "
             "file-backed: polled peaks from `/proc/<pid>/status`.", "",
             "| tool | method | run | wall s | peak RSS GiB | anonymous GiB | file-backed GiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = {"task_arithmetic": "task arithmetic", "ties": "TIES (mergekit rule)"}[r["method"]]
        lines.append(f"| {r['tool']} | {name} | {r['repeat']} | {r['wall_s']} | {r['peak_rss_gib']} | "
                     f"{r['peak_anon_gib']} | {r['peak_file_gib']} |")
    for method, c in comparisons.items():
        if c.get("same_keys"):
            lines.append(f"\n{method}: the last pair's outputs differ in {c['tensors_differing']} of {c['tensors']} tensors, "
                         f"{c['entries_differing']} of {c['entries']} entries (max |Δ| {c['max_abs_diff']:g}).")
        else:
            lines.append(f"\n{method}: the outputs name different tensors: {c}")
    (folder / f"{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / stamp}.{{json,md}}")


if __name__ == "__main__":
    main()
