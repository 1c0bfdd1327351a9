"""What a reader sees in every logger: per-task λ curves, entropy and batch accuracy, the final accuracy in
percent, the figures — in W&B (one group per sweep, job_type = method), in TensorBoard (scalars, images, the
HParams tab) and in curves.png whatever loggers are configured, also after a resume."""

import json
import struct
from pathlib import Path

import pytest
import torch

import adamerge
from adamerge.plots.layers import depth_order, short_layer_name, tracked_layers

SMOKE = ["experiment=smoke", "threads=1", "print_config=false", "trainer.max_steps=4", "tasks.names=[digits,shapes]"]


def smoke(tmp_path, cache, *overrides, out="run"):
    """A 4-step AdaMerging of two tiny tasks, run as ``adamerge.run`` does; its run folder and record."""
    cfg = adamerge.compose([*SMOKE, f"paths.cache_dir={cache}", f"paths.output_dir={tmp_path / out}",
                            f"paths.results_dir={tmp_path / 'results'}", *overrides])
    adamerge.run(cfg)
    records = map(json.loads, (tmp_path / "results" / "raw" / "smoke.jsonl").read_text().splitlines())
    (record,) = [r for r in records if r["extra"]["run_dir"] == str(tmp_path / out)]
    return tmp_path / out, record


def wandb_records(path: Path):
    """The protobuf records of an offline run's ``run-*.wandb`` file (a LevelDB-style log: 32 KiB blocks of
    chunks with a 7-byte header: crc, length, type FULL 1 | FIRST 2 | MIDDLE 3 | LAST 4) after its 7-byte
    ``:W&B`` header. wandb ≥ 0.19 ships no Python reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_history(records) -> dict[str, list[float]]:
    history: dict[str, list[float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
    return history


def test_wandb_run_holds_per_task_lambda_grouped_by_sweep_with_method_table(tmp_path, embedded_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir, record = smoke(tmp_path, embedded_cache, "logger=wandb", "logger.wandb.offline=true")
    (offline,) = run_dir.glob("wandb/offline-run-*")
    (events,) = offline.glob("run-*.wandb")
    records = list(wandb_records(events))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.job_type == "adamerging_layerwise" and run.run_group == f"smoke-{run_dir.name}"
    history = wandb_history(records)
    blocks = ["0.attn.in_proj_weight", "1.attn.in_proj_weight"]  # the tiny tower's first and last (= middle) block
    for task in ("digits", "shapes"):
        for key in (f"lambda/{task}/mean", *(f"lambda/{task}/{b}" for b in blocks), f"entropy/{task}",
                    f"batch_acc/{task}"):
            assert len(history[key]) == 4, key  # one value per adaptation step (log_every_n_steps=1)
        assert history[f"lambda/{task}/mean"][0] == pytest.approx(0.3)  # step 0 holds the initial λ
        assert all(0 <= v <= 100 for v in history[f"batch_acc/{task}"])
    assert max(history["batch_acc/digits"] + history["batch_acc/shapes"]) > 1  # percent, not a fraction
    assert history["test_acc/avg"] == [pytest.approx(100 * record["avg"])]  # percent, as the table
    (table_file,) = offline.glob("files/media/table/test_accuracy_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["method", "digits", "shapes", "avg"]
    assert table["data"] == [[record["label"], *(pytest.approx(100 * record["accuracy"][t]) for t in ("digits", "shapes")),
                              pytest.approx(100 * record["avg"])]]
    images = {p.name.split("_")[0] for p in offline.glob("files/media/images/*.png")}
    assert images == {"curves", "coefficients"}  # curves.png without a CSV logger
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    origin = config["provenance"]["value"] if "value" in config["provenance"] else config["provenance"]
    assert origin["git"] == record["provenance"]["git"] and origin["packages"] == record["provenance"]["packages"]
    assert origin["hardware"]["cpu"] == record["provenance"]["hardware"]["cpu"]


@pytest.mark.slow
def test_a_multirun_ends_with_its_table_in_a_summary_run_of_the_jobs_group(tmp_path, embedded_cache):
    from tests.cli_runner import adamerge as cli

    cli(["-m", "experiment=smoke", "threads=1", "print_config=false", "method=pretrained,task_arithmetic",
         "logger=wandb", "logger.wandb.offline=true"], tmp_path, embedded_cache, env={"WANDB_MODE": "offline"})
    (sweep,) = (tmp_path / "multirun" / "smoke").iterdir()
    runs = {}
    for folder in sweep.glob("**/wandb/offline-run-*"):
        (events,) = folder.glob("run-*.wandb")
        (run,) = [r.run for r in wandb_records(events) if r.WhichOneof("record_type") == "run"]
        runs[run.job_type] = (run.run_group, folder)
    assert set(runs) == {"pretrained", "task_arithmetic", "summary"}
    assert {group for group, _ in runs.values()} == {f"smoke-{sweep.name}"}  # one group: the sweep's
    (table_file,) = runs["summary"][1].glob("files/media/table/sweep_table_*.table.json")
    logged = json.loads(table_file.read_text())
    markdown = (tmp_path / "results" / "tables" / "smoke.md").read_text()
    assert [row[0] for row in logged["data"]] == ["Pretrained", "Task Arithmetic (λ=0.3)"]
    assert all(f"| {row[-1]} |" in markdown for row in logged["data"])  # the same numbers as the table on disk


def test_sweep_jobs_share_one_wandb_group_and_a_new_sweep_gets_another(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from adamerge.runtime.reporting import sweep_group, wandb_group
    from tests.helpers import compose_cfg

    groups = []
    for _ in range(2):  # two sweeps
        cfg = compose_cfg(["experiment=smoke"])
        with open_dict(cfg):
            cfg.hydra.mode = "MULTIRUN"
        HydraConfig.instance().set_config(cfg)
        sweep_dir = HydraConfig.get().sweep.dir
        jobs = []
        for num in (0, 1):
            job = compose_cfg(["experiment=smoke", f"paths.output_dir={sweep_dir}/{num}"], hydra=False)
            jobs.append(wandb_group(job))
        assert jobs[0] == jobs[1] == sweep_group("smoke", sweep_dir)
        groups.append(jobs[0])
    assert groups[0] != groups[1] and groups[0].startswith("smoke-")
    cfg = compose_cfg(["experiment=smoke"])
    HydraConfig.instance().set_config(cfg)  # a single run: its own folder's stamp
    job = compose_cfg(["experiment=smoke", f"paths.output_dir={tmp_path}/outputs/smoke/stamp"], hydra=False)
    assert wandb_group(job) == "smoke-stamp"


def test_tensorboard_holds_task_lambda_figures_and_hparams_with_final_accuracy(tmp_path, embedded_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, record = smoke(tmp_path, embedded_cache, "logger=tensorboard", "method=adamerging_taskwise")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for task in ("digits", "shapes"):
        assert [e.step for e in events.Scalars(f"lambda/{task}")] == [0, 1, 2, 3]
        assert f"lambda/{task}/mean" not in scalars  # task-wise: one λ per task, nothing to average
    assert events.Scalars("test_acc/avg")[-1].value == pytest.approx(100 * record["avg"], abs=1e-4)
    assert set(events.Tags()["images"]) == {"figures/curves", "figures/coefficients"}
    assert events.Images("figures/curves")[0].height > 100
    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(data)
               for tag, data in events.PluginTagToContent("hparams").items()}
    start = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert start["method.granularity"].string_value == "task" and start["trainer.max_steps"].number_value == 4
    assert start["tasks.names"].string_value == "['digits', 'shapes']"  # lists as text: scalars and strings only
    metrics = [m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos]
    assert metrics == ["test_acc/digits", "test_acc/shapes", "test_acc/avg"]


def test_curves_after_a_resume_cover_the_whole_run_without_any_logger(tmp_path, embedded_cache):
    import csv

    first, _ = smoke(tmp_path, embedded_cache, "logger=none", "trainer.max_steps=2", out="first")
    ckpt = first / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    resumed, record = smoke(tmp_path, embedded_cache, "logger=none", f"ckpt_path={ckpt}", out="resumed")
    rows = list(csv.DictReader((resumed / "adaptation_metrics.csv").open()))
    before = list(csv.DictReader((first / "adaptation_metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3] and record["extra"]["steps"] == 4
    assert rows[:2] == before  # the steps before the resume, from the checkpoint
    assert record["extra"]["curves_plot"] == str(resumed / "curves.png")
    assert (resumed / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_summary_is_a_wandb_table_in_a_summary_run_of_the_group(tmp_path, monkeypatch):
    from adamerge.results.tables import Cell, Row, Table
    from adamerge.runtime.reporting import log_sweep_summary_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    table = Table(tasks=["digits", "shapes"],
                  rows=[Row("Task Arithmetic (λ=0.3)", {"digits": Cell(50.0, 1.5), "shapes": Cell(60.0, 0.5)},
                            Cell(55.0, 1.0), 2),
                        Row("Layer-wise AdaMerging", {"digits": Cell(70.0), "shapes": Cell(None)}, Cell(70.0), 1)])
    folder = log_sweep_summary_wandb(table, group="smoke-2026-01-01_00-00-00_1-abcd", project="adamerge",
                                     save_dir=tmp_path / "wb", offline=True)
    assert folder.parent == tmp_path / "wb" / "wandb"
    (events,) = folder.glob("run-*.wandb")
    (run,) = [r.run for r in wandb_records(events) if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "smoke-2026-01-01_00-00-00_1-abcd" and run.job_type == "summary"
    (table_file,) = folder.glob("files/media/table/sweep_table_*.table.json")
    logged = json.loads(table_file.read_text())
    assert logged["columns"] == ["Method", "digits", "shapes", "Avg"]
    assert logged["data"] == [["Task Arithmetic (λ=0.3)", "50.0 ± 1.5", "60.0 ± 0.5", "55.0 ± 1.0"],
                              ["Layer-wise AdaMerging", "70.0", "–", "70.0"]]


# Figures and their pure helpers.

OPEN_CLIP_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                   "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                   "mlp.c_proj.weight", "mlp.c_proj.bias"]
DEPTH = (["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"]
         + [f"transformer.resblocks.{i}.{p}" for i in range(12) for p in OPEN_CLIP_BLOCK]
         + ["ln_post.weight", "ln_post.bias", "proj"])


def test_depth_order_puts_stem_blocks_numerically_then_head():
    state_dict_order = ["class_embedding", "positional_embedding", "proj", *DEPTH[:1], *DEPTH[3:-3], *DEPTH[-3:-1]]
    assert sorted(state_dict_order) == sorted(DEPTH)
    for given in (sorted(DEPTH), state_dict_order):  # alphabetical: ln_post, proj before block 0, 10 before 2
        assert [given[i] for i in depth_order(given)] == DEPTH
    assert tracked_layers(sorted(DEPTH)) == [f"transformer.resblocks.{i}.attn.in_proj_weight" for i in (0, 6, 11)]
    assert tracked_layers(["a", "b", "c", "d"]) == ["a", "c", "d"]


def test_heatmap_columns_follow_depth_with_their_lambda_and_labelled_axes():
    from adamerge.plots.coefficients import coefficient_figure

    layers = sorted(DEPTH)
    lam = torch.tensor([[DEPTH.index(k) / len(DEPTH) for k in layers]] * 2)  # λ grows with depth
    fig = coefficient_figure(lam, ["a", "b"], layers)
    ax, colorbar = fig.axes
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    step = max(1, len(DEPTH) // 40)
    assert ticks == [short_layer_name(DEPTH[i]) for i in range(0, len(DEPTH), step)]
    shown = ax.images[0].get_array()[0]
    assert all(a < b for a, b in zip(shown, shown[1:]))  # the λ columns moved with their names
    assert ax.get_xlabel() and ax.get_ylabel() and colorbar.get_ylabel() == "λ"


def test_task_wise_lambda_is_a_bar_chart_with_its_values_written():
    from adamerge.plots.coefficients import coefficient_figure

    lam = torch.tensor([0.25, 0.5, 0.75])[:, None].expand(3, len(DEPTH))
    (ax,) = coefficient_figure(lam, ["a", "b", "c"], DEPTH).axes
    assert len(ax.patches) == 3 and not ax.images
    assert [t.get_text() for t in ax.texts] == ["0.250", "0.500", "0.750"]
    assert ax.get_xlabel() == "task" and ax.get_ylabel() == "λ"


def test_curves_have_labelled_axes_smoothed_accuracy_and_the_legend_outside():
    from adamerge.plots.curves import curves_figure, ema

    steps = range(30)
    series = {f"{metric}/{t}": [(s, float(s % 3 + i)) for s in steps]
              for i, t in enumerate(("a", "b")) for metric in ("entropy", "batch_acc", "lambda")}
    fig = curves_figure(series)
    assert len(fig.axes) == 3  # λ, entropy, batch accuracy
    for ax in fig.axes:
        assert ax.get_xlabel() == "adaptation step" and ax.get_ylabel()
        assert ax.get_legend() is None
    (legend,) = fig.legends
    fig.canvas.draw()
    right = max(ax.get_window_extent().x1 for ax in fig.axes)
    assert legend.get_window_extent().x0 >= right  # beside the panels, never over a line
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"]
    raw, smooth = fig.axes[2].lines[:2]
    assert raw.get_alpha() < 1 and smooth.get_alpha() is None
    assert list(smooth.get_ydata()) == pytest.approx(ema(raw.get_ydata(), span=3))
    assert ema([1.0, 1.0, 1.0], 5) == pytest.approx([1.0, 1.0, 1.0])
    assert max(ema([0, 3] * 10, 5)[5:]) < 3 and min(ema([0, 3] * 10, 5)[5:]) > 0
