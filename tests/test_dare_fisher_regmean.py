"""DARE, Fisher merging and RegMean: identities of the math, the hooks on open_clip's tower, the methods end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from adamerge.data.task import Task, TensorImages
from adamerge.merging import (dare_merge, dare_task_vectors, diagonal_fisher, fisher_merge, task_arithmetic,
                              task_vector, ties_merge, weight_average)
from adamerge.merging.regmean import (OPEN_CLIP_INPUT_MAJOR, SingularGramError, collect_input_grams, reduce_off_diagonal,
                                      regmean_linear, regmean_merge)
from adamerge.methods import Dare, FisherMerging, MergeContext, RegMean, TaskArithmetic, Ties
from tests.cli_runner import adamerge, records
from tests.helpers import compose_cfg

NEW_METHODS = {"dare_task_arithmetic": Dare, "dare_ties": Dare, "fisher": FisherMerging, "regmean": RegMean}


def vectors_of(tiny_models):
    theta0, finetuned = tiny_models
    return theta0, [task_vector(ft, theta0) for ft in finetuned]


# ---------------------------------------------------------------- DARE

def test_dare_with_p_zero_is_its_base_method_exactly(tiny_models):
    theta0, vectors = vectors_of(tiny_models)
    ta, ties = task_arithmetic(theta0, vectors, 0.3), ties_merge(theta0, vectors, keep=0.2, lam=0.7)
    dare_ta = dare_merge(theta0, vectors, p=0.0, seed=3, base="task_arithmetic", lam=0.3)
    dare_ties = dare_merge(theta0, vectors, p=0.0, seed=3, base="ties", keep=0.2, lam=0.7)
    assert dare_ta.keys() == ta.keys() == theta0.keys()
    for key in theta0:
        assert torch.equal(dare_ta[key], ta[key]) and torch.equal(dare_ties[key], ties[key]), key


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_drops_a_fraction_p_and_rescales_survivors_exactly(p):
    n = 200_000
    tau = {"w": torch.randn(n, generator=torch.Generator().manual_seed(0))}
    (out,) = dare_task_vectors([tau], p, seed=1)
    kept = out["w"] != 0
    # kept count ~ Binomial(n, 1−p): 5 standard errors leave a false-failure rate below 1e-6
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(out["w"][kept], tau["w"][kept] / (1 - p))
    (drop_only,) = dare_task_vectors([tau], p, seed=1, rescale=False)
    torch.testing.assert_close(drop_only["w"], out["w"] * (1 - p))


def test_dare_merge_is_unbiased_for_task_arithmetic():
    """E[θ₀ + λ Σ DARE_p(τₖ)] = θ₀ + λ Σ τₖ; checked per entry with the exact variance λ² Σₖ τₖ² p/(1−p).

    The draws are a leading dimension of the tensors: every entry of every copy is dropped independently.
    """
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (40, 10), "b": (100,)}
    theta0 = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    vectors = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]
    p, lam, draws = 0.7, 0.4, 2000
    base = task_arithmetic(theta0, vectors, lam)
    copies = lambda sd: {k: v.expand(draws, *v.shape) for k, v in sd.items()}  # noqa: E731
    merged = dare_merge(copies(theta0), [copies(v) for v in vectors], p=p, seed=0, lam=lam)
    z = []
    for key in shapes:
        std = lam * torch.sqrt(sum(v[key] ** 2 for v in vectors) * p / (1 - p)) / math.sqrt(draws)
        z.append(((merged[key].mean(0) - base[key]) / std).reshape(-1))
    z = torch.cat(z)  # 500 approximately standard-normal statistics (CLT over 2000 draws)
    assert z.abs().max() < 5.5  # P(max of 500 |N(0,1)| > 5.5) < 2e-5
    assert abs(z.mean()) < 4 / math.sqrt(len(z))  # mean of 500 N(0,1): sd 0.045, 4σ band
    assert 0.75 < z.square().mean() < 1.25  # χ²₅₀₀/500: mean 1, sd 0.063, a 4σ band
    assert not torch.allclose(merged["a"][0], base["a"])  # single draws do differ from the base


def test_dare_is_deterministic_given_its_seed(tiny_models):
    theta0, vectors = vectors_of(tiny_models)
    a = dare_merge(theta0, vectors, p=0.5, seed=7, base="ties")
    b = dare_merge(theta0, vectors, p=0.5, seed=7, base="ties")
    c = dare_merge(theta0, vectors, p=0.5, seed=8, base="ties")
    assert all(torch.equal(a[k], b[k]) for k in theta0)
    assert any(not torch.equal(a[k], c[k]) for k in theta0)


def test_dare_rejects_bad_drop_rate_and_base():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dare_task_vectors([{"w": torch.ones(3)}], 1.0)
    with pytest.raises(ValueError, match="valid: task_arithmetic, ties"):
        Dare(base="magnitude")


# ---------------------------------------------------------------- Fisher merging

def random_models(n_models=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 4), "b": (6,)}
    models = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} | {"steps": torch.tensor(k)}
              for k in range(n_models)]
    return models, shapes, gen


def test_fisher_merge_with_equal_fishers_is_the_average():
    models, shapes, gen = random_models()
    fisher = {k: torch.rand(s, generator=gen) + 0.1 for k, s in shapes.items()}
    merged = fisher_merge(models, [fisher] * 3)
    average = weight_average(models)
    assert merged.keys() == average.keys()
    for key in shapes:
        torch.testing.assert_close(merged[key], average[key])
    assert merged["steps"] == 0  # integer buffers come from the first model


def test_fisher_merge_picks_the_model_whose_fisher_dominates_each_entry():
    models, shapes, gen = random_models()
    owner = {k: torch.randint(0, 3, s, generator=gen) for k, s in shapes.items()}
    fishers = [{k: (owner[k] == i).float() for k in shapes} for i in range(3)]
    picked = {k: torch.stack([m[k] for m in models]).gather(0, owner[k][None]).squeeze(0) for k in shapes}
    exact = fisher_merge(models, fishers, fallback="pretrained", pretrained=models[0])
    floored = fisher_merge(models, fishers, epsilon=1e-6)  # F + ε: off by at most ~ε·|θ|
    for key in shapes:
        torch.testing.assert_close(exact[key], picked[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(floored[key], picked[key], rtol=1e-5, atol=1e-5)


def test_fisher_merge_falls_back_where_no_model_has_information():
    models, shapes, _ = random_models()
    theta0 = {k: torch.full(s, 9.0) for k, s in shapes.items()}
    zero = [{k: torch.zeros(s) for k, s in shapes.items()}] * 3
    to_pretrained = fisher_merge(models, zero, fallback="pretrained", pretrained=theta0)
    to_average = fisher_merge(models, zero, fallback="average")
    for key in shapes:
        assert torch.equal(to_pretrained[key], theta0[key])
        torch.testing.assert_close(to_average[key], weight_average(models)[key])
    with pytest.raises(ValueError, match="pretrained=θ₀"):
        fisher_merge(models, zero, fallback="pretrained")


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_expected_fisher_of_softmax_regression_matches_the_closed_form(chunk_size):
    """For log p = log_softmax(x Wᵀ): Σ_y p_y (∂ log p_y / ∂W_cj)² = p_c (1 − p_c) x_j², averaged over examples."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=gen)
    batches = [torch.randn(4, 3, generator=gen), torch.randn(6, 3, generator=gen)]
    fisher = diagonal_fisher(lambda p, x: torch.log_softmax(x @ p["w"].T, -1), {"w": w}, batches,
                             chunk_size=chunk_size)
    x = torch.cat(batches)
    prob = torch.softmax(x @ w.T, -1)
    expected = torch.einsum("nc,nj->cj", prob * (1 - prob), x ** 2) / len(x)
    torch.testing.assert_close(fisher["w"], expected)


def test_sampled_fisher_is_seeded_and_estimates_the_expected_one():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=gen)
    x = torch.randn(3000, 3, generator=gen)
    fn = lambda p, x: torch.log_softmax(x @ p["w"].T, -1)  # noqa: E731
    batches = list(x.split(100))
    expected = diagonal_fisher(fn, {"w": w}, batches, chunk_size=400)["w"]
    sampled = diagonal_fisher(fn, {"w": w}, batches, mode="sampled", generator=torch.Generator().manual_seed(2),
                              chunk_size=100)["w"]
    again = diagonal_fisher(fn, {"w": w}, batches, mode="sampled", generator=torch.Generator().manual_seed(2),
                            chunk_size=100)["w"]
    assert torch.equal(sampled, again)
    # one label per example: unbiased; with 3000 examples the relative error of each entry is a few %
    assert ((sampled - expected).abs() / expected).max() < 0.15


# ---------------------------------------------------------------- RegMean

def test_regmean_of_two_linear_models_is_the_least_squares_merge():
    """min_W Σₖ ‖Xₖ Wᵀ − Xₖ Wₖᵀ‖² (one regression on the stacked data) = RegMean with α = 1 and Gₖ = XₖᵀXₖ."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=gen, dtype=torch.float64), torch.randn(25, 6, generator=gen, dtype=torch.float64)]
    ws = [torch.randn(3, 6, generator=gen, dtype=torch.float64) for _ in xs]
    targets = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    least_squares = torch.linalg.lstsq(torch.cat(xs), targets).solution.T
    merged = regmean_linear(ws, [x.T @ x for x in xs], alpha=1.0)
    torch.testing.assert_close(merged, least_squares)
    # the layout of x @ W (open_clip's proj) gives the transpose of the same answer
    torch.testing.assert_close(regmean_linear([w.T for w in ws], [x.T @ x for x in xs], alpha=1.0, input_major=True),
                               least_squares.T)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 0.9, 1.0])
def test_regmean_with_identical_grams_is_the_average(alpha):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=gen)
    ws = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    torch.testing.assert_close(regmean_linear(ws, [x.T @ x] * 3, alpha), torch.stack(ws).mean(0))


def test_regmean_alpha_zero_weights_each_input_column_by_its_diagonal():
    gen = torch.Generator().manual_seed(2)
    grams = [(lambda x: x.T @ x)(torch.randn(20, 4, generator=gen)) for _ in range(2)]
    ws = [torch.randn(3, 4, generator=gen) for _ in range(2)]
    d = [g.diagonal() for g in grams]
    torch.testing.assert_close(regmean_linear(ws, grams, alpha=0.0), (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1]))
    g = grams[0]
    reduced = reduce_off_diagonal(g, 0.9)
    torch.testing.assert_close(reduced.diagonal(), g.diagonal())
    torch.testing.assert_close(reduced - torch.diag(reduced.diagonal()), 0.9 * (g - torch.diag(g.diagonal())))


def test_regmean_merge_averages_non_linear_tensors_and_names_singular_layers():
    gen = torch.Generator().manual_seed(3)
    models = [{"lin": torch.randn(2, 3, generator=gen), "bias": torch.randn(2, generator=gen)} for _ in range(2)]
    x = torch.randn(10, 3, generator=gen)
    merged = regmean_merge(models, [{"lin": x.T @ x}] * 2)
    torch.testing.assert_close(merged["bias"], (models[0]["bias"] + models[1]["bias"]) / 2)
    with pytest.raises(SingularGramError, match="'lin'"):
        regmean_merge(models, [{"lin": torch.zeros(3, 3)}] * 2)


def test_grams_of_the_open_clip_tower_are_the_inputs_of_each_linear_map(tiny_backbone):
    """Every Gram equals Xᵀ X / rows of the tensor that really enters that map, recomputed by hand."""
    visual = tiny_backbone.visual.eval()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grams = collect_input_grams(visual, [x[:3], x[3:]])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in visual.modules())  # hooks removed

    seen = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
               for n, m in visual.named_modules() if n.endswith(("ln_1", "ln_2", "gelu", "transformer"))]
    with torch.no_grad():
        visual(x)
    for h in handles:
        h.remove()

    def gram(t):
        t = t.reshape(-1, t.shape[-1]).double()
        return (t.T @ t / t.shape[0]).float()

    for i, block in enumerate(visual.transformer.resblocks):
        prefix = f"transformer.resblocks.{i}."
        q = seen[prefix + "ln_1"]
        with torch.no_grad():  # self-attention by hand: softmax(QKᵀ/√d) V before out_proj
            qkv = q @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
            heads = block.attn.num_heads
            split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1)]
            attended = F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2)
        torch.testing.assert_close(grams[prefix + "attn.in_proj_weight"], gram(q))
        torch.testing.assert_close(grams[prefix + "attn.out_proj.weight"], gram(attended), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grams[prefix + "mlp.c_fc.weight"], gram(seen[prefix + "ln_2"]))
        torch.testing.assert_close(grams[prefix + "mlp.c_proj.weight"], gram(seen[prefix + "mlp.gelu"]))
    with torch.no_grad():
        pooled = visual.ln_post(seen["transformer"])[:, 0]
    torch.testing.assert_close(grams["proj"], gram(pooled))
    assert len(grams) == 4 * len(visual.transformer.resblocks) + 1


# ---------------------------------------------------------------- the methods end to end on the tiny tower

def make_tasks(n_tasks=3, n=12, classes=4):
    gen = torch.Generator().manual_seed(5)
    return [Task(f"t{i}", [f"c{j}" for j in range(classes)], ["a {}"],
                 {s: TensorImages(torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, classes, (n,), generator=gen))
                  for s in ("val", "test")})
            for i in range(n_tasks)]


@pytest.fixture()
def ctx(tiny_backbone, tiny_models, tmp_path):
    theta0, finetuned = tiny_models
    tasks = make_tasks()
    heads = {t.name: torch.randn(4, 32, generator=torch.Generator().manual_seed(i)) * 5 for i, t in enumerate(tasks)}
    return MergeContext(backbone=tiny_backbone, tasks=tasks, pretrained=theta0,
                        finetuned={t.name: f for t, f in zip(tasks, finetuned)}, heads=heads, run_dir=tmp_path)


METHODS = {
    "dare_task_arithmetic": lambda: Dare(p=0.5, base="task_arithmetic"),
    "dare_ties_val": lambda: Dare(p=0.5, base="ties", lam_grid=[0.5, 1.0]),
    "fisher_expected": lambda: FisherMerging(num_examples=6, batch_size=4),
    "fisher_sampled_val": lambda: FisherMerging(split="val", num_examples=6, batch_size=4, mode="sampled",
                                                fallback="pretrained", normalize=True),
    "regmean": lambda: RegMean(num_examples=6, batch_size=4),
    "regmean_val": lambda: RegMean(alpha=0.6, split="val", num_examples=6, batch_size=4),
}


@pytest.mark.parametrize("name", METHODS)
def test_method_runs_end_to_end_with_every_tensor_finite(ctx, name):
    result = METHODS[name]().run(ctx)
    assert result.params.keys() == ctx.pretrained.keys()
    for key, value in result.params.items():
        assert value.shape == ctx.pretrained[key].shape and torch.isfinite(value).all(), key
    accuracy = ctx.evaluate(result.params)
    assert set(accuracy) == set(ctx.task_names) and all(0.0 <= a <= 1.0 for a in accuracy.values())


def test_dare_methods_at_p_zero_are_task_arithmetic_and_ties(ctx):
    ta, dare_ta = TaskArithmetic(lam=0.3).run(ctx).params, Dare(p=0.0, lam=0.3).run(ctx).params
    ties, dare_ties = Ties(lam=1.0, merge="mean").run(ctx).params, Dare(p=0.0, base="ties", lam=1.0).run(ctx).params
    assert all(torch.equal(ta[k], dare_ta[k]) and torch.equal(ties[k], dare_ties[k]) for k in ta)


@pytest.mark.parametrize("method", [lambda: FisherMerging(num_examples=4, batch_size=4),
                                    lambda: RegMean(num_examples=4, batch_size=4)])
def test_data_based_merges_of_identical_models_return_that_model(ctx, method):
    """Σ Fθ/Σ F and (Σ G)⁻¹ Σ G Wᵀ both reduce to θ when every θₖ is the same — transposes included."""
    same = ctx.finetuned["t0"]
    ctx.finetuned = {n: same for n in ctx.task_names}
    merged = method().run(ctx).params
    for key, value in same.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-5)


def test_data_based_merges_never_read_labels_and_leave_the_backbone_untouched(ctx):
    before = {k: v.clone() for k, v in ctx.backbone.visual.state_dict().items()}
    reference = RegMean(num_examples=6, batch_size=4).run(ctx).params
    fisher = FisherMerging(num_examples=6, batch_size=4).run(ctx).params
    for task in ctx.tasks:  # scramble every label: the merges must not change
        test = task.splits["test"]
        task.splits["test"] = TensorImages(test.images, torch.full_like(test.labels, -7))
    assert all(torch.equal(reference[k], v) for k, v in RegMean(num_examples=6, batch_size=4).run(ctx).params.items())
    assert all(torch.equal(fisher[k], v) for k, v in FisherMerging(num_examples=6, batch_size=4).run(ctx).params.items())
    assert all(torch.equal(before[k], v) for k, v in ctx.backbone.visual.state_dict().items())


def test_regmean_solves_open_clips_proj_as_the_input_major_map_it_is():
    """open_clip applies ``pooled @ proj`` (in × out): RegMean's closed form for it is (Σ G)⁻¹ Σ G P, with the Gram
    of the pooled features, not the transposed form of an nn.Linear weight."""
    gen = torch.Generator().manual_seed(0)
    projections = [torch.randn(6, 4, generator=gen) for _ in range(2)]
    inputs = [torch.randn(20, 6, generator=gen) for _ in range(2)]
    grams = [x.T @ x / len(x) for x in inputs]
    want = torch.linalg.solve((grams[0] + grams[1]).double(),
                              (grams[0] @ projections[0] + grams[1] @ projections[1]).double()).float()
    merged = regmean_merge([{"proj": p} for p in projections], [{"proj": g} for g in grams], alpha=1.0,
                           input_major=OPEN_CLIP_INPUT_MAJOR)
    torch.testing.assert_close(merged["proj"], want, atol=1e-5, rtol=1e-5)
    # read as out × in (the nn.Linear convention), proj's Gram fits none of its dimensions: refused, named
    with pytest.raises(ValueError, match="input_major"):
        regmean_merge([{"proj": p} for p in projections], [{"proj": g} for g in grams], alpha=1.0)


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_config_composes_and_instantiates(method):
    cfg = compose_cfg([f"method={method}"])
    built = instantiate(cfg.method)
    labels = {"dare_task_arithmetic": "DARE + Task Arithmetic", "dare_ties": "DARE + TIES-Merging",
              "fisher": "Fisher Merging", "regmean": "RegMean"}
    assert isinstance(built, NEW_METHODS[method]) and built.label == labels[method]
    if method.startswith("dare"):
        assert built.base == ("ties" if method == "dare_ties" else "task_arithmetic") and built.p == 0.5


def test_config_options_reach_the_method():
    built = instantiate(compose_cfg(["method=fisher", "method.split=val", "method.num_examples=8",
                                     "method.mode=sampled"]).method)
    assert (built.split, built.num_examples, built.mode) == ("val", 8, "sampled")
    assert instantiate(compose_cfg(["method=regmean", "method.alpha=0.6"]).method).alpha == 0.6


@pytest.mark.slow
def test_new_methods_run_from_the_command_line(tmp_path, embedded_cache):
    adamerge(["-m", "experiment=smoke", "threads=1", "method=dare_task_arithmetic,fisher,regmean"],
             tmp_path, embedded_cache)
    runs = records(tmp_path, "smoke")
    assert [r["method"] for r in runs] == ["dare_task_arithmetic", "fisher", "regmean"]
    for run in runs:
        assert set(run["accuracy"]) == set(run["tasks"]) and len(run["tasks"]) >= 6
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values())
