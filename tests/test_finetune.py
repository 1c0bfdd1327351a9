"""``adamerge-finetune``: the task-vectors protocol as a LightningModule, the files the pools read, resume.

Real runs use the embedded world's tiny preset (built once per session in ``embedded_cache``):
2 epochs × 8 steps of batch 32, validation every 4 steps.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors import safe_open

from adamerge.runtime.config import CONF_DIR
from adamerge.finetuning.cli import run
from adamerge.finetuning.lightning import TaskDataModule, VisionTowerFinetuner, ranked_checkpoints
from adamerge.finetuning.schedule import warmup_cosine
from adamerge.models.checkpoints import load_state_dict
from adamerge.models.pool import CheckpointPool

TASKS = ("shapes", "digits")
STEPS = 16  # tiny recipe: 2 epochs of ⌈256 / 32⌉ = 8 steps


def finetune_cfg(tmp_path, cache, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("finetune", return_hydra_config=True, overrides=[
            "model=tiny", "tasks=tiny", "finetune=tiny", f"paths.cache_dir={cache}",
            f"paths.checkpoint_dir={tmp_path / 'checkpoints'}", f"paths.output_dir={tmp_path / 'run'}",
            "threads=1", "print_config=false", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
            "+trainer.enable_progress_bar=false", *overrides])
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices.model} → tiny
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real job: the config has no hydra node
    return cfg


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def logged(run_dir, column):
    rows = list(csv.DictReader((Path(run_dir) / "csv" / "metrics.csv").open()))
    return [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]


# --- the module: only the vision tower learns ------------------------------------------------------


def test_loss_and_gradients_touch_only_the_vision_tower(tiny_backbone):
    clip = tiny_backbone.clip
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    head = F.normalize(torch.randn(5, clip.visual.output_dim, generator=torch.Generator().manual_seed(0)), dim=-1) * 20
    module = VisionTowerFinetuner(tiny_backbone.visual, head, lr=1e-2, warmup_steps=1)
    images = torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    labels = torch.tensor([0, 1, 2, 3])

    out = module(images)
    expected = F.normalize(module.visual(images), dim=-1) @ head.T  # the head already holds the logit scale
    torch.testing.assert_close(out, expected)
    F.cross_entropy(out, labels).backward()

    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"visual.{n}" for n, _ in tiny_backbone.visual.named_parameters()}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.visual.parameters())
    assert sum(float(p.grad.abs().sum()) for p in module.visual.parameters()) > 0
    assert not module.head.requires_grad and module.head.grad is None
    assert "head" not in module.state_dict()  # checkpoints hold the vision tower, not the frozen head
    assert all(p.grad is None for p in clip.parameters())  # text tower and the caller's θ₀ untouched
    torch.optim.SGD(module.parameters(), lr=1.0).step()
    assert not torch.equal(module.visual.state_dict()["conv1.weight"], before["visual.conv1.weight"])
    for key, value in clip.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_weight_decay_on_every_tensor_as_task_vectors_or_on_matrices_only(tiny_backbone):
    head = torch.randn(3, tiny_backbone.clip.visual.output_dim)
    groups = {}
    for decay in ("all", "matrices"):
        module = VisionTowerFinetuner(tiny_backbone.visual, head, weight_decay=0.1, decay=decay)
        module.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # what configure_optimizers reads
        groups[decay] = module.configure_optimizers()["optimizer"].param_groups
    total = sum(p.numel() for p in tiny_backbone.visual.parameters())
    assert [g["weight_decay"] for g in groups["all"]] == [0.1]
    assert sum(p.numel() for p in groups["all"][0]["params"]) == total
    decayed, spared = groups["matrices"]
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and any(p.ndim == 1 for p in spared["params"])
    with pytest.raises(ValueError, match="all, matrices"):
        VisionTowerFinetuner(tiny_backbone.visual, head, decay="biases")


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    schedule = warmup_cosine(opt, steps=1500, warmup_steps=500)
    lrs = []
    for _ in range(1500):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-5 / 500) and lrs[499] == pytest.approx(1e-5)  # task_vectors: (step+1)/warmup
    assert all(a < b for a, b in zip(lrs[:499], lrs[1:500]))
    assert lrs[1000] == pytest.approx(0.5e-5)  # half-way through the cosine
    assert all(a >= b for a, b in zip(lrs[500:], lrs[501:])) and lrs[-1] < 1e-4 * 1e-5


def test_task_vectors_recipe_has_the_published_budgets():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=["finetune=task_vectors", "task=cars"])
    recipe = instantiate(cfg.finetune, _convert_="all")
    assert (recipe.lr, recipe.weight_decay, recipe.batch_size, recipe.warmup_steps) == (1e-5, 0.1, 128, 500)
    assert recipe.decay == "all" and recipe.grad_clip_norm == 1.0 and cfg.trainer.gradient_clip_val == 1.0
    published = {"cars": 35, "dtd": 76, "eurosat": 12, "gtsrb": 11, "mnist": 5, "resisc45": 15, "sun397": 14, "svhn": 4}
    assert {t: recipe.epochs_for(t) for t in published} == published
    assert recipe.epochs_for("SVHN") == 4
    with pytest.raises(KeyError, match=r"finetune.epochs.imagenet=N"):
        recipe.epochs_for("imagenet")


def test_every_paper_task_has_a_budget_in_the_task_vectors_recipe():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=["model=vit_b32", "tasks=paper8", "finetune=task_vectors", "task=sun397"])
    recipe = instantiate(cfg.finetune, _convert_="all")
    assert {t: recipe.epochs_for(t) for t in cfg.tasks.names} == {
        "sun397": 14, "cars": 35, "resisc45": 15, "eurosat": 12, "svhn": 4, "gtsrb": 11, "mnist": 5, "dtd": 76}


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp"])
def test_every_trainer_preset_keeps_validation_and_the_recipe_budget(trainer):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=[f"trainer={trainer}", "task=shapes", "finetune=task_vectors"])
    # the adaptation trainer presets switch validation off and stop at 500 steps; fine-tuning must not inherit that
    assert cfg.trainer.limit_val_batches == 1.0 and cfg.trainer.max_steps == -1
    assert cfg.trainer.gradient_clip_val == 1.0


def test_global_batch_is_split_across_ranks_and_must_divide():
    from adamerge.data.task import Task, TensorImages

    task = Task("t", ["a", "b"], ["{}"], {s: TensorImages(torch.zeros(10, 3, 4, 4), torch.zeros(10, dtype=torch.long))
                                         for s in ("train", "val")})
    data = TaskDataModule(task, batch_size=6, seed=3)
    data.trainer = type("T", (), {"world_size": 2, "global_rank": 1})()
    loader = data.train_dataloader()
    assert loader.batch_size == 3 and loader.sampler.num_replicas == 2 and loader.sampler.rank == 1
    data.trainer = type("T", (), {"world_size": 4, "global_rank": 0})()
    with pytest.raises(ValueError, match="not divisible by the 4 DDP processes"):
        data.train_dataloader()


# --- real runs on the tiny embedded world ---------------------------------------------------------


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory, embedded_cache):
    """``shapes`` and ``digits`` fine-tuned into one checkpoint dir, as ``adamerge-finetune -m`` would."""
    root = tmp_path_factory.mktemp("finetune")
    runs = {}
    for task in TASKS:
        cfg = finetune_cfg(root / task, embedded_cache, f"task={task}", f"paths.checkpoint_dir={root / 'checkpoints'}")
        runs[task] = {"val": run(cfg), "run_dir": Path(cfg.paths.output_dir)}
    return root / "checkpoints" / "tiny", runs


def test_run_writes_the_final_tower_and_the_best_two_with_val_accuracy(two_tasks, embedded_cache):
    folder, runs = two_tasks
    from adamerge.embedded.world import embedded_backbone

    theta0 = embedded_backbone(embedded_cache / "embedded", preset="tiny").visual.state_dict()
    for task in TASKS:
        final = load_state_dict(folder / f"{task}.safetensors")
        assert set(final) == set(theta0) and all(final[k].shape == theta0[k].shape for k in theta0)
        assert any(not torch.equal(final[k], theta0[k]) for k in theta0)  # it moved
        meta = metadata(folder / f"{task}.safetensors")
        assert meta["task"] == task and meta["backbone"] == "tiny" and int(meta["steps"]) == STEPS
        assert float(meta["val_accuracy"]) == pytest.approx(runs[task]["val"])
        assert 0.0 < runs[task]["val"] <= 1.0

        best = [metadata(folder / task / f"best-{i}.safetensors") for i in (1, 2)]
        assert sorted(p.name for p in (folder / task).iterdir()) == ["best-1.safetensors", "best-2.safetensors"]
        assert float(best[0]["val_accuracy"]) >= float(best[1]["val_accuracy"])
        assert {int(b["steps"]) for b in best} <= {4, 8, 12, 16} and best[0]["steps"] != best[1]["steps"]
        # the exported best checkpoints are exactly the Lightning checkpoints ModelCheckpoint ranked first
        ckpts = sorted((runs[task]["run_dir"] / "checkpoints").glob("step*.ckpt"))
        assert len(ckpts) == 2 and (runs[task]["run_dir"] / "checkpoints" / "last.ckpt").exists()
        for b in best:
            lightning_state = torch.load(b["lightning_checkpoint"], weights_only=True)["state_dict"]
            native = load_state_dict(folder / task / f"best-{best.index(b) + 1}.safetensors")
            assert all(torch.equal(native[k], lightning_state[f"visual.{k}"]) for k in native)
        # the validations logged during training agree with what was exported
        val_log = dict(logged(runs[task]["run_dir"], "val_acc"))
        top = sorted(val_log.values(), reverse=True)[:2]
        assert [float(b["val_accuracy"]) for b in best] == pytest.approx(top)


def test_logged_learning_rate_follows_warm_up_then_cosine(two_tasks):
    _, runs = two_tasks
    lrs = [lr for _, lr in logged(runs["shapes"]["run_dir"], "lr")]
    assert len(lrs) == STEPS
    base, warmup = 3e-3, 4  # conf/finetune/tiny.yaml
    assert lrs[:warmup] == pytest.approx([base * (i + 1) / warmup for i in range(warmup)])
    assert lrs[warmup:] == pytest.approx([base * 0.5 * (1 + math.cos(math.pi * i / (STEPS - warmup)))
                                          for i in range(STEPS - warmup)])


def test_checkpoint_pool_loads_the_finetuned_towers_and_the_two_best_candidates(two_tasks, embedded_cache):
    folder, _ = two_tasks
    from adamerge.embedded.world import embedded_backbone

    backbone = embedded_backbone(embedded_cache / "embedded", preset="tiny")
    pool = CheckpointPool(finetuned_dir=folder)
    theta0, finetuned = pool.load(list(TASKS), backbone.visual)
    assert list(finetuned) == list(TASKS)
    for task in TASKS:
        candidates = pool.load_candidates(task, theta0)
        assert len(candidates) == 2
        for i, state in enumerate(candidates, start=1):
            expected = load_state_dict(folder / task / f"best-{i}.safetensors")
            assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_best_checkpoints_rank_by_val_accuracy_then_name():
    ranked = ranked_checkpoints({"b/step8.ckpt": torch.tensor(0.5), "b/step4.ckpt": torch.tensor(0.5),
                                 "b/step12.ckpt": torch.tensor(0.75)})
    assert [(p.name, s) for p, s in ranked] == [("step12.ckpt", 0.75), ("step4.ckpt", 0.5), ("step8.ckpt", 0.5)]


class Interrupted(RuntimeError):
    pass


def test_interrupted_run_resumes_from_its_lightning_checkpoint_to_the_same_weights(tmp_path, embedded_cache,
                                                                                   monkeypatch):
    full = finetune_cfg(tmp_path / "full", embedded_cache, "task=shapes")
    run(full)
    reference = load_state_dict(tmp_path / "full" / "checkpoints" / "tiny" / "shapes.safetensors")

    step = VisionTowerFinetuner.training_step

    def crash_at_step_10(self, batch, batch_idx):
        if self.global_step == 10:
            raise Interrupted("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(VisionTowerFinetuner, "training_step", crash_at_step_10)
    broken = finetune_cfg(tmp_path / "broken", embedded_cache, "task=shapes")
    with pytest.raises(Interrupted):
        run(broken)
    monkeypatch.undo()
    out = tmp_path / "broken" / "checkpoints" / "tiny"
    assert not (out / "shapes.safetensors").exists()  # nothing exported by the crashed run
    last = tmp_path / "broken" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8

    resumed = finetune_cfg(tmp_path / "resumed", embedded_cache, "task=shapes", f"ckpt_path={last}")
    run(resumed)
    resumed_file = tmp_path / "resumed" / "checkpoints" / "tiny" / "shapes.safetensors"
    state = load_state_dict(resumed_file)
    assert int(metadata(resumed_file)["steps"]) == STEPS
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], atol=1e-6, rtol=0)
    # the resumed run kept ranking into the interrupted run's folder: its best two span both halves
    full_best = [metadata(tmp_path / "full" / "checkpoints" / "tiny" / "shapes" / f"best-{i}.safetensors")
                 for i in (1, 2)]
    resumed_best = [metadata(tmp_path / "resumed" / "checkpoints" / "tiny" / "shapes" / f"best-{i}.safetensors")
                    for i in (1, 2)]
    assert [b["steps"] for b in resumed_best] == [b["steps"] for b in full_best]
    assert [float(b["val_accuracy"]) for b in resumed_best] == pytest.approx([float(b["val_accuracy"]) for b in full_best])


def test_step_cap_ends_between_validations_and_replaces_an_older_runs_files(tmp_path, embedded_cache):
    run(finetune_cfg(tmp_path / "a", embedded_cache, "task=shapes", f"paths.checkpoint_dir={tmp_path / 'ckpt'}"))
    folder = tmp_path / "ckpt" / "tiny"
    assert len(list((folder / "shapes").glob("best-*.safetensors"))) == 2
    val = run(finetune_cfg(tmp_path / "b", embedded_cache, "task=shapes", "finetune.max_steps=6",
                           f"paths.checkpoint_dir={tmp_path / 'ckpt'}"))
    meta = metadata(folder / "shapes.safetensors")
    assert int(meta["steps"]) == 6 and json.loads(meta["recipe"])["max_steps"] == 6
    # one validation (step 4) ran: one best checkpoint, and the older run's best-2 is gone, not mixed in
    assert sorted(p.name for p in (folder / "shapes").iterdir()) == ["best-1.safetensors"]
    assert int(metadata(folder / "shapes" / "best-1.safetensors")["steps"]) == 4
    from adamerge.embedded.world import embedded_backbone, embedded_tasks
    from adamerge.evaluation.accuracy import dataset_accuracy
    from adamerge.models.head_cache import cached_heads

    backbone = embedded_backbone(embedded_cache / "embedded", preset="tiny")
    (task,) = embedded_tasks(embedded_cache / "embedded", preset="tiny", names=["shapes"])
    head = cached_heads(backbone, [task], None)["shapes"]
    backbone.visual.load_state_dict(load_state_dict(folder / "shapes.safetensors"))
    assert float(meta["val_accuracy"]) == val == dataset_accuracy(backbone.visual, head, task.split("val"))


def test_missing_task_and_unwritable_checkpoint_dir_fail_before_any_work(tmp_path, embedded_cache):
    with pytest.raises(ValueError, match="adamerge-finetune task=<name>"):
        run(finetune_cfg(tmp_path, embedded_cache))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RuntimeError, match="paths.checkpoint_dir"):
        run(finetune_cfg(tmp_path, embedded_cache, "task=shapes", f"paths.checkpoint_dir={blocker}"))
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        run(finetune_cfg(tmp_path, embedded_cache, "task=shapes", f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cpu_finetuning_keeps_freed_host_memory_unless_turned_off(tmp_path, embedded_cache, monkeypatch):
    calls = []
    monkeypatch.setattr("adamerge.runtime.host_memory.keep_freed_host_memory", lambda: calls.append(1) or True)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # the run stops at its first check, after the process is set up
    for overrides, expected in ((["reuse_host_memory=false"], []), ([], [1])):
        with pytest.raises(RuntimeError, match="paths.checkpoint_dir"):
            run(finetune_cfg(tmp_path, embedded_cache, "task=shapes", "device=cpu",
                             f"paths.checkpoint_dir={blocker}", *overrides))
        assert calls == expected


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, embedded_cache):
    run(finetune_cfg(tmp_path / "single", embedded_cache, "task=shapes"))
    command("adamerge.finetuning.cli", ["task=shapes", "model=tiny", "tasks=tiny", "finetune=tiny", "threads=1",
                                        "print_config=false", "trainer=ddp", "trainer.devices=2",
                                        "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false",
                                        f"paths.checkpoint_dir={tmp_path / 'ddp'}"], tmp_path, embedded_cache)
    from adamerge.embedded.world import embedded_backbone

    theta0 = embedded_backbone(embedded_cache / "embedded", preset="tiny").visual.state_dict()
    files = {m: tmp_path / m / "checkpoints" / "tiny" / "shapes.safetensors" for m in ("single",)}
    files["ddp"] = tmp_path / "ddp" / "tiny" / "shapes.safetensors"
    # each rank loads 16 of the same 32 images a single process loads: equal global batches, averaged gradients
    tau = {m: torch.cat([(v - theta0[k]).flatten() for k, v in load_state_dict(f).items()]) for m, f in files.items()}
    assert float((tau["ddp"] - tau["single"]).norm() / tau["single"].norm()) < 0.02
    meta = {m: metadata(f) for m, f in files.items()}
    assert meta["ddp"]["steps"] == meta["single"]["steps"] == str(STEPS)  # same global batch → same step count
    assert float(meta["ddp"]["val_accuracy"]) == pytest.approx(float(meta["single"]["val_accuracy"]), abs=1.5 / 64)
    assert len(list((tmp_path / "ddp" / "tiny" / "shapes").glob("best-*.safetensors"))) == 2


# --- the command, end to end -----------------------------------------------------------------------


def command(module, args, cwd, cache):
    env = dict(os.environ, ADAMERGE_CACHE=str(cache), HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.mark.slow
def test_multirun_over_tasks_then_merge_reads_the_checkpoints(tmp_path, embedded_cache):
    ckpt = tmp_path / "ckpt"
    command("adamerge.finetuning.cli", ["-m", "task=shapes,digits", "model=tiny", "tasks=tiny", "finetune=tiny",
                                        "threads=1", "print_config=false", f"paths.checkpoint_dir={ckpt}"],
            tmp_path, embedded_cache)
    for task in TASKS:
        assert (ckpt / "tiny" / f"{task}.safetensors").exists()
        assert len(list((ckpt / "tiny" / task).glob("best-*.safetensors"))) == 2
    assert sorted(p.name for p in next((tmp_path / "multirun" / "finetune" / "tiny").iterdir()).iterdir()
                  if p.is_dir()) == ["0-shapes", "1-digits"]
    command("adamerge", ["model=tiny", "tasks=tiny", "tasks.names=[shapes,digits]", "pool=native",
                         "method=individual", "threads=1", "print_config=false", f"paths.checkpoint_dir={ckpt}",
                         "name=ft"], tmp_path, embedded_cache)
    from tests.cli_runner import records

    (record,) = records(tmp_path, "ft")
    for task in TASKS:  # the merge evaluated exactly the fine-tuned towers on their tasks' test split
        assert record["accuracy"][task] > 0
