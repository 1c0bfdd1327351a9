"""scripts/bench.py, adamerge's half in quick mode on the tiny fixture: the report's structure and sane numbers."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_tables_with_positive_numbers(tmp_path):
    bench = _bench()
    assert bench.main(["--quick", "--no-fusionbench", "--in-process", "--fixtures", "tiny", "--threads", "1",
                       "--profile", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["quick"] and report["tasks"] == 8 and report["batch_size"] == 16
    assert report["fusionbench"] is None
    assert report["machine"]["torch"] and report["machine"]["cores"] >= 1

    rows = report["steps"]
    assert {(r["method"], r["forward_mode"]) for r in rows} == {
        ("layer-wise", "concat"), ("layer-wise", "per_task"), ("task-wise", "concat"), ("task-wise", "per_task")}
    for r in rows:
        assert (r["fixture"], r["device"], r["threads"]) == ("tiny", "cpu", 1)
        step = r["ours_step_s"]
        assert step["n"] == bench.plan(True, "tiny")["steps"]
        assert 0 < step["min"] <= step["median"] <= step["max"] < 60
        assert r["ours_peak_mb"] is not None and r["ours_peak_mb"] > -1024  # RSS delta; may be ~0 when reused
        assert r["fb_step_s"] is None and "ratio_compute" not in r

    assert {m["merge"] for m in report["merges"]} == {"task_arithmetic", "ties"}
    for m in report["merges"]:
        assert m["ours_s"]["median"] > 0 and m["fb_s"] is None
    (ev,) = report["eval"]
    assert ev["images"] == bench.plan(True, "tiny")["eval_images"] and ev["images_per_s"]["median"] > 0
    assert report["complete"]
    # the profiler ran on extra steps of the layer-wise concat run
    (table,) = report["profiles"].values()
    assert "Self CPU" in table

    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("# Benchmark: adamerge vs FusionBench")
    for heading in ("## AdaMerging: time per step", "## TA / TIES merge time", "## Evaluation throughput"):
        assert heading in md
    assert "| tiny | cpu | 1 | layer-wise | concat |" in md and "QUICK smoke run" in md


def test_adamerge_bench_tiny_matches_fusionbench_tiny_clip():
    """The tiny fixture has the shape of FusionBench's tiny HF CLIP vision tower (image 32, patch 8, width 64,
    2 layers, quick-GELU)."""
    from adamerge.models.backbone import load_open_clip

    visual = load_open_clip("adamerge-bench-tiny").visual
    assert visual.image_size == (32, 32) and visual.patch_size == (8, 8)
    assert len(visual.transformer.resblocks) == 2 and visual.transformer.width == 64
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_llm_bench_compares_outputs_bit_for_bit(tmp_path):
    """bench_llm_merge's output check counts every differing bf16 entry, sharded or not."""
    import torch
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("bench_llm_merge", ROOT / "scripts" / "bench_llm_merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    w = torch.randn(4, 8).bfloat16()
    v = torch.randn(16).bfloat16()
    save_file({"w": w, "v": v}, str(a / "model.safetensors"))
    changed = v.clone()
    changed[3] = changed[3] * 2 + 1  # one entry, one tensor
    save_file({"w": w}, str(b / "model-00001-of-00002.safetensors"))
    save_file({"v": changed}, str(b / "model-00002-of-00002.safetensors"))
    (b / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}))
    c = module.compare_outputs(a, b)
    assert (c["tensors"], c["entries"], c["tensors_differing"], c["entries_differing"]) == (2, 48, 1, 1)
    assert c["max_abs_diff"] == abs(float(changed[3]) - float(v[3]))
    assert module.compare_outputs(a, a)["entries_differing"] == 0
