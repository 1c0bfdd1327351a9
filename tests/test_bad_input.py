"""Bad input never becomes a result: each case below once ended with exit 0 and a wrong number (or failed late
and unclearly); each now fails before any expensive work, naming what, where and how to fix it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from adamerge.adaptation.checkpointing import ResumeCheckpointError, check_resume_checkpoint
from adamerge.adaptation.coefficient_file import CoefficientFileError, save_coefficients
from adamerge.adaptation.guard import NonFiniteLossError
from adamerge.merging import MergeCoefficients, NonFiniteTensorError
from adamerge.methods import AdaMerging, MergeContext, TaskArithmetic, WeightAveraging
from adamerge.methods.baselines import Individual
from adamerge.models.checkpoints import load_state_dict, save_state_dict
from adamerge.models.pool import CheckpointPool
from adamerge.validation import ConfigError, validate_run_config
from tests.cli_runner import adamerge, records
from tests.helpers import adam, compose_cfg


# 1. coefficient files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_coefficient_file_is_refused(ctx, tmp_path, bad):
    lam = torch.full((3, len(ctx.pretrained)), 0.3)
    lam[1, 4] = bad
    path = save_coefficients(tmp_path / "bad.safetensors", lam, granularity="layer", tasks=ctx.task_names,
                             layers=list(ctx.pretrained), method="Layer-wise AdaMerging")
    with pytest.raises(CoefficientFileError, match="1 of its .* coefficients are NaN/Inf"):
        AdaMerging(adam(), granularity="layer", coefficients=str(path)).run(ctx)


def test_coefficient_file_outside_the_clamp_is_refused(ctx, tmp_path):
    lam = torch.full((3, len(ctx.pretrained)), 0.3)
    lam[0, 0] = 1.7  # learned without a clamp (FusionBench's protocol)
    path = save_coefficients(tmp_path / "free.safetensors", lam, granularity="layer", tasks=ctx.task_names,
                             layers=list(ctx.pretrained), method="Layer-wise AdaMerging")
    with pytest.raises(CoefficientFileError, match=r"outside this run's clamp \[0, 1\].*method.clamp=null"):
        AdaMerging(adam(), granularity="layer", coefficients=str(path)).run(ctx)
    merged = AdaMerging(adam(), granularity="layer", clamp=None, coefficients=str(path)).run(ctx)
    assert merged.params  # without a clamp the stored λ are used as they are


# 2. checkpoints, heads and merged weights -----------------------------------------------------------------------

def test_a_nan_weight_in_a_checkpoint_is_refused_at_load(tiny_backbone, tiny_models, tmp_path):
    theta0, ft = tiny_models
    for i, state in enumerate(ft):
        save_state_dict(tmp_path / f"t{i}.safetensors", state)
    broken = dict(ft[1])
    broken["transformer.resblocks.0.mlp.c_fc.weight"] = broken["transformer.resblocks.0.mlp.c_fc.weight"].clone()
    broken["transformer.resblocks.0.mlp.c_fc.weight"][0, 0] = math.nan
    save_state_dict(tmp_path / "t1.safetensors", broken)
    pool = CheckpointPool(finetuned_dir=tmp_path)
    with pytest.raises(NonFiniteTensorError) as err:
        pool.load(["t0", "t1", "t2"], tiny_backbone.visual)
    assert "t1.safetensors" in str(err.value) and "transformer.resblocks.0.mlp.c_fc.weight (1 of" in str(err.value)


def test_a_merge_that_overflows_records_nothing(ctx):
    from adamerge.merging import check_finite

    params = TaskArithmetic(lam=1e40).run(ctx).params
    with pytest.raises(NonFiniteTensorError, match="non-finite"):
        check_finite(params, "the Task Arithmetic merge")


# 3 + 11. resuming -----------------------------------------------------------------------------------------------

def _checkpoint(ctx, tmp_path, **kw):
    method = AdaMerging(adam(), granularity=kw.get("granularity", "task"), ties_keep=kw.get("ties_keep"))
    ctx.make_trainer = lambda: L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                                         enable_model_summary=False, default_root_dir=tmp_path,
                                         callbacks=[L.pytorch.callbacks.ModelCheckpoint(
                                             dirpath=tmp_path / "ck", save_last=True, save_top_k=0,
                                             every_n_train_steps=1)])
    method.run(ctx)
    return tmp_path / "ck" / "last.ckpt", method


def test_resume_with_the_tasks_reordered_is_refused(ctx, tmp_path):
    ckpt, method = _checkpoint(ctx, tmp_path)
    reordered = MergeContext(**{**ctx.__dict__, "tasks": ctx.tasks[::-1], "ckpt_path": str(ckpt)})
    reordered.__dict__.pop("vectors", None)
    with pytest.raises(ResumeCheckpointError, match=r"trained for tasks \['t0', 't1', 't2'\], this run merges \['t2'"):
        AdaMerging(adam(), granularity="task").run(reordered)


def test_a_plain_checkpoint_does_not_resume_adamerging_plus(ctx, tmp_path):
    ckpt, method = _checkpoint(ctx, tmp_path)
    plus = AdaMerging(adam(), granularity="task", ties_keep=0.2)
    with pytest.raises(ResumeCheckpointError, match=r"trained on plain task vectors, this run uses TIES-trimmed"):
        check_resume_checkpoint(ckpt, plus.identity(ctx))
    layer = AdaMerging(adam(), granularity="layer")
    with pytest.raises(ResumeCheckpointError, match="holds task-wise coefficients, this run is layer-wise"):
        check_resume_checkpoint(ckpt, layer.identity(ctx))


def test_ckpt_path_to_random_bytes_or_a_safetensors_file_is_named(ctx, tmp_path):
    identity = AdaMerging(adam(), granularity="task").identity(ctx)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ResumeCheckpointError, match="not a Lightning checkpoint written by adamerge") as err:
        check_resume_checkpoint(junk, identity)
    assert "weights_only" not in str(err.value)
    lam = save_coefficients(tmp_path / "c.safetensors", torch.full((3, len(ctx.pretrained)), 0.3), granularity="task",
                            tasks=ctx.task_names, layers=list(ctx.pretrained), method="m")
    with pytest.raises(ResumeCheckpointError, match="a safetensors file .*method.coefficients="):
        check_resume_checkpoint(lam, identity)
    torch.save({"state_dict": {"coefficients.raw": torch.zeros(3)}}, tmp_path / "old.ckpt")
    with pytest.raises(ResumeCheckpointError, match="older adamerge"):
        check_resume_checkpoint(tmp_path / "old.ckpt", identity)


# 5 + 12. coefficients that cannot move, and the NaN guard --------------------------------------------------------

@pytest.mark.parametrize("init,clamp,match", [(1.5, (0.0, 1.0), "outside the clamp"), (-1.0, (0.0, 1.0), "outside"),
                                              (1.0, (0.0, 1.0), "on the clamp"), (0.3, (1.0, 0.0), "lo < hi"),
                                              (math.nan, (0.0, 1.0), "finite"), (0.3, (0.0, math.inf), "finite")])
def test_an_init_that_cannot_move_or_an_inverted_clamp_is_refused(init, clamp, match):
    with pytest.raises(ValueError, match=match):
        AdaMerging(adam(), granularity="layer", init=init, clamp=clamp)
    with pytest.raises(ValueError, match=match):
        MergeCoefficients(2, 3, "layer", init=init, clamp=clamp)


def test_nan_gradient_is_called_a_gradient_and_last_good_is_finite(ctx, monkeypatch):
    import adamerge.adaptation.step as module_mod

    real = module_mod.entropy_loss
    calls = {"n": 0}

    class NanBackward(torch.autograd.Function):  # the loss stays finite; only its gradient is NaN
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * math.nan

    def poisoned(logits, *args):
        calls["n"] += 1
        value = real(logits, *args)
        return NanBackward.apply(value) if calls["n"] > 6 else value  # 3 tasks a step: step 2 on

    monkeypatch.setattr(module_mod, "entropy_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        AdaMerging(adam(), granularity="layer", batch_size=8).run(ctx)
    message = str(err.value)
    assert "gradient of the coefficients" in message and "non-finite loss" not in message
    lam = load_state_dict(ctx.run_dir / "coefficients.last_good.safetensors")["coefficients"]
    assert torch.isfinite(lam).all()


# 6. options validated before anything loads ----------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    ("optimized_metric=foo", "optimized_metric='foo': valid are test, val"),
    ("eval_batch_size=0", "eval_batch_size=0"),
    ("tasks.names=[digits,digits,shapes]", "lists digits more than once"),
    ("tasks.unseen=[digits]", None),
    ("optimizer.lr=-1", "optimizer.lr=-1"),
    ("threads=0", "threads=0"),
    ("head_logit_scale=-3", "head_logit_scale"),
    ("ckpt_path=/nowhere/last.ckpt", "no such file"),
    ("method.coefficients=/nowhere.safetensors", "no such file"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5"),
])
def test_top_level_options_are_checked_before_loading(override, match):
    cfg = compose_cfg([override])
    if match is None:
        validate_run_config(cfg)
        return
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("(", r"\(")):
        validate_run_config(cfg)


def test_cuda_on_a_host_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda but CUDA is not available"):
        validate_run_config(compose_cfg(["device=cuda"]))


def test_the_embedded_world_mixed_with_a_real_backbone_says_what_to_choose():
    with pytest.raises(ConfigError, match="mix the embedded offline world.*model=embedded tasks=embedded pool=embedded"):
        validate_run_config(compose_cfg(["model=hf_clip", "tasks=embedded"]))


# 8. damaged images -----------------------------------------------------------------------------------------------

def test_a_truncated_image_is_named_and_leaves_no_half_built_cache(tmp_path):
    from PIL import Image

    from adamerge.data.decode_cache import UnreadableImageError, cached_split
    from adamerge.data.layouts import CanonicalImageFolder, RawSplit

    root = tmp_path / "split"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / c / f"{i}.png")
    good = (root / "b" / "2.png").read_bytes()
    (root / "b" / "2.png").write_bytes(good[: len(good) // 2])  # truncated
    folder = CanonicalImageFolder(root, ["a", "b"])
    raw = RawSplit(folder, sorted(root.rglob("*.png")))
    import torchvision.transforms as T

    for workers in (0, 1):
        with pytest.raises(UnreadableImageError, match=str(root / "b" / "2.png")):
            cached_split(raw, T.Compose([T.Resize(8), T.ToTensor()]), tmp_path / "cache", "x-test", num_workers=workers)
        assert not list((tmp_path / "cache" / "datasets").glob("*.tmp"))


# 9. half-precision checkpoints -----------------------------------------------------------------------------------

def test_half_precision_checkpoints_merge_and_evaluate_in_the_towers_dtype(ctx, tiny_backbone, tmp_path):
    theta0, ft = ctx.pretrained, list(ctx.finetuned.values())
    save_state_dict(tmp_path / "theta0.safetensors", {k: v.half() for k, v in theta0.items()})
    for i, state in enumerate(ft):
        save_state_dict(tmp_path / f"t{i}.safetensors", {k: v.to(torch.bfloat16 if i else torch.float16)
                                                         for k, v in state.items()})
    pool = CheckpointPool(pretrained=tmp_path / "theta0.safetensors", finetuned_dir=tmp_path)
    loaded0, loaded = pool.load(ctx.task_names, tiny_backbone.visual)
    assert all(v.dtype == torch.float32 for s in [loaded0, *loaded.values()] for v in s.values())
    assert pool.stored_dtypes["t0"] == ["float16"] and pool.stored_dtypes["t1"] == ["bfloat16"]
    half = MergeContext(**{**ctx.__dict__, "pretrained": loaded0, "finetuned": loaded})
    half.__dict__.pop("vectors", None)
    for method in (WeightAveraging(), Individual()):
        result = method.run(half)
        acc = half.evaluate(result.per_task, per_task=True) if result.per_task else half.evaluate(result.params)
        assert all(0.0 <= a <= 1.0 for a in acc.values())


# 4, 7, 10. through the CLI -----------------------------------------------------------------------------------------

SMOKE = ["experiment=smoke", "threads=1", "print_config=false"]


@pytest.mark.slow
def test_two_runs_started_together_never_share_a_run_folder(tmp_path, embedded_cache):
    env = dict(os.environ, ADAMERGE_CACHE=str(embedded_cache), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1")
    adamerge([*SMOKE, "method=pretrained"], tmp_path, embedded_cache)  # the world exists before the race
    procs = [subprocess.Popen([sys.executable, "-m", "adamerge", *SMOKE, "method=adamerging_taskwise", f"seed={s}"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for s in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    runs = [r for r in records(tmp_path, "smoke") if r["method"] == "adamerging_taskwise"]
    assert len({r["extra"]["run_dir"] for r in runs}) == 2
    lams = {r["seed"]: load_state_dict(r["extra"]["coefficients_file"])["coefficients"] for r in runs}
    assert not torch.equal(lams[0], lams[1])  # each record points at its own run's coefficients


@pytest.mark.slow
def test_a_torn_record_of_another_experiment_does_not_touch_this_sweeps_table(tmp_path, embedded_cache):
    raw = tmp_path / "results" / "raw"
    raw.mkdir(parents=True)
    (raw / "other.jsonl").write_text('{"run_id": "x", "time": "2026-01-01T00:00:00+00:00", "experim')
    done = adamerge(["-m", *SMOKE, "method=pretrained,task_arithmetic"], tmp_path, embedded_cache)
    table = (tmp_path / "results" / "tables" / "smoke.md").read_text()
    assert "Pretrained" in table and "Task Arithmetic" in table
    assert "other.jsonl" not in done.stderr  # never opened


@pytest.mark.slow
def test_ctrl_c_in_a_multirun_saves_the_step_says_how_to_resume_and_tabulates_finished_jobs(tmp_path, embedded_cache):
    done = adamerge(["-m", *SMOKE, "method=task_arithmetic,adamerging_layerwise", "trainer.max_steps=50",
                     "+callbacks.stop._target_=tests.faults.InterruptAt", "+callbacks.stop.step=7"],
                    tmp_path, embedded_cache, check=False, env={"PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 130 and "Traceback" not in done.stderr
    assert "interrupted at step 7 of 50" in done.stderr and "ckpt_path=" in done.stderr
    ckpt = done.stderr.split("ckpt_path=")[-1].split()[0].rstrip(".")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 7 and state["adamerge"]["granularity"] == "layer"
    partial = (tmp_path / "results" / "tables" / "smoke.partial.md").read_text()
    assert "Task Arithmetic" in partial and "Layer-wise" not in partial
    assert [r["method"] for r in records(tmp_path, "smoke")] == ["task_arithmetic"]


# the run's own checks on what leaves a merge ---------------------------------------------------------------------

def _run_in_process(tmp_path, embedded_cache, overrides):
    import adamerge

    return adamerge.run(adamerge.compose([
        "experiment=smoke", "threads=1", "print_config=false", "logger=none", f"paths.cache_dir={embedded_cache}",
        f"paths.results_dir={tmp_path / 'results'}", f"paths.output_dir={tmp_path / 'run'}", *overrides]))


def test_a_diverging_merge_is_refused_and_nothing_recorded(tmp_path, embedded_cache):
    with pytest.raises(NonFiniteTensorError, match=r"the Task Arithmetic \(λ=1e\+40\) merge"):
        _run_in_process(tmp_path, embedded_cache, ["method=task_arithmetic", "method.lam=1e40"])
    assert not list((tmp_path / "results" / "raw").glob("*.jsonl"))


def test_non_finite_zero_shot_heads_are_refused(tmp_path, embedded_cache, monkeypatch):
    import adamerge.experiment as experiment

    real = experiment.cached_heads

    def broken(*args, **kwargs):
        heads = real(*args, **kwargs)
        first = next(iter(heads))
        heads[first] = heads[first] * math.nan
        return heads

    monkeypatch.setattr(experiment, "cached_heads", broken)
    with pytest.raises(NonFiniteTensorError, match="the zero-shot heads"):
        _run_in_process(tmp_path, embedded_cache, ["method=pretrained"])
    assert not list((tmp_path / "results" / "raw").glob("*.jsonl"))


def test_a_row_never_averages_runs_of_different_configurations():
    from adamerge.results import build_table, make_record

    def record(seed, steps, lr, threads=1):
        config = {"seed": seed, "threads": threads, "paths": {"output_dir": f"/runs/{seed}"},
                  "trainer": {"max_steps": steps}, "optimizer": {"lr": lr}, "method": {"granularity": "task"}}
        return make_record(experiment="x", method="adamerging_taskwise", label="Task-wise AdaMerging", model="m",
                           seed=seed, accuracy={"a": 0.5 + seed / 10}, config=config)

    table = build_table([record(0, 10, 1e-3), record(1, 10, 1e-3, threads=2)])  # seeds (and threads) may differ
    assert table.rows[0].n_seeds == 2
    rows = build_table([record(0, 10, 1e-3), record(1, 40, 1e-2)]).rows  # two experiments: two rows, told apart
    assert [(r.label, r.n_seeds) for r in rows] == [
        ("Task-wise AdaMerging [optimizer.lr=0.001, trainer.max_steps=10]", 1),
        ("Task-wise AdaMerging [optimizer.lr=0.01, trainer.max_steps=40]", 1)]


def test_ckpt_path_last_and_a_percentage_keep_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="ckpt_path=last would look in this run's new"):
        validate_run_config(compose_cfg(["ckpt_path=last"]))
    from adamerge.methods import Ties

    with pytest.raises(ValueError, match="a percentage\\? use 0.2"):
        Ties(keep=20)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_says_how_to_resume(tmp_path, embedded_cache):
    done = adamerge([*SMOKE, "method=adamerging_taskwise", "trainer.max_steps=50",
                     "+callbacks.stop._target_=tests.faults.SigtermAt", "+callbacks.stop.step=5"],
                    tmp_path, embedded_cache, check=False, env={"PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 130, done.stderr[-3000:]
    assert "ckpt_path=" in done.stderr and "No result is recorded" in done.stderr
    ckpt = done.stderr.split("ckpt_path=")[-1].split()[0].rstrip(".")
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 5 <= step <= 7  # Lightning stops at the next step boundary after the signal
    assert not (tmp_path / "results" / "raw").exists() or not list((tmp_path / "results" / "raw").glob("*.jsonl"))


def test_labels_stored_in_another_order_than_the_class_names_are_refused():
    from adamerge.data.classnames import CLASSNAMES
    from adamerge.data.hf_datasets import _check_label_order

    names = list(CLASSNAMES["eurosat"])
    _check_label_order("eurosat", names)  # same order: fine
    _check_label_order("eurosat", [f"class_{i}" for i in range(10)])  # not comparable: left to the count check
    with pytest.raises(ValueError, match="labels are in another order"):
        _check_label_order("eurosat", names[1:] + names[:1])


def test_a_transformers_clip_folder_without_tokenizer_says_what_to_download(tmp_path):
    from transformers import CLIPModel

    from adamerge.models.hf_native import HFBackboneError, load_hf_clip_native
    from tests.hf_fixtures import tiny_clip_config

    CLIPModel(tiny_clip_config(514)).save_pretrained(tmp_path / "clip")
    with pytest.raises(HFBackboneError, match="no usable tokenizer files.*hf download"):
        load_hf_clip_native(str(tmp_path / "clip"))
