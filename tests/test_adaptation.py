"""The Lightning shell: coefficients are the only state, files round-trip, NaN stops with the step."""

import math

import lightning as L
import pytest
import torch

from adamerge.adaptation.coefficient_file import CoefficientFileError, load_coefficients, save_coefficients
from adamerge.adaptation.guard import NonFiniteLossError
from adamerge.adaptation.module import AdaMergingModule
from adamerge.data.task import TensorImages
from adamerge.merging import StackedTaskVectors
from adamerge.methods import AdaMerging, TaskArithmetic
from adamerge.models.checkpoints import load_state_dict
from tests.helpers import adam


@pytest.mark.parametrize("forward_mode", ["concat", "per_task"])
def test_adamerging_trains_saves_and_reloads_coefficients(ctx, forward_mode):
    method = AdaMerging(adam(), granularity="layer", batch_size=8, forward_mode=forward_mode)
    result = method.run(ctx)
    path = ctx.run_dir / "coefficients.safetensors"
    lam = load_state_dict(path)["coefficients"]
    assert lam.shape == (3, len(ctx.pretrained)) and not torch.allclose(lam, torch.full_like(lam, 0.3))
    assert result.steps == 4
    reloaded = AdaMerging(adam(), granularity="layer", coefficients=str(path)).run(ctx)
    for key, value in result.params.items():
        torch.testing.assert_close(reloaded.params[key], value)


def test_adamerging_at_initial_value_without_steps_equals_task_arithmetic(ctx):
    ctx.make_trainer = lambda: L.Trainer(max_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                                         default_root_dir=ctx.run_dir)
    result = AdaMerging(adam(), granularity="task", init=0.3).run(ctx)
    ta = TaskArithmetic(lam=0.3).run(ctx)
    for key, value in ta.params.items():
        if value.is_floating_point():
            torch.testing.assert_close(result.params[key], value, atol=1e-6, rtol=0)


def test_lightning_checkpoint_holds_only_coefficients_and_optimizer(ctx):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = ctx.run_dir / "ckpt"
    ctx.make_trainer = lambda: L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                                         callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                                                    every_n_train_steps=1)])
    AdaMerging(adam(), granularity="layer", batch_size=8).run(ctx)
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert list(ckpt["state_dict"]) == ["coefficients.raw"]
    assert ckpt["optimizer_states"] and ckpt["global_step"] == 3


def test_resume_reaches_the_same_coefficients(ctx):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(steps, ckpt_dir):
        return lambda: L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                                 callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                                            every_n_train_steps=1)])

    L.seed_everything(0)
    ctx.make_trainer = trainer(6, ctx.run_dir / "full")
    full = AdaMerging(adam(), granularity="layer", batch_size=8).run(ctx)
    L.seed_everything(0)
    ctx.make_trainer = trainer(3, ctx.run_dir / "part")
    AdaMerging(adam(), granularity="layer", batch_size=8).run(ctx)
    ctx.make_trainer = trainer(6, ctx.run_dir / "part")
    ctx.ckpt_path = str(ctx.run_dir / "part" / "last.ckpt")
    resumed = AdaMerging(adam(), granularity="layer", batch_size=8).run(ctx)
    for key, value in full.params.items():
        torch.testing.assert_close(resumed.params[key], value, atol=1e-6, rtol=0)


def test_nan_loss_stops_with_step_and_keeps_last_good_coefficients(ctx, monkeypatch):
    import adamerge.adaptation.step as module_mod

    calls = {"n": 0}
    real = module_mod.entropy_loss

    def poisoned(logits, *args):
        calls["n"] += 1
        return real(logits, *args) * (math.nan if calls["n"] > 6 else 1.0)  # 3 tasks/step: step 2 goes NaN

    monkeypatch.setattr(module_mod, "entropy_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 2") as err:
        AdaMerging(adam(), granularity="layer", batch_size=8).run(ctx)
    saved = ctx.run_dir / "coefficients.last_good.safetensors"
    assert str(saved) in str(err.value)
    lam = load_state_dict(saved)["coefficients"]
    assert torch.isfinite(lam).all() and lam.shape == (3, len(ctx.pretrained))
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))  # two good steps were taken


def test_coefficient_file_for_other_tasks_or_shape_is_refused(tmp_path):
    path = save_coefficients(tmp_path / "c.safetensors", torch.rand(2, 3), granularity="layer",
                             tasks=["a", "b"], layers=["w1", "w2", "w3"], method="x")
    torch.testing.assert_close(load_coefficients(path, tasks=["a", "b"], layers=["w1", "w2", "w3"]).shape,
                               torch.Size([2, 3]))
    with pytest.raises(CoefficientFileError, match=r"learned for tasks \['a', 'b'\]"):
        load_coefficients(path, tasks=["a", "c"], layers=["w1", "w2", "w3"])
    with pytest.raises(CoefficientFileError, match="tensors differ"):
        load_coefficients(path, tasks=["a", "b"], layers=["w1", "w2"])


def test_per_task_and_concat_forward_give_equal_gradients(ctx):
    names = ctx.task_names
    stacked = StackedTaskVectors.from_state_dicts(ctx.pretrained, [ctx.finetuned[n] for n in names], names)
    batch = {t.name: (t.split("test").images[:8], t.split("test").labels[:8]) for t in ctx.tasks}
    from adamerge.adaptation.step import entropy_step
    from adamerge.merging import MergeCoefficients

    images = [batch[n][0] for n in names]
    heads = [ctx.heads[n] for n in names]
    grads, losses = [], []
    for mode in ("concat", "per_task"):
        lam = MergeCoefficients(len(names), stacked.num_layers, "layer")
        loss, _, _ = entropy_step(ctx.backbone.visual, stacked, lam(), images, heads, forward_mode=mode)
        losses.append(loss)
        grads.append(lam.raw.grad.clone())
    assert (grads[0] != 0).all()
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_step_indexed_batches_cover_each_epoch_and_split_over_ranks():
    from adamerge.adaptation.batches import StepIndexedBatches

    data = TensorImages(torch.arange(10).float().view(10, 1, 1, 1), torch.arange(10))
    single = StepIndexedBatches(data, global_batch=4, seed=3)
    seen = torch.cat([single.batch(s)[1] for s in range(5)])  # 20 samples = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    ranks = [StepIndexedBatches(data, global_batch=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        joined = torch.cat([r.batch(step)[1] for r in ranks])
        assert torch.equal(joined, single.batch(step)[1])
    resumed = iter(StepIndexedBatches(data, global_batch=4, seed=3, start_step=3))
    assert torch.equal(next(resumed)[1], single.batch(3)[1])
    with pytest.raises(ValueError, match="split evenly over 3 devices"):
        StepIndexedBatches(data, global_batch=4, seed=0, world_size=3)


def test_coefficients_of_another_variant_are_refused(ctx):
    AdaMerging(adam(), granularity="task", batch_size=8).run(ctx)
    path = str(ctx.run_dir / "coefficients.safetensors")
    with pytest.raises(CoefficientFileError, match="task-wise coefficients"):
        AdaMerging(adam(), granularity="layer", coefficients=path).run(ctx)
    with pytest.raises(CoefficientFileError, match="plain task vectors, this run uses TIES-trimmed"):
        AdaMerging(adam(), granularity="task", ties_keep=0.2, coefficients=path).run(ctx)


def test_out_of_memory_suggests_what_bounds_memory(ctx, monkeypatch):
    from adamerge.methods.adamerging import AdaptationOutOfMemory

    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AdaMergingModule, "training_step", oom)
    with pytest.raises(AdaptationOutOfMemory, match="adaptation.forward_mode=per_task") as err:
        AdaMerging(adam(), granularity="layer", batch_size=8).run(ctx)
    assert "method.batch_size" in str(err.value)


def test_a_cpu_run_keeps_freed_host_memory_unless_turned_off(monkeypatch):
    """The policy is applied once, by the runtime layer, for the whole process (not again by the module)."""
    from omegaconf import OmegaConf

    from adamerge.runtime.process import start_process

    calls = []
    monkeypatch.setattr("adamerge.runtime.host_memory.keep_freed_host_memory", lambda: calls.append(1) or True)
    off = start_process(OmegaConf.create({"seed": 0, "device": "cpu", "reuse_host_memory": False}))
    assert calls == [] and off.host_memory_kept is False
    on = start_process(OmegaConf.create({"seed": 0, "device": "cpu"}))
    assert calls == [1] and on.host_memory_kept is True and on.device == "cpu"
