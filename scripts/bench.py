"""Benchmark: AdaMerging step time and peak memory, TA/TIES merge time and evaluation throughput,
side by side with FusionBench 0.2.33 in the same run (issue #5).

    python scripts/bench.py                                    # full run → results/bench.md, results/bench.json
    python scripts/bench.py --quick --no-fusionbench           # smoke run of adamerge's half
    python scripts/bench.py --fusionbench-python /work/fb-venv/bin/python --fixtures tiny --threads 1 2

Fixtures: ``tiny`` (open_clip ``adamerge-bench-tiny``: image 32, patch 8, width 64, 2 layers, quick-GELU —
the shape of FusionBench's tiny HF CLIP) and ``vit-b-32`` (``open_clip.create_model('ViT-B-32')``), both with
random weights (speed does not depend on them), K = 8 tasks, 16 images per task and step.

adamerge's step is timed as users run it: ``AdaMergingModule`` over ``StackedTaskVectors`` in a Lightning
``Trainer.fit`` fed by ``UnlabelledTasksDataModule`` on pre-decoded tensors; one step = re-merge + forward of
all tasks + backward + Adam (a callback times ``training_step``). FusionBench runs in its own environment
(``scripts/bench_fusionbench_driver.py``); its step includes its per-sample data loading, which is reported
apart, and the headline ratio compares compute with compute (its step minus its data time). Every
configuration runs in its own process, so that peak memory (peak RSS of the loop minus RSS when the loop
starts; ``torch.cuda.max_memory_allocated`` on GPU) is that configuration's alone. Figures are medians over
the steps after warm-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = {"tiny": "adamerge-bench-tiny", "vit-b-32": "ViT-B-32", "vit-l-14": "ViT-L-14"}
GPU_ONLY = {"vit-l-14"}  # the GPU rows; by default run only when CUDA is available
NUM_CLASSES = 10
# (label, granularity, forward_mode); FusionBench has one forward mode (per task, graphs kept until the step ends)
ADAMERGING = [("layer-wise", "layer", "concat"), ("layer-wise", "layer", "per_task"),
              ("task-wise", "task", "concat"), ("task-wise", "task", "per_task")]
# --host-memory-ablation: the step as it was before freed host memory was kept (runtime/host_memory.py)
ABLATION = ("layer-wise", "layer", "concat, pages returned")
FB_METHOD = {"layer-wise": "layer_wise", "task-wise": "task_wise"}


# ---------------------------------------------------------------- settings of a run

def plan(quick: bool, fixture: str, device: str = "cpu") -> dict:
    """Steps, repeats and evaluation sizes: ViT-B/32 on a CPU costs seconds per step, so fewer of them."""
    if quick:
        return dict(warmup=1, steps=3, merge_repeats=2, eval_images=32, eval_repeats=2)
    if device == "cuda":  # milliseconds per step: enough of them for a stable median
        return dict(warmup=10, steps=50, merge_repeats=5, eval_images=2048, eval_repeats=5)
    if fixture == "tiny":
        return dict(warmup=3, steps=20, merge_repeats=5, eval_images=512, eval_repeats=5)
    # ViT-B/32: ~1.7 TFLOP per step (128 images, forward + backward), tens of seconds on one shared core
    return dict(warmup=1, steps=3, merge_repeats=2, eval_images=16, eval_repeats=2)


# ---------------------------------------------------------------- memory

def rss_mb(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Return freed heap pages to the OS (else the loop silently reuses them and its RSS delta reads ~0),
    then reset VmHWM to the current RSS (Linux ≥ 4.0), so the next peak is this section's."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---------------------------------------------------------------- adamerge side (runs in a worker process)

def build_world(fixture: str, num_tasks: int, images_per_task: int, seed: int = 0):
    """Random-weight backbone, K perturbed vision towers, pre-decoded random images and random heads."""
    import torch

    from adamerge.models.backbone import load_open_clip

    torch.manual_seed(seed)
    backbone = load_open_clip(FIXTURES[fixture])
    visual = backbone.visual
    theta0 = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    finetuned = [{k: (v + 0.01 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
                  for k, v in theta0.items()} for _ in range(num_tasks)]
    tasks, heads = random_tasks(backbone, [f"task{i}" for i in range(num_tasks)], images_per_task, gen)
    return backbone, theta0, finetuned, tasks, heads


def random_tasks(backbone, names: list[str], images_per_task: int, gen):
    """Pre-decoded random images and random unit heads at CLIP's logit scale, one task per name."""
    import torch

    from adamerge.data.task import Task, TensorImages

    size, dim = backbone.image_size, int(backbone.visual.output_dim)
    tasks, heads = [], {}
    for name in names:
        images = torch.randn(images_per_task, 3, size, size, generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (images_per_task,), generator=gen)
        tasks.append(Task(name, [str(c) for c in range(NUM_CLASSES)], ["{}"], {"test": TensorImages(images, labels)}))
        heads[name] = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, dim, generator=gen), dim=-1) * 100.0
    return tasks, heads


def adamerging_worker(spec: dict) -> dict:
    """Time ``steps`` AdaMerging steps after ``warmup`` in a Lightning fit, as the AdaMerging method runs it."""
    import lightning as L
    import torch

    from adamerge.adaptation.datamodule import UnlabelledTasksDataModule
    from adamerge.adaptation.module import AdaMergingModule
    from adamerge.adaptation.spec import CoefficientSpec
    from adamerge.runtime.host_memory import keep_freed_host_memory_on
    from adamerge.merging import StackedTaskVectors

    cuda = spec["device"] == "cuda"
    backbone, theta0, finetuned, tasks, heads = build_world(spec["fixture"], spec["tasks"], 4 * spec["batch_size"])
    names = [t.name for t in tasks]
    stacked = StackedTaskVectors.from_state_dicts(theta0, finetuned, names)
    del finetuned
    module = AdaMergingModule(backbone.visual, stacked, heads, functools.partial(torch.optim.Adam, lr=1e-3),
                              CoefficientSpec(tuple(names), tuple(stacked.keys), spec["granularity"], 0.3,
                                              None),  # FusionBench: no clamp
                              forward_mode=spec["forward_mode"])
    if spec.get("reuse_host_memory", True):  # process-wide, as an `adamerge` run sets it (each spec runs alone)
        keep_freed_host_memory_on(spec["device"])
    data = UnlabelledTasksDataModule(tasks, spec["batch_size"], 1, "test", seed=0)
    timer = make_step_timer(cuda, profile_steps=spec.get("profile_steps", 0), start=spec["warmup"] + spec["steps"])
    profile_steps = spec.get("profile_steps", 0)  # profiled after the timed steps, never among them
    trainer = L.Trainer(max_steps=spec["warmup"] + spec["steps"] + profile_steps, accelerator="gpu" if cuda else "cpu", devices=1,
                        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        log_every_n_steps=10, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    out = {"step_s": timer.times[spec["warmup"]:spec["warmup"] + spec["steps"]], "warmup_s": timer.times[:spec["warmup"]],
           "peak_rss_delta_mb": timer.peak_mb}
    if cuda:
        out["peak_cuda_mb"] = timer.peak_cuda_mb
    if timer.profile_table:
        out["profile"] = timer.profile_table
    return out


def _step_timer_class():
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        """Wall time of every ``training_step`` (merge, forward, backward, Adam); peak memory of the loop."""

        def __init__(self, cuda: bool, profile_steps: int = 0, start: int = 0):
            self.cuda, self.times, self.profile_steps, self.start = cuda, [], profile_steps, start
            self.peak_mb = self.peak_cuda_mb = None
            self.profile_table, self._prof = None, None

        def _sync(self):
            if self.cuda:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:  # the loop starts here: its peak memory is measured from now on
                reset_peak_rss()
                self._start_mb = rss_mb()
                if self.cuda:
                    self._start_cuda = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
            if self.profile_steps and batch_idx == self.start:  # after the timed steps
                self._prof = torch.profiler.profile(record_shapes=False)
                self._prof.__enter__()
            self._sync()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._sync()
            elapsed = time.perf_counter() - self._t0
            if self._prof is None:  # profiled steps count for neither time nor memory
                self.times.append(elapsed)
                self.peak_mb = rss_mb("VmHWM") - self._start_mb
                if self.cuda:
                    self.peak_cuda_mb = (torch.cuda.max_memory_allocated() - self._start_cuda) / 2**20
            elif batch_idx == self.start + self.profile_steps - 1:
                self._prof.__exit__(None, None, None)
                self.profile_table = self._prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
                self._prof = None

    return StepTimer


def make_step_timer(*args, **kwargs):  # built lazily: lightning is imported only where steps run
    return _step_timer_class()(*args, **kwargs)


def merges_eval_worker(spec: dict) -> dict:
    """TA (λ=0.3) and TIES (top 20 %, sum as FusionBench, λ=0.3) from θ₀ and θ₁..θ_K into the tower; eval images/s."""
    import torch

    from adamerge.runtime.host_memory import keep_freed_host_memory_on
    from adamerge.data.task import TensorImages
    from adamerge.evaluation.accuracy import dataset_accuracy
    from adamerge.merging import task_arithmetic, ties_merge
    from adamerge.merging.task_vectors import TaskVectorView  # τₖ per tensor on access, as the methods use them

    device = spec["device"]
    keep_freed_host_memory_on(device, spec.get("reuse_host_memory", True))  # as an `adamerge` run does
    backbone, theta0, finetuned, tasks, heads = build_world(spec["fixture"], spec["tasks"], spec["eval_images"])
    visual = backbone.visual.to(device)
    if device == "cuda":
        theta0 = {k: v.to(device) for k, v in theta0.items()}
        finetuned = [{k: v.to(device) for k, v in ft.items()} for ft in finetuned]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    merges = {"task_arithmetic": lambda vs: task_arithmetic(theta0, vs, 0.3),
              "ties": lambda vs: ties_merge(theta0, vs, keep=0.2, lam=0.3, merge="sum")}
    out = {"merge_s": {}}
    merged = None
    for name, merge in merges.items():
        times = []
        for _ in range(spec["merge_repeats"] + 1):  # the first is warm-up
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                merged = merge([TaskVectorView(ft, theta0) for ft in finetuned])
                visual.load_state_dict(merged)  # as FusionBench: the result lands in the model
            sync()
            times.append(time.perf_counter() - start)
        out["merge_s"][name] = times[1:]
    # evaluation: the merged tower (its own weights now) with every task's head, batches of 256 as the CLI
    images = sum(len(t.split("test")) for t in tasks)
    rates = []
    for _ in range(spec["eval_repeats"] + 1):
        sync()
        start = time.perf_counter()
        for task in tasks:
            data = task.split("test")
            assert isinstance(data, TensorImages)
            dataset_accuracy(visual, heads[task.name], data, batch_size=256, device=device)
        sync()
        rates.append(images / (time.perf_counter() - start))
    out["eval_images_per_s"] = rates[1:]
    out["eval_images"] = images
    return out


def run_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind == "adamerging":
        return adamerging_worker(spec)
    if kind == "merges_eval":
        return merges_eval_worker(spec)
    raise ValueError(f"unknown worker kind {kind!r}")


# ---------------------------------------------------------------- orchestration

def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")


def ours(spec: dict, isolate: bool, log) -> dict:
    """One adamerge configuration, in its own process (or in this one for a quick smoke run)."""
    if not isolate:
        return run_worker(spec)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out", out.name]
        done = subprocess.run(cmd, env=_env(spec["threads"]), cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"adamerge worker {spec} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def theirs(python: str, args: list[str], workdir: Path, threads: int, log, why: list | None = None) -> dict | None:
    """One FusionBench configuration through the driver in its venv; None (and a logged reason, also appended to
    ``why``) if it fails."""
    out = workdir / f"result-{time.time_ns()}.json"
    cmd = [python, str(ROOT / "scripts" / "bench_fusionbench_driver.py"), *args, "--threads", str(threads),
           "--workdir", str(workdir), "--out", str(out)]
    # cwd=workdir: FusionBench caches zero-shot heads under ./outputs of the directory it starts in
    done = subprocess.run(cmd, env=_env(threads), cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        reason = "killed (out of memory)" if done.returncode == -9 else f"failed (exit {done.returncode})"
        if why is not None:
            why.append(reason)
        log(f"FusionBench driver {reason} ({shlex.join(cmd)}):\n{done.stderr[-3000:]}")
        return None
    return json.loads(out.read_text())


def summary(values: list[float] | None) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") *
                                                                    os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def benchmark(args, log=print, checkpoint=lambda report: None) -> dict:
    """Both sides, configuration by configuration; ``checkpoint(report)`` after each, so a long run leaves
    partial tables behind."""
    import torch

    import adamerge  # noqa: F401  (repairs torchvision before open_clip is imported in workers)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    fb_python = None if args.no_fusionbench else args.fusionbench_python
    if fb_python and not Path(fb_python).exists():
        raise FileNotFoundError(f"FusionBench's python {fb_python} does not exist: install it in its own venv "
                                f"(see results/bench.md) or pass --fusionbench-python PATH, or --no-fusionbench")
    isolate = not args.in_process
    workdir = Path(tempfile.mkdtemp(prefix="adamerge-bench-"))
    report = {"command": shlex.join([sys.executable, *sys.argv]) if args.command is None else args.command,
              "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
              "quick": args.quick, "tasks": args.tasks, "batch_size": args.batch_size, "steps": [], "merges": [],
              "eval": [], "fusionbench": None, "profiles": {}, "complete": False}
    for fixture in args.fixtures:
        if fb_python:
            theirs(fb_python, ["--fixture", fixture, "--method", "build", "--tasks", str(args.tasks)], workdir, 1, log)
        for device in devices:
            if fixture in GPU_ONLY and device == "cpu":
                log(f"[{fixture}] no CPU rows: minutes per step on a CPU (GPU rows only)")
                continue
            p = plan(args.quick, fixture, device)
            for threads in ([1] if device == "cuda" else args.threads):
                base = dict(fixture=fixture, threads=threads, device=device, tasks=args.tasks,
                            batch_size=args.batch_size)
                fb_steps = {}
                rows = [] if args.skip_steps else ADAMERGING + ([ABLATION] if args.host_memory_ablation
                                                                and device == "cpu" else [])
                for label, gran, mode in rows:
                    # FusionBench first, then ours, per method: both see the same stretch of machine load
                    fb_method = FB_METHOD[label]
                    if fb_python and fb_method not in fb_steps:
                        log(f"[{fixture} {device} ×{threads}] FusionBench {label} …")
                        fb_steps[fb_method] = theirs(fb_python, [
                            "--fixture", fixture, "--method", fb_method, "--tasks", str(args.tasks),
                            "--batch-size", str(args.batch_size), "--steps", str(p["warmup"] + p["steps"]),
                            "--device", device], workdir, threads, log)
                        if fb_steps[fb_method] and not report["fusionbench"]:
                            report["fusionbench"] = {k: fb_steps[fb_method].get(k) for k in
                                                     ("fusion_bench", "torch", "transformers")}
                    log(f"[{fixture} {device} ×{threads}] adamerge {label} {mode} …")
                    profile = args.profile and threads == 1 and (label, mode) == ("layer-wise", "concat")
                    forward_mode = mode.split(",")[0]  # "concat, pages returned": the ablation row
                    spec = dict(base, kind="adamerging", granularity=gran, forward_mode=forward_mode,
                                reuse_host_memory=mode == forward_mode, warmup=p["warmup"],
                                steps=p["steps"], profile_steps=2 if profile else 0)
                    res = ours(spec, isolate, log)
                    if res.get("profile"):
                        report["profiles"][f"{fixture} {label} {mode} {device} ×{threads}"] = res.pop("profile")
                    fb = fb_steps.get(fb_method)
                    warm = p["warmup"]
                    row = dict(base, method=label, forward_mode=mode, ours_step_s=summary(res["step_s"]),
                               ours_peak_mb=res.get("peak_cuda_mb") if device == "cuda" else res["peak_rss_delta_mb"],
                               fb_step_s=summary(fb["step_s"][warm:]) if fb else None,
                               fb_compute_s=summary(fb["compute_s"][warm:]) if fb else None,
                               fb_data_s=summary(fb["data_s"][warm:]) if fb else None,
                               fb_peak_mb=(fb.get("peak_cuda_mb") if device == "cuda" else fb["peak_rss_delta_mb"])
                               if fb else None, raw={"ours": res, "fusionbench": fb})
                    if fb:
                        row["ratio_compute"] = row["ours_step_s"]["median"] / row["fb_compute_s"]["median"]
                        row["ratio_step"] = row["ours_step_s"]["median"] / row["fb_step_s"]["median"]
                    report["steps"].append(row)
                    checkpoint(report)
                if args.skip_merges:
                    continue
                log(f"[{fixture} {device} ×{threads}] merges and evaluation …")
                res = ours(dict(base, kind="merges_eval", merge_repeats=p["merge_repeats"],
                                eval_images=p["eval_images"] // args.tasks or 1, eval_repeats=p["eval_repeats"]),
                           isolate, log)
                for name, times in res["merge_s"].items():
                    row = dict(base, merge=name, ours_s=summary(times), fb_s=None)
                    if fb_python and device == "cpu":  # one process per merge: an OOM hides no other figure
                        why = []
                        fb = theirs(fb_python, ["--fixture", fixture, "--method", "merges", "--merge", name,
                                                "--tasks", str(args.tasks), "--repeats", str(p["merge_repeats"])],
                                    workdir, threads, log, why)
                        if fb:
                            row["fb_s"] = summary(fb["merge_s"][name])
                            row["ratio"] = row["ours_s"]["median"] / row["fb_s"]["median"]
                        else:
                            row["fb_failed"] = why[0]
                    report["merges"].append(row)
                report["eval"].append(dict(base, images=res["eval_images"],
                                           images_per_s=summary(res["eval_images_per_s"])))
                checkpoint(report)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["complete"] = True
    shutil.rmtree(workdir, ignore_errors=True)  # FusionBench's saved models: GBs for ViT-B/32
    return report


# ---------------------------------------------------------------- output

def _ms(s: dict | None) -> str:
    return "—" if not s else f"{1000 * s['median']:.1f}"


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Benchmark: adamerge vs FusionBench (issue #5)", "",
             f"- Date: {report['date']}", f"- Command: `{report['command']}`",
             f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f"; {m['platform']}",
             f"- adamerge side: Python {m['python']}, torch {m['torch']}",
             "- FusionBench side: " + (", ".join(f"{k} {v}" for k, v in report["fusionbench"].items())
                                       if report["fusionbench"] else "not run"),
             f"- Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in m['load_average_start'])}, "
             f"at end {tuple(round(x, 2) for x in m.get('load_average_end', os.getloadavg()))} (the end includes "
             "the benchmark's own threads)"
             + (" — the machine was shared with other jobs when it started: timings are noisy upper bounds, but "
                "both sides ran interleaved in the same run, so ratios are fair."
                if m["load_average_start"][0] > 1.0 else ""),  # a whole core busy with something else
             f"- K = {report['tasks']} tasks, batch {report['batch_size']} per task"
             + (" — QUICK smoke run, not for quoting" if report["quick"] else ""),
             *([] if report["complete"] else ["- **Partial: the run had not finished when this was written.**"]), ""]
    steps = ["## AdaMerging: time per step (median over steps after warm-up)", "",
             "One step = re-merge + forward of every task + backward + Adam. adamerge: pre-decoded tensors. "
             "FusionBench: its own loop; *FB compute* = its step minus its data-loading time (per-sample PIL "
             "preprocessing), *FB step* includes it. **ratio** = adamerge / FB compute (target ≤ 0.2); "
             "ratio (step) = adamerge / FB step. Peak MB: peak RSS of the loop minus RSS at its start "
             "(CUDA: max allocated).", "",
             "| fixture | device | threads | method | adamerge mode | adamerge ms/step | FB compute ms/step | "
             "FB step ms | **ratio** | ratio (step) | adamerge peak MB | FB peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["steps"]:
        ratio = f"**{r['ratio_compute']:.2f}**" if "ratio_compute" in r else "—"
        ratio_step = f"{r['ratio_step']:.2f}" if "ratio_step" in r else "—"
        steps.append(f"| {r['fixture']} | {r['device']} | {r['threads']} | {r['method']} | {r['forward_mode']} | "
                     f"{_ms(r['ours_step_s'])} | {_ms(r['fb_compute_s'])} | {_ms(r['fb_step_s'])} | {ratio} | "
                     f"{ratio_step} | {_mb(r['ours_peak_mb'])} | {_mb(r['fb_peak_mb'])} |")
    lines += (steps + [""]) if report["steps"] else []
    if report["merges"]:
        lines += ["## TA / TIES merge time (median; task vectors from θ₀, θ₁..θ_K, merged into the tower)", "",
                  "| fixture | device | threads | merge | adamerge ms | FusionBench ms | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["merges"]:
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "—"
            lines.append(f"| {r['fixture']} | {r['device']} | {r['threads']} | {r['merge']} | {_ms(r['ours_s'])} | "
                         f"{r['fb_failed'] if r.get('fb_failed') else _ms(r['fb_s'])} | {ratio} |")
        lines.append("")
    if report["eval"]:
        lines += ["## Evaluation throughput of the merged tower with heads (adamerge, batches of 256)", "",
                  "| fixture | device | threads | images | images/s (median) |", "|---|---|---|---|---|"]
        for r in report["eval"]:
            lines.append(f"| {r['fixture']} | {r['device']} | {r['threads']} | {r['images']} | "
                         f"{r['images_per_s']['median']:.0f} |")
    for key, table in report.get("profiles", {}).items():
        lines += ["", f"## torch.profiler: adamerge {key} (2 steps)", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path, notes: str | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "bench.md", out_dir / "bench.json"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(markdown(report) + (("\n" + notes) if notes else ""))
    return md, js


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="AdaMerging/TA/TIES/eval benchmark against FusionBench")
    parser.add_argument("--quick", action="store_true", help="few steps and repeats: a smoke run")
    parser.add_argument("--fixtures", nargs="+", choices=list(FIXTURES), default=None,
                        help="default: tiny vit-b-32, and vit-l-14 where CUDA is available (tiny only with --quick)")
    parser.add_argument("--threads", nargs="+", type=int, default=None, help="torch CPU threads (default: 1 2)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fusionbench-python", default="/work/fb-venv/bin/python",
                        help="python of the venv where fusion-bench 0.2.33 is installed")
    parser.add_argument("--no-fusionbench", action="store_true", help="adamerge's half only")
    parser.add_argument("--skip-steps", action="store_true", help="only the TA/TIES merges and evaluation")
    parser.add_argument("--skip-merges", action="store_true", help="only the AdaMerging steps")
    parser.add_argument("--host-memory-ablation", action="store_true",
                        help="CPU: also time layer-wise concat with freed host memory returned to the OS (as before)")
    parser.add_argument("--cpu-only", action="store_true", help="no GPU rows even if CUDA is available")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of adamerge's concat steps")
    parser.add_argument("--in-process", action="store_true",
                        help="run adamerge's configurations in this process (faster; peak memory less isolated)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--notes", type=Path, help="Markdown appended to bench.md (analysis of the run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command = None if argv is None else shlex.join(["python", "scripts/bench.py", *argv])
    if args.worker:
        import adamerge  # noqa: F401

        Path(args.worker_out).write_text(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if not args.fixtures:
        import torch

        gpu = torch.cuda.is_available() and not args.cpu_only
        args.fixtures = ["tiny"] if args.quick else [f for f in FIXTURES if f not in GPU_ONLY or gpu]
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    notes = args.notes.read_text() if args.notes else None
    report = benchmark(args, checkpoint=lambda partial: write(partial, args.out_dir, notes))
    md, js = write(report, args.out_dir, notes)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
