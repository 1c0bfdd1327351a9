"""Progress bars on the long phases (adamerge/runtime/progress.py): what each one says, and when it stays quiet."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from adamerge.data.task import TensorImages
from adamerge.evaluation.accuracy import dataset_accuracy
from adamerge.runtime.progress import LOG_INTERVAL_S, progress
from adamerge.runtime.progress_bar import StepProgressBar
from adamerge.search import local_search
from tests.cli_runner import adamerge


@pytest.fixture(autouse=True)
def _bars_on(monkeypatch):
    for var in ("ADAMERGE_PROGRESS", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _counts(text: str, unit: str) -> list[tuple[int, int]]:
    """Every ``<unit> k/n`` a bar drew."""
    return [(int(k), int(n)) for k, n in re.findall(rf"{unit} (\d+)/(\d+)", text)]


# the helper ------------------------------------------------------------------------------------------------------

def test_a_bar_goes_to_stderr_with_an_eta_and_is_calm_off_a_terminal(capsys):
    bar = progress(total=4, desc="phase", unit="batch")
    assert bar.mininterval == LOG_INTERVAL_S >= 2  # captured stderr is no terminal: few redraws
    for _ in range(4):
        bar.update(1)
    bar.close()
    out = capsys.readouterr()
    assert out.out == ""
    assert "phase:" in out.err and "batch 4/4" in out.err and "<" in out.err  # elapsed<remaining: the ETA


@pytest.mark.parametrize("env", [{"ADAMERGE_PROGRESS": "0"}, {"RANK": "1"}, {"LOCAL_RANK": "2"}])
def test_bars_are_off_when_asked_and_on_other_ranks(env, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert list(progress(range(3), total=3, desc="hidden")) == [0, 1, 2]
    assert "hidden" not in capsys.readouterr().err


# the embedded world: pre-training, then ONE bar over every task's fine-tuning -------------------------------------

def test_world_build_shows_pretraining_and_one_finetuning_bar_and_no_random_init_warning(tmp_path, monkeypatch,
                                                                                          capsys, caplog):
    from adamerge.embedded import build_world, presets
    from adamerge.embedded.tasks import TASK_NAMES

    worlds = tmp_path / "worlds"  # a micro preset: seconds to build
    worlds.mkdir()
    (worlds / "tiny.yaml").write_text((presets.WORLD_DIR / "tiny.yaml").read_text())
    (worlds / "micro.yaml").write_text(
        "base: tiny\nname: micro\nsplit_sizes: {train: 32, val: 16, test: 16}\npool_size: 128\n"
        "pretrain: {steps: 6, batch_size: 16, warmup_steps: 1}\n"
        "finetune: {max_steps: 2, batch_size: 16, val_every_n_steps: 1}\n"
        f"finetune_steps: {{{TASK_NAMES[0]}: 3}}\n")
    monkeypatch.setattr(presets, "WORLD_DIR", worlds)
    caplog.set_level(logging.INFO)
    build_world(tmp_path / "cache", preset="micro", seed=0)
    err = capsys.readouterr().err
    assert "pre-training CLIP" in err and (6, 6) in _counts(err, "step") and "loss=" in err
    total = 3 + 2 * (len(TASK_NAMES) - 1)  # the sum of every task's steps
    finetuning = err[err.index("fine-tuning tasks"):]
    assert (total, total) in _counts(finetuning, "step") and f"task={TASK_NAMES[-1]}" in finetuning
    assert all(n == total for _, n in _counts(finetuning, "step"))
    assert "initialized randomly" not in caplog.text + err  # pretrained=None is deliberate: it is pre-trained next


def test_a_requested_random_clip_still_warns(caplog):
    from adamerge.models.backbone import load_open_clip

    with caplog.at_level(logging.WARNING):
        load_open_clip("adamerge-tiny")
    assert "initialized randomly" in caplog.text  # only the world's deliberate case is silenced


# Fisher, evaluation, search -----------------------------------------------------------------------------------

def test_fisher_counts_batches_of_every_task(ctx, capsys):
    from adamerge.methods.fisher import FisherMerging

    FisherMerging(num_examples=8, batch_size=4).run(ctx)  # 3 tasks × 2 batches
    err = capsys.readouterr().err
    assert "Fisher" in err and (6, 6) in _counts(err, "batch") and "task=t2" in err


def _images(n: int) -> TensorImages:
    gen = torch.Generator().manual_seed(0)
    return TensorImages(torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 4, (n,), generator=gen))


def test_evaluation_bar_only_for_large_splits(tiny_backbone, capsys):
    head = torch.randn(4, 32)
    dataset_accuracy(tiny_backbone.visual, head, _images(24), batch_size=1)  # 24 batches ≥ 20
    err = capsys.readouterr().err
    assert "evaluating" in err and (0, 24) in _counts(err, "batch")
    dataset_accuracy(tiny_backbone.visual, head, _images(12), batch_size=1)  # 12 batches: quiet
    assert capsys.readouterr().err == ""
    dataset_accuracy(tiny_backbone.visual, head, _images(12), batch_size=4, desc="val of t0", progress_min_batches=2)
    err = capsys.readouterr().err
    assert "val of t0" in err and (0, 3) in _counts(err, "batch")


def test_local_search_counts_evaluations_against_the_budget(capsys):
    found = local_search(lambda p: -(p["a"] - 0.3) ** 2, {"a": 0.0}, {"a": 0.1}, budget=5, desc="ExPO: t0")
    err = capsys.readouterr().err
    assert "ExPO: t0" in err and (found.evaluations, 5) in _counts(err, "evaluation")
    found = local_search(lambda p: -abs(p["a"]), {"a": 0.0}, {"a": 0.01}, budget=50, min_step=0.005)
    err = capsys.readouterr().err  # converged early: the bar ends full at the evaluations used
    assert "local search" in err and found.evaluations < 50
    assert (found.evaluations, found.evaluations) in _counts(err, "evaluation")


# Lightning: steps of the whole run, also after a resume -------------------------------------------------------

class _Line(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.w(batch[0]).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(6, 2))
        return torch.utils.data.DataLoader(data, batch_size=2)  # 3 batches an epoch


def _fit(root: Path, ckpt_path=None, **trainer_kw) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=root, callbacks=[StepProgressBar("AdaMerging", refresh_rate=1)], **trainer_kw)
    trainer.fit(_Line(), ckpt_path=ckpt_path)
    return trainer


def test_step_bar_counts_the_run_and_a_resume_starts_where_it_stopped(tmp_path, capsys):
    first = _fit(tmp_path, max_steps=4, max_epochs=-1)
    first.save_checkpoint(tmp_path / "step4.ckpt")
    err = capsys.readouterr().err
    assert "AdaMerging" in err and (4, 4) in _counts(err, "step") and "Epoch" not in err
    _fit(tmp_path, max_steps=10, max_epochs=-1, ckpt_path=str(tmp_path / "step4.ckpt"))
    err = capsys.readouterr().err
    counts = _counts(err, "step")
    assert counts[0] == (4, 10) and counts[-1] == (10, 10) and all(n == 10 and k <= n for k, n in counts)
    assert "Epoch" not in err and "-2" not in err


def test_step_bar_of_an_epoch_budget_counts_its_steps(tmp_path, capsys):
    _fit(tmp_path, max_epochs=2)  # adamerge-finetune's budget: epochs, no max_steps
    assert (6, 6) in _counts(capsys.readouterr().err, "step")


def test_llm_trainer_callback_draws_one_bar(capsys):
    from adamerge.llm.world import _steps_bar

    callback, state = _steps_bar("LLM world: pre-training"), SimpleNamespace(max_steps=5, global_step=0)
    callback.on_train_begin(None, state, None)
    for step in range(1, 6):
        state.global_step = step
        callback.on_step_end(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 1.25})
    callback.on_train_end(None, state, None)
    err = capsys.readouterr().err
    assert "LLM world: pre-training" in err and (5, 5) in _counts(err, "step") and "loss=1.250" in err


def test_adamerge_finetune_shows_the_steps_of_its_budget(tmp_path, embedded_cache, capsys):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from adamerge.finetuning.cli import run
    from adamerge.runtime.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("finetune", return_hydra_config=True, overrides=[
            "task=shapes", "model=tiny", "tasks=tiny", "finetune=tiny", "finetune.max_steps=6", "logger=none",
            f"paths.cache_dir={embedded_cache}", f"paths.checkpoint_dir={tmp_path / 'checkpoints'}",
            f"paths.output_dir={tmp_path / 'run'}", "threads=1", "print_config=false", "trainer.accelerator=cpu"])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    run(cfg)
    err = capsys.readouterr().err
    counts = _counts(err[err.index("fine-tuning shapes"):], "step")
    assert counts[-1] == (6, 6) and all(n == 6 for _, n in counts) and "Epoch" not in err


# the adamerge command: an interrupted, resumed AdaMerging run ---------------------------------------------------

SMOKE = ["experiment=smoke", "threads=1", "print_config=false", "method=adamerging_taskwise", "trainer.max_steps=10",
         "logger=none"]


@pytest.mark.slow
def test_resumed_adamerging_shows_steps_of_the_run(tmp_path, embedded_cache, capsys):
    import adamerge as api

    stopped = adamerge([*SMOKE, "+callbacks.stop._target_=tests.faults.InterruptAt", "+callbacks.stop.step=4"],
                       tmp_path, embedded_cache, check=False, env={"PYTHONPATH": str(Path(__file__).parents[1])})
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "initialized randomly" not in stopped.stdout + stopped.stderr  # also when this run built the world
    assert "AdaMerging" in stopped.stderr and _counts(stopped.stderr, "step")[-1] == (4, 10)
    ckpt = stopped.stderr.split("ckpt_path=")[-1].split()[0].rstrip(".")
    capsys.readouterr()
    api.run(api.compose([*SMOKE, f"ckpt_path={ckpt}", f"paths.cache_dir={embedded_cache}",
                         f"paths.results_dir={tmp_path / 'results'}", f"paths.output_dir={tmp_path / 'resumed'}"]))
    out = capsys.readouterr()
    bar = out.err[out.err.index("AdaMerging"):]
    counts = _counts(bar, "step")
    assert counts[0] == (4, 10) and counts[-1] == (10, 10) and all(n == 10 and k <= n for k, n in counts)
    assert "Epoch" not in out.err + out.out and "/-2" not in out.err + out.out
