"""Memory of the LLM search's candidates (adamerge/llm/candidates.py), measured on a synthetic bf16 Llama.

One process per setting: load the base as the live model, store θ₀, θ¹, θ² (``--store host|device``), build one
Extrapolation Merging candidate in place and run one forward pass. Reported: the live model's bytes, the stored
bytes, the peak resident memory (``VmHWM``; on a GPU also ``torch.cuda.max_memory_allocated``) and what the build
of a candidate adds beyond live + stored, in units of the largest parameter in float32 (the build is tensor by
tensor, so its temporaries scale with the largest tensor, not the model) — the numbers that scale a statement to
a 7–8B model. Uses the directories ``scripts/bench_llm_merge.py`` writes.

    .venv/bin/python scripts/bench_llm_memory.py --root /tmp/bench_llm_merge/llama_16x2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(root: Path, store: str) -> dict:
    import adamerge  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM

    from adamerge.llm.candidates import Candidates
    from adamerge.methods import ExtrapolationMerging

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype="auto").to(device)
    live = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters()) * 4
    after_model = rss_bytes()
    candidates = Candidates(model, root / "base", [root / "ft1", root / "ft2"], store=store)
    after_store = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    method = ExtrapolationMerging(None, objective=None, start={"alpha": 0.3, "beta": 0.6})
    candidates.set_merge(method, [1, 2])
    with torch.no_grad():
        model(torch.ones(1, 16, dtype=torch.long, device=device))
    out = {"store": store, "device": device.type, "parameters": sum(p.numel() for p in model.parameters()),
           "live_bytes": live, "stored_bytes": candidates.stored_bytes(), "largest_param_f32_bytes": largest,
           "rss_after_model": after_model, "rss_after_store": after_store, "peak_rss": hwm_bytes(),
           # stored host tensors are the checkpoint files' pages (safetensors maps them), resident once read
           "build_extra_in_largest_f32": round((hwm_bytes() - live - candidates.stored_bytes()) / largest, 2)}
    if device.type == "cuda":
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_llm_merge/llama_16x2048"))
    parser.add_argument("--store", choices=["host", "device"])
    args = parser.parse_args()
    if args.store:  # the child: one measurement, printed as JSON
        print(json.dumps(measure(args.root, args.store)))
        return
    rows = []
    for store in ("host", "device"):
        done = subprocess.run([sys.executable, __file__, "--root", str(args.root), "--store", store],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    out = ROOT / "results" / "bench_llm_merge" / "search_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
