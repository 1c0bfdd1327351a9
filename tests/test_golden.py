"""Golden numbers: a few rows of the tiny world at seed 0, one thread, pinned exactly, so that any change of a
number (a refactor that was meant to change none, a dependency, a data order) is caught.

Exactness holds on the CPU instruction set the numbers were recorded with (``torch.backends.cpu``'s capability);
elsewhere floating-point sums are ordered differently, which can flip single predictions, and the rows are held
to one test image per task instead. Re-record after an intended change:
``ADAMERGE_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "tiny_smoke.json"
ROWS = ["pretrained", "task_arithmetic", "ties", "adamerging_taskwise", "adamerging_layerwise_plus"]
TEST_IMAGES = 128  # per task in the tiny world


@pytest.mark.slow
def test_the_tiny_worlds_rows_are_unchanged(tmp_path, embedded_cache, monkeypatch):
    import adamerge

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    got = {}
    for method in ROWS:
        cfg = adamerge.compose(["experiment=smoke", f"method={method}", "threads=1", "seed=0", "print_config=false",
                                "logger=none", f"paths.cache_dir={embedded_cache}"])
        adamerge.run(cfg)
        record = json.loads((tmp_path / "results" / "raw" / "smoke.jsonl").read_text().splitlines()[-1])
        got[method] = {"label": record["label"], "accuracy": record["accuracy"]}
    capability = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("ADAMERGE_RECORD_GOLDEN"):
        GOLDEN.write_text(json.dumps({"cpu_capability": capability, "rows": got}, indent=1, ensure_ascii=False) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert {m: r["label"] for m, r in got.items()} == {m: r["label"] for m, r in golden["rows"].items()}
    if capability == golden["cpu_capability"]:
        assert got == golden["rows"]
        return
    for method, row in golden["rows"].items():  # another instruction set: within one image per task
        for task, value in row["accuracy"].items():
            assert abs(got[method]["accuracy"][task] - value) <= 1 / TEST_IMAGES + 1e-9, (
                f"{method} {task}: {got[method]['accuracy'][task]} vs {value} (recorded on {golden['cpu_capability']}, "
                f"this CPU is {capability})")
