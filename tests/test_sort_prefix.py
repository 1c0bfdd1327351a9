"""The sort-free first-k set used by mergekit-convention TIES equals ``torch.argsort(x, descending=True)[:k]``.

Two references written here: ``torch.argsort`` itself (what mergekit calls), and libstdc++'s ``std::sort``
written out in Python from its definition (introsort: median of three moved to the front, unguarded Hoare
partition, depth limit 2·⌊log₂ n⌋, final insertion sort), which pins the premise the replay rests on."""

import logging

import pytest
import torch

from adamerge.merging import sort_prefix
from adamerge.merging.sort_prefix import argsort_mask, first_k_mask, replay


def bf16_magnitudes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.01).bfloat16()
    tuned = (base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16()
    return (tuned - base).abs().float()


def levels(n: int, seed: int, count: int) -> torch.Tensor:
    return torch.randint(0, count, (n,), generator=torch.Generator().manual_seed(seed)).float()


def libstdcxx_sort_order(x: list[float]) -> list[int]:
    """std::sort of (value, index) pairs with comp(a, b) = a.value > b.value, as libstdc++ writes it."""
    arr = [(v, i) for i, v in enumerate(x)]
    comp = lambda a, b: a[0] > b[0]  # noqa: E731

    def median_to_first(result, a, b, c):
        if comp(arr[a], arr[b]):
            s = b if comp(arr[b], arr[c]) else (c if comp(arr[a], arr[c]) else a)
        elif comp(arr[a], arr[c]):
            s = a
        else:
            s = c if comp(arr[b], arr[c]) else b
        arr[result], arr[s] = arr[s], arr[result]

    def partition(first, last, pivot):
        while True:
            while comp(arr[first], arr[pivot]):
                first += 1
            last -= 1
            while comp(arr[pivot], arr[last]):
                last -= 1
            if not first < last:
                return first
            arr[first], arr[last] = arr[last], arr[first]
            first += 1

    def introsort(first, last, depth):
        while last - first > 16:
            assert depth > 0, "heapsort branch not written out: pick another input"
            depth -= 1
            median_to_first(first, first + 1, first + (last - first) // 2, last - 1)
            cut = partition(first + 1, last, first)
            introsort(cut, last, depth)
            last = cut

    def insertion(first, last, guarded):
        for i in range(first + 1 if guarded else first, last):
            val, j = arr[i], i
            while (j > first or not guarded) and comp(val, arr[j - 1]):
                arr[j] = arr[j - 1]
                j -= 1
            arr[j] = val

    n = len(arr)
    if n > 1:
        introsort(0, n, 2 * (n.bit_length() - 1))
        insertion(0, min(n, 16), guarded=True)
        insertion(16, n, guarded=False)
    return [i for _, i in arr]


@pytest.mark.parametrize("n,count", [(17, 2), (40, 3), (300, 7), (1000, 2), (2500, 50)])
def test_torch_cpu_sort_is_libstdcxx_introsort(n, count):
    """The premise: torch's unstable CPU argsort orders ties exactly as std::sort does."""
    x = levels(n, seed=n, count=count)
    assert libstdcxx_sort_order(x.tolist()) == torch.argsort(x, descending=True).tolist()


CASES = [(bf16_magnitudes, n) for n in (17, 18, 100, 5_000, 70_000, 300_001)] + \
        [(lambda n, s: levels(n, s, 1), 1000), (lambda n, s: levels(n, s, 3), 200_000),
         (lambda n, s: levels(n, s, 100), 131_073), (lambda n, s: torch.rand(n, generator=torch.Generator().manual_seed(s)), 99_999)]


@pytest.mark.parametrize("make,n", CASES)
def test_replay_picks_the_argsort_set(make, n):
    x = make(n, 7)
    for k in sorted({1, 2, 15, 16, 17, n // 5, n // 2, n - 17, n - 1} & set(range(1, n))):
        got = replay(x.clone(), k)
        assert got is not None
        assert int(got.sum()) == k
        assert torch.equal(got, argsort_mask(x, k)), (n, k)


def test_first_k_mask_edges_and_fallbacks():
    x = bf16_magnitudes(5_000, 3)
    assert first_k_mask(x, 0).sum() == 0 and first_k_mask(x, 5_000).all() and first_k_mask(x, 9_999).all()
    with_nan = x.clone()
    with_nan[::7] = float("nan")  # std::sort's NaN ordering is not replayed: argsort decides
    assert torch.equal(first_k_mask(with_nan, 1_000), argsort_mask(with_nan, 1_000))
    double = x.double()
    assert torch.equal(first_k_mask(double, 1_000), argsort_mask(double, 1_000))


def test_depth_limit_hands_over_to_argsort(monkeypatch):
    x = bf16_magnitudes(70_000, 5)
    assert replay(x.clone(), 14_000, depth=2) is None  # where std::sort would turn to heapsort
    monkeypatch.setattr(sort_prefix, "replay", lambda vals, k: None)
    assert torch.equal(first_k_mask(x, 14_000), argsort_mask(x, 14_000))


def test_a_different_sort_is_detected(monkeypatch, caplog):
    """A torch whose CPU sort is another algorithm (e.g. libc++'s) must not get the replay."""
    monkeypatch.setattr(sort_prefix, "argsort_mask", argsort_mask_stable)
    with caplog.at_level(logging.WARNING, logger="adamerge.merging.sort_prefix"):
        assert sort_prefix.replay_agrees.__wrapped__() is False
    assert "falls back to a full argsort" in caplog.text


def argsort_mask_stable(x: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[torch.argsort(x, descending=True, stable=True)[:k]] = True
    return mask
