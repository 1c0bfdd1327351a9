"""ExPO, Extrapolation Merging and learned extrapolation as merge methods on a tiny CLIP tower."""

from dataclasses import replace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from adamerge.data.task import Task, TensorImages
from adamerge.evaluation.accuracy import accuracy
from adamerge.merging.extrapolation import expo, extrapolation_merge
from adamerge.methods import ExPO, ExtrapolationMerging, MergeContext, TaskArithmetic, Ties
from adamerge.models.checkpoints import load_state_dict, save_state_dict
from adamerge.models.heads import logits
from adamerge.models.pool import CheckpointPool, MissingCheckpointError
from tests.cli_runner import adamerge, records
from tests.helpers import compose_cfg
from tests.helpers import assert_state_close

NEW_METHODS = ["expo", "extrapolation_merging", "extrapolation_merging_entropy", "adamerging_extrapolation",
               "adamerging_extrapolation_taskwise"]


def make_tasks(n_tasks=3, n=24, classes=4):
    gen = torch.Generator().manual_seed(5)
    return [Task(f"t{i}", [f"c{j}" for j in range(classes)], ["a {}"],
                 {s: TensorImages(torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, classes, (n,), generator=gen))
                  for s in ("train", "val", "test")})
            for i in range(n_tasks)]


def trainer_factory(root, max_steps=4):
    return lambda: L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=root)


@pytest.fixture()
def ctx(tiny_backbone, tiny_models, tmp_path):
    """Three tasks; each has a main checkpoint and two candidates in a pool (the first candidate is the main one)."""
    theta0, ft = tiny_models
    tasks = make_tasks()
    gen = torch.Generator().manual_seed(2)
    candidates = {}
    for task, main in zip(tasks, ft):
        other = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()}
        candidates[task.name] = [save_state_dict(tmp_path / "pool" / task.name / f"best-{i}.safetensors", s)
                                 for i, s in enumerate((main, other), start=1)]
    heads = {t.name: torch.randn(4, 32, generator=torch.Generator().manual_seed(i)) * 5 for i, t in enumerate(tasks)}
    return MergeContext(backbone=tiny_backbone, tasks=tasks, pretrained=theta0,
                        finetuned={t.name: f for t, f in zip(tasks, ft)}, heads=heads, run_dir=tmp_path,
                        make_trainer=trainer_factory(tmp_path), pool=CheckpointPool(candidates=candidates))


def first_candidates(ctx):
    return {n: ctx.pool.load_candidates(n, ctx.pretrained)[0] for n in ctx.task_names}


def predictions(ctx, task, params):
    """The labels a model gives a split: planting them makes that model the best point of a val search."""
    with torch.no_grad():
        return logits(torch.func.functional_call(ctx.backbone.visual, params, (task.split("val").images,)),
                      ctx.heads[task.name]).argmax(-1)


def with_labels(task, split, labels):
    splits = dict(task.splits)
    splits[split] = TensorImages(task.split(split).images, labels)
    return replace(task, splits=splits)


def test_expo_at_alpha_zero_is_the_inner_method(ctx):
    ta = TaskArithmetic(lam=0.3).run(ctx)
    result = ExPO(TaskArithmetic(lam=0.3), alpha=0.0).run(ctx)
    assert_state_close(result.params, ta.params)
    assert result.extra["lambda"] == 0.3 and result.extra["alpha_per_task"] == {"t0": 0.0, "t1": 0.0, "t2": 0.0}


def test_expo_with_task_arithmetic_is_task_arithmetic_with_lambda_times_one_plus_alpha(ctx):
    result = ExPO(TaskArithmetic(lam=0.3, label="Task Arithmetic (λ=0.3)"), alpha=1.0).run(ctx)
    assert_state_close(result.params, TaskArithmetic(lam=0.6).run(ctx).params, atol=1e-5)
    assert result.extra["merge_method"] == "Task Arithmetic (λ=0.3)"


def test_expo_val_search_picks_each_tasks_planted_alpha(ctx):
    # each task's val labels are what its model extrapolated with α = 1 predicts: α = 1 scores 100 %
    ctx.tasks = [with_labels(t, "val", predictions(ctx, t, expo(ctx.finetuned[t.name], ctx.pretrained, 1.0)))
                 for t in ctx.tasks]
    result = ExPO(TaskArithmetic(lam=0.3), alpha=0.0, objective="val", step=0.5, bounds=(0.0, 1.0), budget=6).run(ctx)
    for name in ("t0", "t2"):  # the tiny random towers' predictions change with α on these two tasks
        search = result.extra["search"][name]
        assert search["score"] == 1.0 and search["evaluations"] <= 6
        assert search["history"][0]["alpha"] == 0.0
        assert search["history"][0]["score"] < 1.0 and result.extra["alpha_per_task"][name] > 0.0
    # on t1 every α predicts the same class: a tie never moves the search off its start
    assert result.extra["alpha_per_task"]["t1"] == 0.0 and result.extra["search"]["t1"]["score"] == 1.0
    models = {n: expo(ctx.finetuned[n], ctx.pretrained, result.extra["alpha_per_task"][n]) for n in ctx.task_names}
    assert_state_close(result.params, TaskArithmetic(lam=0.3).run(replace(ctx, finetuned=models)).params)


def test_extrapolation_merging_with_budget_one_at_alpha0_beta1_is_inner_method_on_first_candidates(ctx):
    result = ExtrapolationMerging(Ties(lam_grid=None), objective="val", start={"alpha": 0.0, "beta": 1.0},
                                  budget=1).run(ctx)
    expected = Ties(lam_grid=None).run(replace(ctx, finetuned=first_candidates(ctx)))
    assert_state_close(result.params, expected.params)
    assert all(s["evaluations"] == 1 for s in result.extra["search"].values())
    assert result.extra["beta_per_task"] == {"t0": 1.0, "t1": 1.0, "t2": 1.0}


def test_extrapolation_merging_search_picks_planted_better_point(ctx):
    # val labels of t0 are the predictions at (α, β) = (0.5, 0.5), two moves from the start (0, 1)
    first, second = ctx.pool.load_candidates("t0", ctx.pretrained)
    planted = extrapolation_merge(first, second, ctx.pretrained, alpha=0.5, beta=0.5)
    ctx.tasks[0] = with_labels(ctx.tasks[0], "val", predictions(ctx, ctx.tasks[0], planted))
    result = ExtrapolationMerging(TaskArithmetic(lam=0.3), objective="val", start={"alpha": 0.0, "beta": 1.0},
                                  step={"alpha": 0.5, "beta": 0.5}, budget=12).run(ctx)
    search = result.extra["search"]["t0"]
    assert search["history"][0]["score"] < 1.0 and search["score"] == 1.0
    alpha, beta = result.extra["alpha_per_task"]["t0"], result.extra["beta_per_task"]["t0"]
    assert beta < 1.0 and alpha > 0.0
    chosen = extrapolation_merge(first, second, ctx.pretrained, alpha, beta)
    assert accuracy(ctx.backbone.visual, chosen, ctx.heads["t0"], ctx.tasks[0], "val") == 1.0


def test_per_task_rows_keep_each_tasks_own_extrapolated_model(ctx):
    """merge: null (expo_per_task, extrapolation_merging_per_task): task k is scored with its own θₖ', which is
    exactly ExPO / Extrapolation Merging of its own checkpoints at the point searched for it; individual_best is the
    best candidate itself."""
    from adamerge.methods import IndividualBest
    ctx.tasks = [with_labels(t, "val", predictions(ctx, t, expo(ctx.finetuned[t.name], ctx.pretrained, 1.0)))
                 for t in ctx.tasks]
    result = ExPO(None, alpha=0.0, objective="val", step=0.5, bounds=(0.0, 1.0), budget=6).run(ctx)
    assert result.params is None and set(result.per_task) == set(ctx.task_names)
    for name in ctx.task_names:
        alpha = result.extra["alpha_per_task"][name]
        assert_state_close(result.per_task[name], expo(ctx.finetuned[name], ctx.pretrained, alpha), atol=0)
    assert result.extra["merge_method"] is None and result.extra["alpha_per_task"]["t0"] > 0.0
    em = ExtrapolationMerging(None, objective="val", start={"alpha": 0.25, "beta": 0.5}, budget=1).run(ctx)
    for name in ctx.task_names:
        first, second = ctx.pool.load_candidates(name, ctx.pretrained)
        assert_state_close(em.per_task[name], extrapolation_merge(first, second, ctx.pretrained, 0.25, 0.5), atol=0)
    best = IndividualBest().run(ctx)
    assert all(torch.equal(best.per_task[n][k], v) for n in ctx.task_names for k, v in first_candidates(ctx)[n].items())


def test_entropy_objective_reads_no_labels(ctx):
    method = ExtrapolationMerging(TaskArithmetic(lam=0.3), objective="entropy", budget=5)
    clean = method.run(ctx)
    # test labels garbage, no val split at all
    garbage = [replace(t, splits={"test": TensorImages(t.split("test").images, torch.full((24,), -7))}) for t in ctx.tasks]
    blind = method.run(replace(ctx, tasks=garbage))
    assert blind.extra["alpha_per_task"] == clean.extra["alpha_per_task"]
    assert blind.extra["beta_per_task"] == clean.extra["beta_per_task"]
    assert_state_close(blind.params, clean.params)
    assert clean.extra["search_objective"] == "entropy"
    assert all(s["score"] <= 0.0 and s["score"] >= s["history"][0]["score"] for s in clean.extra["search"].values())


def test_extrapolation_merging_names_missing_candidates(ctx):
    with pytest.raises(ValueError, match="pool.candidates"):
        ExtrapolationMerging(TaskArithmetic()).run(replace(ctx, pool=None))
    one_short = CheckpointPool(candidates={"t0": ctx.pool.candidates["t0"], "t1": ctx.pool.candidates["t1"][:1]})
    with pytest.raises(MissingCheckpointError, match=r"task 't1' needs 2 .* but 1 were found at pool.candidates.t1"):
        ExtrapolationMerging(TaskArithmetic()).run(replace(ctx, pool=one_short))


def planted_confidence(ctx):
    """Every task vector moves only ln_post's bias, along one direction whose features every head gives to its
    class 0: the further the merged bias goes, the surer (lower-entropy) every prediction — so AdaMerging's
    entropy gradient pushes those λ up."""
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    target = torch.nn.functional.normalize(direction @ ctx.pretrained["proj"], dim=0)
    heads, finetuned = {}, {}
    for name in ctx.task_names:
        heads[name] = ctx.heads[name].clone()
        heads[name][0] = 10.0 * target
        state = {k: v.clone() for k, v in ctx.pretrained.items()}
        state["ln_post.bias"] = state["ln_post.bias"] + 0.3 * direction
        finetuned[name] = state
    return replace(ctx, finetuned=finetuned, heads=heads)


@pytest.mark.parametrize("upper", [2.0, 1.0])
def test_learned_extrapolation_exceeds_one_only_when_the_bound_allows(ctx, upper):
    cfg = compose_cfg(["method=adamerging_extrapolation", f"method.clamp=[0.0,{upper}]", "method.init=0.9",
                       "method.batch_size=8", "method.batches_per_task=1", "optimizer.lr=0.1"])
    method = instantiate(cfg.method)
    assert method.clamp == (0.0, upper) and method.label.startswith("Layer-wise AdaMerging (λ ≤ ")
    ctx = planted_confidence(ctx)
    ctx.make_trainer = trainer_factory(ctx.run_dir, max_steps=5)
    result = method.run(ctx)
    lam = load_state_dict(ctx.run_dir / "coefficients.safetensors")["coefficients"]
    bias = list(ctx.pretrained).index("ln_post.bias")
    assert result.steps == 5
    assert float(lam.max()) <= upper
    if upper > 1.0:
        assert (lam[:, bias] > 1.0).all()  # every task's bias extrapolated past its fine-tuned value
    else:
        assert torch.allclose(lam[:, bias], torch.ones(3))  # pushed up against the clamp, never above 1


LABELS = {"expo": ("ExPO", "ExPO (α=0.5) + Task Arithmetic (λ=0.3)"),
          "extrapolation_merging": ("ExtrapolationMerging", "Extrapolation Merging (val) + Task Arithmetic (λ tuned on val)"),
          "extrapolation_merging_entropy": ("ExtrapolationMerging",
                                            "Extrapolation Merging (entropy) + Task Arithmetic (λ tuned on val)"),
          "adamerging_extrapolation": ("AdaMerging", "Layer-wise AdaMerging (λ ≤ 2.0, learned extrapolation)"),
          "adamerging_extrapolation_taskwise": ("AdaMerging", "Task-wise AdaMerging (λ ≤ 2.0, learned extrapolation)")}


@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_new_method_composes_and_instantiates(method):
    built = instantiate(compose_cfg([f"method={method}"]).method)
    assert (type(built).__name__, built.label) == LABELS[method]


@pytest.mark.parametrize("inner,cls", [("ties", "Ties"), ("adamerging_taskwise", "AdaMerging"),
                                       ("adamerging_extrapolation", "AdaMerging")])
def test_inner_method_is_chosen_as_a_config_group(inner, cls):
    cfg = compose_cfg(["method=extrapolation_merging", f"method@method.merge={inner}", "method.merge.label=inner"])
    method = instantiate(cfg.method)
    assert type(method.merge).__name__ == cls and method.label == "Extrapolation Merging (val) + inner"
    assert cfg.hydra.runtime.choices["method@method.merge"] == inner


def test_inner_method_given_as_a_string_is_refused_with_the_group_syntax():
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"method@method.merge=ties") as err:
        instantiate(compose_cfg(["method=expo", "method.merge=ties"]).method)
    assert isinstance(err.value.__cause__, TypeError)


@pytest.mark.slow
def test_extrapolation_merging_with_inner_adamerging_end_to_end(tmp_path, embedded_cache):
    adamerge(["experiment=smoke", "threads=1", "method=extrapolation_merging", "method@method.merge=adamerging_taskwise",
              "method.budget=3"], tmp_path, embedded_cache)
    (record,) = records(tmp_path, "smoke")
    assert record["method"] == "extrapolation_merging"
    assert record["label"] == "Extrapolation Merging (val) + Task-wise AdaMerging"
    extra = record["extra"]
    assert set(extra["alpha_per_task"]) == set(extra["beta_per_task"]) == set(record["tasks"])
    assert all(1 <= s["evaluations"] <= 3 for s in extra["search"].values())
    assert extra["steps"] == 5 and extra["coefficients_file"].endswith("coefficients.safetensors")
