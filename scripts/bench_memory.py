"""Memory of merging at real scale (issue #5): results/memory.{md,json}.

Two measurements, each configuration in its own process:

* **build** — host memory of turning θ₀, θ₁..θ_K into what a method needs: AdaMerging's stacked task
  vectors (plain and TIES-trimmed for "++", float32 and bfloat16) and the TIES merged vector. *Now*: built
  tensor by tensor (``StackedTaskVectors.from_state_dicts``, ``ties_vector``); *before*: every task vector
  materialised, TIES on the flattened [K, P] matrix (the definition, and this project until 2026-11-21),
  re-implemented here so both run in the same session.
* **step** — peak memory of AdaMerging steps in the ViT-L/14 preset's configuration
  (``experiment=paper/vit_l14_8tasks``: layer-wise, bf16-mixed, bf16 task vectors, per-task passes,
  8 tasks × 2 batches × 16 images, the official protocol; ``--batches-per-task 1`` for FusionBench's). On a GPU: ``torch.cuda.max_memory_allocated`` (everything on the device: θ₀,
  vectors, tower, activations); the target is 24 GB. On a CPU: the process's peak RSS, an upper bound
  for the same tensors (it also holds the Python runtime, the images and allocator slack).

    python scripts/bench_memory.py --steps 1                # ViT-B/32 build before/now, ViT-L/14 build + step
    python scripts/bench_memory.py --skip-step              # build only (minutes)

Random weights (memory does not depend on them); fine-tuned models are θ₀ plus noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FIXTURES, _env, random_tasks, reset_peak_rss, rss_mb  # noqa: E402

BUILDS = [  # (name, what it builds, implementation)
    ("adamerging", "stacked task vectors, float32", "now"),
    ("adamerging", "stacked task vectors, float32", "before"),
    ("adamerging_bf16", "stacked task vectors, bfloat16", "now"),
    ("adamerging_bf16", "stacked task vectors, bfloat16", "before"),
    ("adamerging_plus", "TIES-trimmed stacked vectors (++), float32", "now"),
    ("adamerging_plus", "TIES-trimmed stacked vectors (++), float32", "before"),
    ("ties", "TIES merged vector (top 20 %, mean)", "now"),
    ("ties", "TIES merged vector (top 20 %, mean)", "before"),
]
GIB = 2**30


# ---------------------------------------------------------------- workers (own process each)

def _checkpoints(fixture: str, tasks: int):
    import torch

    from adamerge.models.backbone import load_open_clip

    torch.manual_seed(0)
    visual = load_open_clip(FIXTURES[fixture]).visual
    theta0 = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    del visual
    gen = torch.Generator().manual_seed(1)
    finetuned = [{k: (v + 0.01 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
                  for k, v in theta0.items()} for _ in range(tasks)]
    return theta0, finetuned


def _before(op: str, theta0, finetuned):
    """The materialise-everything path: K float32 task vectors, TIES on the flattened [K, P] matrix."""
    import torch

    from adamerge.merging import StackedTaskVectors, task_vector
    from adamerge.merging.ties import agreeing, elect_sign, flatten, trim_top_k, unflatten

    vectors = [task_vector(ft, theta0) for ft in finetuned]
    if op in ("adamerging", "adamerging_bf16"):
        return StackedTaskVectors(theta0, vectors, dtype=torch.bfloat16 if op.endswith("bf16") else None)
    flat, keys, shapes = flatten(vectors)
    trimmed = trim_top_k(flat, 0.2)
    mask = agreeing(trimmed, elect_sign(trimmed))
    if op == "adamerging_plus":
        return StackedTaskVectors(theta0, [unflatten(row, keys, shapes) for row in trimmed * mask])
    return unflatten((trimmed * mask).sum(0) / mask.sum(0).clamp(min=1), keys, shapes)


def _now(op: str, theta0, finetuned):
    import torch

    from adamerge.merging import StackedTaskVectors, ties_vector
    from adamerge.merging.task_vectors import TaskVectorView

    if op == "ties":
        return ties_vector([TaskVectorView(ft, theta0) for ft in finetuned], keep=0.2, merge="mean")
    return StackedTaskVectors.from_state_dicts(theta0, finetuned, ties_keep=0.2 if op == "adamerging_plus" else None,
                                               dtype=torch.bfloat16 if op.endswith("bf16") else None)


def build_worker(spec: dict) -> dict:
    theta0, finetuned = _checkpoints(spec["fixture"], spec["tasks"])
    reset_peak_rss()
    start = rss_mb()
    t0 = time.perf_counter()
    result = (_now if spec["impl"] == "now" else _before)(spec["op"], theta0, finetuned)
    seconds = time.perf_counter() - t0
    peak = rss_mb("VmHWM")
    reset_peak_rss()  # hands freed heap back to the OS first: RSS then counts only what the result holds
    held = rss_mb()
    del result
    return {"checkpoints_mb": start, "peak_mb": peak, "peak_over_checkpoints_mb": peak - start,
            "result_mb": held - start, "seconds": seconds}


def step_worker(spec: dict) -> dict:
    """AdaMerging steps as the ViT-L/14 preset runs them; peak memory from the first step on."""
    import functools

    import lightning as L
    import torch

    from adamerge.adaptation.datamodule import UnlabelledTasksDataModule
    from adamerge.adaptation.module import AdaMergingModule
    from adamerge.adaptation.spec import CoefficientSpec
    from adamerge.merging import StackedTaskVectors
    from adamerge.merging.task_vectors import mergeable_keys
    from adamerge.models.backbone import load_open_clip

    cuda = spec["device"] == "cuda"
    baseline = rss_mb()
    torch.manual_seed(0)
    backbone = load_open_clip(FIXTURES[spec["fixture"]])
    theta0 = backbone.visual.state_dict()
    names = [f"task{i}" for i in range(spec["tasks"])]
    gen = torch.Generator().manual_seed(1)
    # the vectors straight from noise, tensor by tensor: no K fine-tuned copies in host memory (24 GB here)
    stacks = ((k, 0.01 * torch.randn(len(names), *theta0[k].shape, generator=gen)) for k in mergeable_keys(theta0))
    stacked = StackedTaskVectors(theta0, None, names, dtype=spec["vector_dtype"], stacks=stacks)
    del theta0
    tasks, heads = random_tasks(backbone, names, spec["batch_size"] * spec.get("batches_per_task", 1), gen)
    vectors_mb = stacked.nbytes() / 2**20
    # freed pages not kept (no keep_freed_host_memory): a CPU's figure stands in for a GPU's
    module = AdaMergingModule(backbone.visual, stacked, heads, functools.partial(torch.optim.Adam, lr=1e-3),
                              CoefficientSpec(tuple(names), tuple(stacked.keys), "layer", 0.3, (0.0, 1.0)),
                              forward_mode=spec["forward_mode"])
    data = UnlabelledTasksDataModule(tasks, spec["batch_size"], spec.get("batches_per_task", 1), "test", seed=0)
    times: list[float] = []

    class Peak(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                reset_peak_rss()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer = L.Trainer(max_steps=spec["steps"], accelerator="gpu" if cuda else "cpu", devices=1,
                        precision=spec["precision"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Peak()])
    trainer.fit(module, datamodule=data)
    out = {"step_s": times, "vectors_mb": vectors_mb, "baseline_rss_mb": baseline, "peak_rss_mb": rss_mb("VmHWM")}
    if cuda:
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    return (build_worker if spec["kind"] == "build" else step_worker)(spec)


# ---------------------------------------------------------------- orchestration and output

def isolated(spec: dict, log, isolate: bool = True) -> dict:
    """One configuration in its own process (its peak RSS is its own); ``{"failed": why}`` if it dies."""
    if not isolate:
        return run_worker(spec)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out", out.name]
        done = subprocess.run(cmd, env=_env(spec["threads"]), cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            why = "killed (out of memory)" if done.returncode == -9 else f"failed (exit {done.returncode})"
            log(f"{spec}: {why}\n{done.stderr[-3000:]}")
            return {"failed": why}
        return json.loads(Path(out.name).read_text())


def _images(row: dict) -> str:
    return f"{row.get('batches_per_task', 1)} × {row['batch_size']}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Memory at real scale (issue #5)", "", f"- Date: {report['date']}", f"- Command: `{report['command']}`",
             f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f"; torch {m['torch']}",
             f"- K = {report['tasks']} tasks; random weights, fine-tuned = θ₀ + noise", ""]
    if report["builds"]:
        lines += ["## Building what the method needs (host memory, GB)", "",
                  "*checkpoints*: θ₀ and θ₁..θ_K loaded; *peak over*: the build's peak above that; *result*: "
                  "what it leaves behind. **before**: every task vector materialised, TIES on the flattened "
                  "[K, P] matrix; **now**: tensor by tensor.", "",
                  "| backbone | builds | impl | checkpoints GB | peak over GB | result GB | ratio now/before | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["builds"]:
            res = r["result"]
            if "failed" in res:
                lines.append(f"| {r['fixture']} | {r['what']} | {r['impl']} | — | {res['failed']} | — | — | — |")
                continue
            ratio = r.get("ratio")
            lines.append(f"| {r['fixture']} | {r['what']} | {r['impl']} | {res['checkpoints_mb'] / 1024:.2f} | "
                         f"{res['peak_over_checkpoints_mb'] / 1024:.2f} | {res['result_mb'] / 1024:.2f} | "
                         f"{'' if ratio is None else f'**{ratio:.2f}**'} | {res['seconds']:.1f} |")
    if report["steps"]:
        lines += ["", "## AdaMerging steps in the ViT-L/14 preset's configuration", "",
                  "| backbone | device | precision | vectors | forward | images/task | task vectors GB | "
                  "peak GB | s/step |", "|---|---|---|---|---|---|---|---|---|"]
        for r in report["steps"]:
            res = r["result"]
            if "failed" in res:
                lines.append(f"| {r['fixture']} | {r['device']} | {r['precision']} | {r['vector_dtype']} | "
                             f"{r['forward_mode']} | {_images(r)} | — | {res['failed']} | — |")
                continue
            peak = (f"{res['peak_cuda_mb'] / 1024:.1f} (CUDA max allocated)" if "peak_cuda_mb" in res else
                    f"{res['peak_rss_mb'] / 1024:.1f} (process peak RSS; "
                    f"{(res['peak_rss_mb'] - res['baseline_rss_mb']) / 1024:.1f} above the bare runtime)")
            steps = ", ".join(f"{s:.0f}" for s in res["step_s"])
            lines.append(f"| {r['fixture']} | {r['device']} | {r['precision']} | {r['vector_dtype']} | "
                         f"{r['forward_mode']} | {_images(r)} | {res['vectors_mb'] / 1024:.2f} | {peak} | "
                         f"{steps} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-fixtures", nargs="*", default=["vit-b-32", "vit-l-14"], choices=list(FIXTURES))
    parser.add_argument("--before-fixtures", nargs="*", default=["vit-b-32"], choices=list(FIXTURES),
                        help="also run the materialise-everything path (ViT-L/14's needs more than 24 GB of RAM)")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--step-fixture", default="vit-l-14", choices=list(FIXTURES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches-per-task", type=int, default=2,
                        help="per step and task (2: the official protocol, the preset's default; 1: FusionBench's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--notes", type=Path, help="Markdown appended to memory.md")
    parser.add_argument("--in-process", action="store_true", help="no process per configuration (tests; peaks mixed)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import adamerge  # noqa: F401  (repairs torchvision before open_clip is imported)

        Path(args.worker_out).write_text(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    import torch

    from bench import machine

    report = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join(["python", "scripts/bench_memory.py", *(argv or sys.argv[1:])]),
              "machine": machine(), "tasks": args.tasks, "builds": [], "steps": []}
    notes = args.notes.read_text() if args.notes else ""

    def save():
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "memory.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out_dir / "memory.md").write_text(markdown(report) + ("\n" + notes if notes else ""))

    for fixture in args.build_fixtures:
        now = {}
        for op, what, impl in BUILDS:
            if impl == "before" and fixture not in args.before_fixtures:
                continue
            print(f"[build {fixture}] {what} ({impl}) …", flush=True)
            res = isolated(dict(kind="build", fixture=fixture, tasks=args.tasks, op=op, impl=impl,
                                threads=args.threads), print, not args.in_process)
            row = dict(fixture=fixture, op=op, what=what, impl=impl, result=res)
            if impl == "now":
                now[op] = res
            elif "failed" not in res and "failed" not in now.get(op, {"failed": 1}):
                row["ratio"] = now[op]["peak_over_checkpoints_mb"] / res["peak_over_checkpoints_mb"]
            report["builds"].append(row)
            save()
    if not args.skip_step:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        spec = dict(kind="step", fixture=args.step_fixture, tasks=args.tasks, batch_size=args.batch_size,
                    batches_per_task=args.batches_per_task,
                    precision="bf16-mixed", vector_dtype="bfloat16", forward_mode="per_task", steps=args.steps,
                    device=device, threads=args.threads)
        print(f"[step {args.step_fixture} {device}] …", flush=True)
        report["steps"].append(dict(spec, result=isolated(spec, print, not args.in_process)))
        save()
    print(f"wrote {args.out_dir / 'memory.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
