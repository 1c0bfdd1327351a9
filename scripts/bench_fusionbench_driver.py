"""FusionBench 0.2.33 side of scripts/bench.py: time its own AdaMerging loop and TA/TIES merges.

Runs inside FusionBench's own virtual environment (never adamerge's; it imports nothing from
adamerge) and is started by scripts/bench.py, one process per (fixture, threads, method) so that
peak memory is that configuration's alone:

    /work/fb-venv/bin/python scripts/bench_fusionbench_driver.py --fixture tiny --threads 1 \\
        --method layer_wise --workdir /tmp/fb-bench --out /tmp/fb-bench/tiny-1-layer.json

FusionBench runs unmodified, offline, on randomly initialised Hugging Face ``CLIPModel``s saved to
``--workdir`` (θ₀ plus K perturbed vision towers, local parquet datasets named after its built-in
10-class tasks so that its own class names and templates build the zero-shot heads). Timing is
instrumentation only: the end of every ``merge_weights()`` call (made once before the loop and once
at the end of each step) is time-stamped, so one step = data + forward + backward of every task +
Adam + re-merge, exactly its loop; the data-loader iterators are wrapped to time data loading, which
is reported apart (adamerge is timed on pre-decoded tensors). Peak memory: peak RSS of the loop minus
RSS when the loop starts (Linux ``clear_refs``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# FusionBench's built-in 10-class tasks: its own class names and templates build the heads.
TASKS = ["mnist", "svhn", "cifar10", "eurosat", "stl10", "kmnist", "fashion_mnist", "emnist_mnist"]
IMAGES_PER_TASK = 64


def vision_config(fixture: str) -> dict:
    """The HF vision tower that has the same shape as adamerge's open_clip fixture."""
    if fixture == "tiny":  # adamerge-bench-tiny: image 32, patch 8, width 64, 2 layers, 2 heads, MLP 4×
        return dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, projection_dim=64)
    if fixture == "vit-b-32":
        return {}  # transformers' CLIPVisionConfig defaults are ViT-B/32
    if fixture == "vit-l-14":  # open_clip ViT-L-14: image 224, patch 14, width 1024, 24 layers, 16 heads
        return dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=768)
    raise ValueError(f"unknown fixture {fixture!r}; valid: tiny, vit-b-32, vit-l-14")


def _char_tokenizer(folder: Path):
    """A CLIP BPE tokenizer with a byte-level vocabulary and no merges: builds offline, no download."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")), len(vocab)


def build_fixture(fixture: str, workdir: Path, num_tasks: int, seed: int = 0) -> Path:
    """θ₀ (a full CLIPModel + processor), K perturbed vision towers and K parquet test sets, once per fixture."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionModel

    root = workdir / fixture
    done = root / "READY"
    if done.exists():
        return root
    torch.manual_seed(seed)
    tokenizer, vocab_size = _char_tokenizer(root / "tokenizer_src")
    vis = vision_config(fixture)
    if fixture == "tiny":
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=vocab_size, max_position_embeddings=77)
        config = CLIPConfig(text_config=text, vision_config=vis, projection_dim=64)
    elif fixture == "vit-l-14":
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        config = CLIPConfig(text_config=text, vision_config=vis, projection_dim=768)
    else:
        config = CLIPConfig()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # pool at the tokenizer's own end token
        setattr(config.text_config, key, tokenizer.convert_tokens_to_ids(
            {"bos_token_id": "<|startoftext|>"}.get(key, "<|endoftext|>")))
    size = config.vision_config.image_size
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                 crop_size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    model = CLIPModel(config).eval()
    model.save_pretrained(root / "pretrained")
    processor.save_pretrained(root / "pretrained")
    base = model.vision_model.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    for task in TASKS[:num_tasks]:
        tower = CLIPVisionModel(config.vision_config)
        tower.vision_model.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
        tower.save_pretrained(root / "finetuned" / task)
    _write_datasets(root / "data", TASKS[:num_tasks], size, seed)
    done.write_text("ok\n")
    return root


def _write_datasets(folder: Path, tasks: list[str], size: int, seed: int) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    for task in tasks:
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(IMAGES_PER_TASK)]
        ds = datasets.Dataset.from_dict({"image": images, "label": list(rng.integers(0, 10, IMAGES_PER_TASK))},
                                        features=features)
        (folder / task).mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / task / "test.parquet"))


def _rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, else reuse hides the loop's memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)


class _TimedIterator:
    """Wraps a loader iterator and adds the time spent in ``next`` to a shared clock."""

    def __init__(self, it, clock: list[float]):
        self.it, self.clock = it, clock

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.clock[0] += time.perf_counter() - start


def adamerging_steps(root: Path, method: str, num_tasks: int, batch_size: int, steps: int, device: str,
                     cache_dir: Path) -> dict:
    """Run FusionBench's CLIP AdaMerging for ``steps`` steps; per-step wall and data times, peak RSS."""
    import lightning as L
    import torch
    from omegaconf import DictConfig

    from fusion_bench.method.adamerging.clip_layer_wise_adamerging import CLIPLayerWiseAdaMergingAlgorithm
    from fusion_bench.method.adamerging.clip_task_wise_adamerging import CLIPTaskWiseAdaMergingAlgorithm
    from fusion_bench.modelpool import CLIPVisionModelPool
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel
    from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel

    tasks = TASKS[:num_tasks]
    pool = CLIPVisionModelPool(
        models=DictConfig({"_pretrained_": str(root / "pretrained"),
                           **{t: str(root / "finetuned" / t) for t in tasks}}),
        test_datasets=DictConfig({t: {"_target_": "datasets.load_dataset", "path": str(root / "data" / t),
                                      "split": "test"} for t in tasks}),
        processor=str(root / "pretrained"))
    # its configs/method/adamerging/clip.yaml, with the loop length and loader workers of this benchmark
    config = DictConfig(dict(name=f"clip_{method}_adamerging", weights=None, optimizer="adam", lr=1e-3,
                             init_values=0.3, clamp_weights=False, tie_weights=True, strict=False, devices=1,
                             batch_size=batch_size, num_workers=0, max_steps=steps, fast_dev_run=False,
                             save_merging_weights=False, cache_dir=str(cache_dir)))
    base = CLIPLayerWiseAdaMergingAlgorithm if method == "layer_wise" else CLIPTaskWiseAdaMergingAlgorithm
    wrapper = LayerWiseMergedModel if method == "layer_wise" else TaskWiseMergedModel
    data_clock = [0.0]
    marks: list[tuple[float, float]] = []  # (time after merge_weights, data time so far)
    memory = {}

    class Timed(base):
        _timed_iters: dict = {}

        def get_shuffled_test_loader_iter(self, task):
            if task not in self._timed_iters:
                self._timed_iters[task] = _TimedIterator(super().get_shuffled_test_loader_iter(task), data_clock)
            return self._timed_iters[task]

    original = wrapper.merge_weights

    def timed_merge(self, *args, **kwargs):
        if not marks:  # the merge before the first step: the loop starts here
            _reset_peak_rss()
            memory["start_mb"] = _rss_mb("VmRSS")
        out = original(self, *args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), data_clock[0]))
        return out

    wrapper.merge_weights = timed_merge
    algorithm = Timed(config)
    from lightning.fabric.loggers import TensorBoardLogger

    # as its CLI does: Fabric with a TensorBoard logger (layer-wise logs hyper-parameters and every step)
    fabric = L.Fabric(accelerator="cuda" if device == "cuda" else "cpu", devices=1,
                      loggers=TensorBoardLogger(str(cache_dir / "logs")))
    fabric.launch()
    algorithm.fabric = fabric  # layer-wise reads .fabric
    algorithm._fabric = fabric  # task-wise 0.2.33 only creates one when CUDA exists
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    algorithm.run(pool)
    total = time.perf_counter() - start
    memory["peak_mb"] = _rss_mb("VmHWM") - memory["start_mb"]
    marks = marks[:steps + 1]  # merge_and_unload() merges once more after the loop
    step_s = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    data_s = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out = {"step_s": step_s, "data_s": data_s, "compute_s": [s - d for s, d in zip(step_s, data_s)],
           "peak_rss_delta_mb": memory["peak_mb"], "run_total_s": total}
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


MERGES = ["task_arithmetic", "ties"]


def merge_times(root: Path, num_tasks: int, repeats: int, names: list[str]) -> dict:
    """Its TaskArithmeticAlgorithm (λ=0.3) and TiesMergingAlgorithm (top 20 %, sum, λ=0.3) on in-memory towers."""
    import copy

    from transformers import CLIPVisionModel

    from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm

    pretrained = CLIPVisionModel.from_pretrained(root / "pretrained")
    finetuned = {t: CLIPVisionModel.from_pretrained(root / "finetuned" / t) for t in TASKS[:num_tasks]}
    algorithms = {"task_arithmetic": lambda: TaskArithmeticAlgorithm(scaling_factor=0.3),
                  "ties": lambda: TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[],
                                                       merge_func="sum")}
    out = {}
    for name in names:
        make, times = algorithms[name], []
        for _ in range(repeats + 1):  # the first is warm-up
            pool = {"_pretrained_": copy.deepcopy(pretrained), **finetuned}  # it merges into θ₀ in place
            algorithm = make()
            start = time.perf_counter()
            algorithm.run(pool)
            times.append(time.perf_counter() - start)
        out[name] = times[1:]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", choices=["tiny", "vit-b-32", "vit-l-14"], required=True)
    parser.add_argument("--method", choices=["layer_wise", "task_wise", "merges", "build"], required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="steps run (bench.py drops its warm-up ones)")
    parser.add_argument("--repeats", type=int, default=3, help="timed merges (after one warm-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--merge", choices=MERGES, action="append",
                        help="with --method merges: which (repeatable; default all). bench.py runs one per process "
                             "so that one running out of memory leaves the others' figures")
    parser.add_argument("--workdir", type=Path, required=True, help="models and data are built here once")
    parser.add_argument("--out", type=Path, help="JSON result file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.tasks > len(TASKS):
        parser.error(f"at most {len(TASKS)} tasks (FusionBench's built-in 10-class tasks)")
    root = build_fixture(args.fixture, args.workdir, args.tasks)
    import fusion_bench

    result = {"fixture": args.fixture, "threads": args.threads, "method": args.method, "device": args.device,
              "fusion_bench": getattr(fusion_bench, "__version__", None) or _version("fusion-bench"),
              "torch": torch.__version__, "transformers": _version("transformers")}
    if args.method == "build":
        result["built"] = str(root)
    elif args.method == "merges":
        result["merge_s"] = merge_times(root, args.tasks, args.repeats, args.merge or MERGES)
    else:
        cache = args.workdir / f"heads-{os.getpid()}"  # its head cache is keyed by path, not weights: fresh
        cache.mkdir(parents=True, exist_ok=True)
        result.update(adamerging_steps(root, args.method, args.tasks, args.batch_size, args.steps, args.device, cache))
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
