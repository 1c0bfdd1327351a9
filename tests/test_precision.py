"""Half precision: half-size task vectors and mixed-precision adaptation stay close to float32."""

import pytest
import torch
from safetensors.torch import load_file

from adamerge.merging import StackedTaskVectors
from adamerge.methods import AdaMerging
from tests.helpers import adam


def stacks(tiny_models, dtype):
    theta0, ft = tiny_models
    return StackedTaskVectors.from_state_dicts(theta0, ft, dtype=dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_storage_halves_memory_and_merges_within_rounding(tiny_models, dtype):
    full, half = stacks(tiny_models, None), stacks(tiny_models, dtype)
    assert half.nbytes() * 2 == full.nbytes()
    lam = torch.rand(full.num_tasks, full.num_layers, generator=torch.Generator().manual_seed(0))
    eps = torch.finfo(getattr(torch, dtype)).eps
    exact, approx = full.merge(lam), half.merge(lam)
    for i, key in enumerate(full.keys):
        bound = eps * (lam[:, i, None].abs() * full.vector(i).flatten(1).abs()).sum(0).reshape(exact[key].shape)
        assert approx[key].dtype == exact[key].dtype == torch.float32
        assert ((approx[key] - exact[key]).abs() <= bound + 1e-7).all(), key


def test_merge_ignores_autocast_so_coefficients_keep_full_precision(tiny_models):
    stacked = stacks(tiny_models, "bfloat16")
    lam = torch.full((stacked.num_tasks, stacked.num_layers), 0.3, requires_grad=True)
    plain = stacked.merge(lam)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = stacked.merge(lam + 1e-4)  # an update far below bf16's resolution at 0.3 (~1e-3)
    for key in plain:
        assert inside[key].dtype == torch.float32
    moved = [key for key in plain if not torch.equal(inside[key], plain[key])]
    assert len(moved) == len(plain)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_merge_saves_no_float32_copy_of_the_vectors_and_has_the_same_gradient(tiny_models, dtype):
    """What the merge keeps for backward is the stored half-precision τ itself, never a float32 copy of it
    (that copy, alive until backward, would undo half the memory saving); λ's gradient is unchanged."""
    half = stacks(tiny_models, dtype)
    lam = torch.rand(half.num_tasks, half.num_layers, generator=torch.Generator().manual_seed(1), requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        merged = half.merge(lam)
    stored = {half.vector(i).data_ptr() for i in range(half.num_layers)}
    big = [(d, n) for d, n, ptr in saved if n > half.num_tasks * 4 and ptr not in stored]
    assert not big, f"tensors saved for backward besides the stored vectors: {big[:5]}"
    keys = list(merged)
    upstream = [torch.randn(merged[k].shape, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(keys)]
    (grad,) = torch.autograd.grad([merged[k] for k in keys], [lam], upstream)
    # the same function by plain autograd over explicitly upcast vectors
    lam2 = lam.detach().clone().requires_grad_()
    plain = {k: half.base(i) + torch.tensordot(lam2[:, i], half.vector(i).float(), dims=1) for i, k in enumerate(keys)}
    (grad2,) = torch.autograd.grad([plain[k] for k in keys], [lam2], upstream)
    for i, k in enumerate(keys):
        assert torch.equal(merged[k], plain[k]), k
    torch.testing.assert_close(grad, grad2, rtol=1e-6, atol=1e-6)


def test_unknown_vector_dtype_lists_valid_ones():
    with pytest.raises(ValueError, match="bfloat16"):
        AdaMerging(adam(), vector_dtype="float8")


@pytest.mark.parametrize("forward_mode", ["concat", "per_task"])
def test_bf16_mixed_adaptation_tracks_float32(ctx, forward_mode):  # noqa: F811
    import lightning as L

    def trainer(precision):
        return lambda: L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, precision=precision, default_root_dir=ctx.run_dir)

    runs = {}
    for precision, dtype in (("32-true", None), ("bf16-mixed", "bfloat16")):
        ctx.make_trainer = trainer(precision)
        result = AdaMerging(adam(), batch_size=8, forward_mode=forward_mode, vector_dtype=dtype).run(ctx)
        assert result.extra["task_vector_bytes"] > 0
        runs[precision] = (load_file(ctx.run_dir / "coefficients.safetensors")["coefficients"],
                           result.extra["task_vector_bytes"])
    (lam32, bytes32), (lam16, bytes16) = runs["32-true"], runs["bf16-mixed"]
    assert bytes16 * 2 == bytes32
    assert torch.isfinite(lam16).all()
    start = torch.full_like(lam32, 0.3)
    # Same direction of travel: the mixed-precision run moves λ like the float32 run does.
    cos = torch.nn.functional.cosine_similarity((lam16 - start).flatten(), (lam32 - start).flatten(), dim=0)
    assert cos > 0.9, float(cos)
