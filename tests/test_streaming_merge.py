"""The streaming forms a model-directory merge uses, pinned to the in-memory definitions: the radix-select
threshold equals ``kthvalue`` of the concatenated magnitudes, the row-by-row TIES equals the stacked one, the
per-tensor scope equals TIES applied to each tensor alone, and reading a tensor leaves no file mapped."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adamerge.merging.dare import dare_tensor, dare_views, tensor_seed
from adamerge.merging.ties import kth_smallest_magnitude, ties_directions, ties_vector
from adamerge.model_dirs.layout import ModelDir


def vectors_with_ties(dtype=torch.float32, count=3, seed=0):
    """Task vectors whose magnitudes repeat (bf16-rounded), with exact zeros and sign conflicts."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": (40, 7), "b": (13,), "c": (5, 5, 3)}
    out = []
    for _ in range(count):
        v = {}
        for key, shape in shapes.items():
            x = torch.randn(shape, generator=gen).to(torch.bfloat16).to(dtype)
            x[torch.rand(shape, generator=gen) < 0.1] = 0
            v[key] = x
        out.append(v)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_radix_select_is_kthvalue(dtype):
    vector = vectors_with_ties(dtype)[0]
    flat = torch.cat([v.reshape(-1) for v in vector.values()])
    for rank in (1, 2, flat.numel() // 3, flat.numel() - 1, flat.numel()):
        want = flat.abs().kthvalue(rank).values
        got = kth_smallest_magnitude(lambda: iter(vector.values()), rank)
        assert got.dtype == dtype and torch.equal(got, want), (dtype, rank)
    with pytest.raises(ValueError, match="outside"):
        kth_smallest_magnitude(lambda: iter(vector.values()), flat.numel() + 1)


@pytest.mark.parametrize("merge", ["sum", "mean"])
@pytest.mark.parametrize("zero_sign", ["majority", "positive"])
@pytest.mark.parametrize("keep", [0.2, 0.5, 1.0])
def test_row_by_row_ties_is_the_stacked_ties(merge, zero_sign, keep):
    vectors = vectors_with_ties()
    expected = ties_vector(vectors, keep=keep, merge=merge, zero_sign=zero_sign)
    direction = ties_directions(vectors, keep, merge, zero_sign=zero_sign)
    for key, want in expected.items():
        assert torch.equal(direction(key), want), key


def test_zero_majority_keeps_negative_entries_in_both_forms():
    """Σ of signs 0 overall and per entry 0: the official code keeps the negative values; so does the stream."""
    vectors = [{"w": torch.tensor([1.0, -1.0, 2.0, -2.0])}, {"w": torch.tensor([-1.0, 1.0, -2.0, 2.0])}]
    want = ties_vector(vectors, keep=1.0, merge="sum")["w"]
    assert torch.equal(want, torch.tensor([-1.0, -1.0, -2.0, -2.0]))
    assert torch.equal(ties_directions(vectors, 1.0, "sum")("w"), want)


@pytest.mark.parametrize("rule", ["official", "exact_k"])
def test_tensor_scope_is_ties_of_each_tensor_alone(rule):
    vectors = vectors_with_ties()
    got = ties_vector(vectors, keep=0.3, merge="mean", trim_scope="tensor", trim_rule=rule, zero_sign="positive")
    streamed = ties_directions(vectors, 0.3, "mean", zero_sign="positive", trim_scope="tensor", trim_rule=rule)
    for key in vectors[0]:
        alone = [{key: v[key]} for v in vectors]
        if rule == "official":
            want = ties_vector(alone, keep=0.3, merge="mean", zero_sign="positive")[key]
        else:  # mergekit: exactly max(1, int(n k)) by argsort order, written out
            rows = []
            for v in alone:
                t = v[key]
                mask = torch.zeros(t.numel())
                mask[torch.argsort(t.abs().reshape(-1).float(), descending=True)[:max(1, int(0.3 * t.numel()))]] = 1
                rows.append(t * mask.view(t.shape))
            stack = torch.stack(rows)
            sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
            agree = (stack.sign() == sign).float()
            want = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        assert torch.equal(got[key], want), key
        assert torch.equal(streamed(key), want), key


def test_exact_k_needs_tensor_scope():
    with pytest.raises(ValueError, match="use it with trim_scope=tensor"):
        ties_vector(vectors_with_ties(), keep=0.2, trim_rule="exact_k")


def test_dare_views_give_the_same_mask_on_every_read_and_their_own_per_tensor_and_task():
    vectors = vectors_with_ties(count=2)
    views = dare_views(vectors, 0.5, seed=7)
    assert torch.equal(views[0]["a"], views[0]["a"])
    assert torch.equal(views[1]["a"], dare_tensor(vectors[1]["a"], 0.5, tensor_seed(7, "a", 1)))
    masks = [(views[k]["a"] != 0) | (vectors[k]["a"] == 0) for k in range(2)]
    assert not torch.equal(masks[0], masks[1])


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_reading_a_tensor_leaves_no_file_mapped(tmp_path):
    """A mapping left open keeps every page read in the resident set (cgroup / SLURM --mem limits count it):
    a tensor read from a model directory maps its file only while the tensor itself is alive."""
    import gc
    save_file({"w": torch.randn(256, 256), "b": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    model = ModelDir(tmp_path)
    assert not mapped(tmp_path / "model.safetensors")  # reading the header unmapped it again
    value = model.tensor("w").to(torch.float64)  # a converted copy: the file's pages are released at once
    gc.collect()
    assert value.shape == (256, 256) and not mapped(tmp_path / "model.safetensors")
    same = model.tensor("w")  # safetensors hands out the mapped bytes themselves (no copy) ...
    del same
    gc.collect()
    assert not mapped(tmp_path / "model.safetensors")  # ... and unmaps them with the tensor


def test_all_finite_is_the_elementwise_test():
    from adamerge.merging.task_vectors import all_finite
    big = torch.full((4,), 3e38)  # finite entries whose sum overflows: the fallback must say finite
    for value, want in [(torch.randn(10), True), (big, True), (torch.tensor([1.0, float("nan")]), False),
                        (torch.tensor([float("inf"), -float("inf")]), False), (torch.zeros(0), True),
                        (torch.tensor([1, 2]), True)]:
        assert all_finite(value) is want
