"""The mathematical identities that pin every merge method to its paper definition."""

import pytest
import torch
from torch.func import functional_call

from adamerge.merging import (CheckpointMismatchError, MergeCoefficients, StackedTaskVectors, elect_sign,
                              entropy_loss, task_arithmetic, task_vector, ties_merge, ties_task_vectors,
                              trim_top_k, weight_average)
from adamerge.merging.ties import flatten
from tests.helpers import assert_state_close


def vectors_of(theta0, finetuned):
    return [task_vector(ft, theta0) for ft in finetuned]


def test_task_arithmetic_at_zero_is_pretrained(tiny_models):
    theta0, ft = tiny_models
    assert_state_close(task_arithmetic(theta0, vectors_of(theta0, ft), lam=0.0), theta0)


def test_task_arithmetic_one_task_at_one_is_finetuned(tiny_models):
    theta0, ft = tiny_models
    assert_state_close(task_arithmetic(theta0, vectors_of(theta0, ft[:1]), lam=1.0), ft[0])


def test_task_arithmetic_formula(tiny_models):
    theta0, ft = tiny_models
    merged = task_arithmetic(theta0, vectors_of(theta0, ft), lam=0.3)
    for k in theta0:
        expected = theta0[k] + 0.3 * sum(f[k] - theta0[k] for f in ft)
        torch.testing.assert_close(merged[k], expected, atol=1e-6, rtol=0)


def test_weight_average_is_mean_and_equals_ta_at_one_over_k(tiny_models):
    theta0, ft = tiny_models
    avg = weight_average(ft)
    assert_state_close(avg, task_arithmetic(theta0, vectors_of(theta0, ft), lam=1 / 3), atol=1e-5)


def agreeing_vectors(theta0, k=3):
    """Task vectors whose every entry is non-zero and has the same sign across tasks."""
    gen = torch.Generator().manual_seed(2)
    signs = {key: torch.where(torch.rand(v.shape, generator=gen) > 0.5, 1.0, -1.0) for key, v in theta0.items()}
    return [{key: signs[key] * (0.01 + torch.rand(v.shape, generator=gen)) for key, v in theta0.items()}
            for _ in range(k)]


def test_ties_without_trimming_or_conflict_is_task_arithmetic_sum(tiny_models):
    theta0, _ = tiny_models
    tvs = agreeing_vectors(theta0)
    assert_state_close(ties_merge(theta0, tvs, keep=1.0, lam=0.3, merge="sum"), task_arithmetic(theta0, tvs, 0.3), atol=1e-5)


def test_ties_mean_without_trimming_or_conflict_is_ta_over_k(tiny_models):
    theta0, _ = tiny_models
    tvs = agreeing_vectors(theta0)
    assert_state_close(ties_merge(theta0, tvs, keep=1.0, lam=0.9, merge="mean"), task_arithmetic(theta0, tvs, 0.3), atol=1e-5)


def test_trim_keeps_top_fraction_of_whole_flattened_vector():
    """Official rule: |τ| ≥ kthvalue(|τ|, n − int(n·k)), i.e. int(10·0.3) + 1 = 4 of 10 distinct entries."""
    flat = torch.tensor([[0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, -1.0, 0.05, 3.0]])
    trimmed = trim_top_k(flat, keep=0.3)
    assert torch.equal(trimmed, torch.tensor([[0.0, -5.0, 0, 2.0, 0, 0, 4.0, 0, 0, 3.0]]))
    tied = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5]])  # every entry tied with the threshold survives
    assert torch.equal(trim_top_k(tied, keep=0.2), tied * torch.tensor([[1.0, 1, 1, 1, 0]]))


def test_elect_sign_by_sum_and_disjoint_mean():
    tvs = [{"w": torch.tensor([1.0, -3.0, 2.0])}, {"w": torch.tensor([-2.0, 1.0, 2.0])}]
    flat, _, _ = flatten(tvs)
    assert torch.equal(elect_sign(flat), torch.tensor([-1.0, -1.0, 1.0]))
    merged = ties_merge({"w": torch.zeros(3)}, tvs, keep=1.0, lam=1.0, merge="mean")
    assert torch.equal(merged["w"], torch.tensor([-2.0, -3.0, 2.0]))
    merged_sum = ties_merge({"w": torch.zeros(3)}, tvs, keep=1.0, lam=1.0, merge="sum")
    assert torch.equal(merged_sum["w"], torch.tensor([-2.0, -3.0, 4.0]))


def test_ties_task_vectors_keep_only_agreeing_entries():
    tvs = [{"w": torch.tensor([1.0, -3.0, 2.0])}, {"w": torch.tensor([-2.0, 1.0, 2.0])}]
    out = ties_task_vectors(tvs, keep=1.0)
    assert torch.equal(out[0]["w"], torch.tensor([0.0, -3.0, 2.0]))
    assert torch.equal(out[1]["w"], torch.tensor([-2.0, 0.0, 2.0]))


def _ties_on_the_flat_matrix(vectors, keep, merge=None):
    """TIES as its definition reads: flatten all K vectors into [K, P], trim, elect, mask (the reference)."""
    from adamerge.merging.ties import agreeing, unflatten

    flat, keys, shapes = flatten(vectors)
    trimmed = trim_top_k(flat, keep)
    mask = agreeing(trimmed, elect_sign(trimmed))
    if merge is None:
        return [unflatten(row, keys, shapes) for row in trimmed * mask]
    total = (trimmed * mask).sum(0)
    return unflatten(total / mask.sum(0).clamp(min=1) if merge == "mean" else total, keys, shapes)


@pytest.mark.parametrize("keep", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_tensor_by_tensor_ties_equals_the_flattened_definition(keep, majority):
    """ties_by_key never builds the [K, P] matrix; it must give the same numbers, including the global
    majority sign that breaks exact ties (entries whose trimmed values cancel)."""
    from adamerge.merging import ties_vector
    from adamerge.merging.ties import ties_by_key

    gen = torch.Generator().manual_seed(int(10 * keep) + (majority > 0))
    vectors = [{"a": torch.randn(7, 5, generator=gen), "b": torch.randn(11, generator=gen),
                "c": torch.randn(3, 4, 2, generator=gen)} for _ in range(4)]
    for v in vectors[:2]:  # exact cancellation in 'b'[:6] (large: survives trimming); the rest of 'b' votes
        v["b"][:6] = 50.0
    vectors[1]["b"][:6] = -50.0
    vectors[2]["b"][:6] = vectors[3]["b"][:6] = 0.0
    for v in vectors:
        v["b"][6:] = majority * 40.0
        v["d"] = torch.full((40,), majority * 40.0)  # many same-sign votes fix the overall majority
    expected = _ties_on_the_flat_matrix(vectors, keep)
    for got, want in zip(ties_task_vectors(vectors, keep), expected):
        assert_state_close(got, want, atol=0)
    for merge in ("mean", "sum"):
        assert_state_close(ties_vector(vectors, keep, merge), _ties_on_the_flat_matrix(vectors, keep, merge), atol=0)
    masks = {key: mask for key, _, mask in ties_by_key(vectors, keep)}
    # the cancelled entries take the majority's sign: only the vector with that sign keeps them
    assert masks["b"][:2, :6].tolist() == [[majority > 0] * 6, [majority < 0] * 6]


def test_stacked_vectors_built_tensor_by_tensor_equal_the_explicit_stack(tiny_models):
    theta0, ft = tiny_models
    explicit = vectors_of(theta0, ft)
    stacked = StackedTaskVectors.from_state_dicts(theta0, ft)
    assert stacked.keys == list(explicit[0])
    for i, key in enumerate(stacked.keys):
        assert torch.equal(stacked.vector(i), torch.stack([v[key] for v in explicit]))
    plus = StackedTaskVectors.from_state_dicts(theta0, ft, ties_keep=0.2)
    for i, key in enumerate(plus.keys):
        assert torch.equal(plus.vector(i), torch.stack([v[key] for v in _ties_on_the_flat_matrix(explicit, 0.2)]))
    with pytest.raises(ValueError, match="2 task vectors but 1 task names"):
        StackedTaskVectors.from_state_dicts(theta0, ft[:2], ["only"])


def test_unknown_ties_merge_function_lists_valid():
    with pytest.raises(ValueError, match="mean, sum"):
        ties_merge({"w": torch.zeros(1)}, [{"w": torch.ones(1)}], merge="max")


def test_layerwise_with_equal_coefficients_gives_task_arithmetic_outputs(tiny_backbone, tiny_models):
    theta0, ft = tiny_models
    stacked = StackedTaskVectors.from_state_dicts(theta0, ft)
    coeffs = MergeCoefficients(3, stacked.num_layers, granularity="layer", init=0.37)
    images = torch.randn(4, 3, 16, 16)
    visual = tiny_backbone.visual
    out_lw = functional_call(visual, stacked.merge(coeffs()), (images,))
    out_ta = functional_call(visual, task_arithmetic(theta0, vectors_of(theta0, ft), 0.37), (images,))
    torch.testing.assert_close(out_lw, out_ta, atol=1e-5, rtol=1e-5)


def test_taskwise_equals_layerwise_with_tied_coefficients(tiny_models):
    theta0, ft = tiny_models
    stacked = StackedTaskVectors.from_state_dicts(theta0, ft)
    tw = MergeCoefficients(3, stacked.num_layers, granularity="task")
    with torch.no_grad():
        tw.raw.copy_(torch.tensor([0.1, 0.5, 0.9]))
    lw = MergeCoefficients(3, stacked.num_layers, granularity="layer")
    with torch.no_grad():
        lw.raw.copy_(torch.tensor([0.1, 0.5, 0.9])[:, None].expand_as(lw.raw))
    assert_state_close(stacked.merge(tw()), stacked.merge(lw()))


def test_adamerging_plus_plus_uses_ties_trimmed_vectors(tiny_models):
    theta0, ft = tiny_models
    plain = StackedTaskVectors.from_state_dicts(theta0, ft)
    trimmed = StackedTaskVectors.from_state_dicts(theta0, ft, ties_keep=0.2)
    nonzero = sum(int((trimmed.vector(i) != 0).sum()) for i in range(trimmed.num_layers))
    total = sum(plain.vector(i).numel() for i in range(plain.num_layers))
    assert 0 < nonzero <= 0.2 * total + 3
    expected = ties_task_vectors(vectors_of(theta0, ft), keep=0.2)
    for i, key in enumerate(trimmed.keys):
        assert torch.equal(trimmed.vector(i), torch.stack([e[key] for e in expected]))


def test_every_coefficient_gets_a_gradient(tiny_backbone, tiny_models):
    theta0, ft = tiny_models
    stacked = StackedTaskVectors.from_state_dicts(theta0, ft)
    coeffs = MergeCoefficients(3, stacked.num_layers, granularity="layer")
    head = torch.randn(5, 32)
    feats = functional_call(tiny_backbone.visual, stacked.merge(coeffs()), (torch.randn(8, 3, 16, 16),))
    entropy_loss(torch.nn.functional.normalize(feats, dim=-1) @ head.T * 10).backward()
    assert coeffs.raw.grad is not None
    assert (coeffs.raw.grad != 0).all(), f"{int((coeffs.raw.grad == 0).sum())} coefficients got no gradient"


def test_entropy_decreases_on_fixed_batches(tiny_backbone, tiny_models):
    theta0, ft = tiny_models
    stacked = StackedTaskVectors.from_state_dicts(theta0, ft)
    coeffs = MergeCoefficients(3, stacked.num_layers, granularity="layer")
    opt = torch.optim.Adam(coeffs.parameters(), lr=1e-2)
    head = torch.randn(5, 32)
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(8):
        feats = functional_call(tiny_backbone.visual, stacked.merge(coeffs()), (images,))
        loss = entropy_loss(torch.nn.functional.normalize(feats, dim=-1) @ head.T * 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_clamp_keeps_coefficients_in_unit_interval_and_counts_bounds():
    coeffs = MergeCoefficients(2, 3, granularity="layer")
    with torch.no_grad():
        coeffs.raw.copy_(torch.tensor([[-0.5, 0.5, 1.5], [0.2, 1.0, 0.3]]))
    lam = coeffs()
    assert lam.min() >= 0 and lam.max() <= 1
    assert coeffs.at_bounds() == 3
    free = MergeCoefficients(2, 3, granularity="layer", clamp=None)
    with torch.no_grad():
        free.raw.fill_(1.7)
    assert torch.all(free() == 1.7) and free.at_bounds() == 0


def test_entropy_loss_values():
    uniform = torch.zeros(4, 10)
    torch.testing.assert_close(entropy_loss(uniform), torch.log(torch.tensor(10.0)))
    confident = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy_loss(confident).item() < 1e-6


def test_layerwise_count_is_152_for_vit_b32_vision_tower():
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-32", pretrained=None, device="meta")
    state = model.visual.state_dict()
    stacked_keys = [k for k, v in state.items() if v.is_floating_point()]
    assert len(stacked_keys) == 152
    assert MergeCoefficients(8, len(stacked_keys)).raw.shape == (8, 152)


def test_mismatched_checkpoint_names_the_tensors(tiny_models):
    theta0, ft = tiny_models
    bad = dict(ft[0])
    bad.pop("conv1.weight")
    bad["transformer.resblocks.9.mlp.c_fc.weight"] = torch.zeros(1)
    bad["proj"] = torch.zeros(7, 7)
    with pytest.raises(CheckpointMismatchError) as err:
        task_vector(bad, theta0, source="cars.safetensors")
    msg = str(err.value)
    assert "cars.safetensors" in msg and "conv1.weight" in msg
    assert "transformer.resblocks.9.mlp.c_fc.weight" in msg and "proj (7, 7)" in msg


def test_integer_buffers_are_untouched():
    theta0 = {"w": torch.zeros(2), "steps": torch.tensor([5])}
    ft = [{"w": torch.ones(2), "steps": torch.tensor([9])}]
    merged = task_arithmetic(theta0, [task_vector(f, theta0) for f in ft], lam=0.5)
    assert torch.equal(merged["steps"], torch.tensor([5]))
    assert torch.equal(merged["w"], torch.full((2,), 0.5))


def test_fused_merge_equals_the_naive_loop_in_value_and_gradient(tiny_models):
    theta0, ft = tiny_models
    vectors = vectors_of(theta0, ft)
    stacked = StackedTaskVectors.from_state_dicts(theta0, ft)
    lam = torch.rand(len(ft), stacked.num_layers, generator=torch.Generator().manual_seed(7), requires_grad=True)
    fused = stacked.merge(lam)
    naive = {}
    for layer, key in enumerate(stacked.keys):  # θ₀ˡ + Σₖ λₖˡ τₖˡ, one tensor and one task at a time
        naive[key] = theta0[key] + sum(lam[k, layer] * vectors[k][key] for k in range(len(ft)))
    for key in stacked.keys:
        torch.testing.assert_close(fused[key], naive[key], atol=1e-6, rtol=0)
    weights = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in enumerate(naive.items())}
    (grad_fused,) = torch.autograd.grad(sum((fused[k] * w).sum() for k, w in weights.items()), lam)
    (grad_naive,) = torch.autograd.grad(sum((naive[k] * w).sum() for k, w in weights.items()), lam)
    torch.testing.assert_close(grad_fused, grad_naive, atol=1e-4, rtol=1e-5)
