"""ExPO and Extrapolation Merging pinned to their formulas; the local search finds planted optima."""

import pytest
import torch

from adamerge.merging import task_arithmetic, task_vector
from adamerge.merging.extrapolation import expo, extrapolation_merge, interpolate
from adamerge.search import local_search
from tests.helpers import assert_state_close


def test_expo_at_zero_is_finetuned(tiny_models):
    theta0, ft = tiny_models
    assert_state_close(expo(ft[0], theta0, alpha=0.0), ft[0])


def test_expo_is_task_arithmetic_with_one_vector_scaled_by_one_plus_alpha(tiny_models):
    theta0, ft = tiny_models
    alpha = 0.7
    assert_state_close(expo(ft[0], theta0, alpha), task_arithmetic(theta0, [task_vector(ft[0], theta0)], lam=1 + alpha),
                       atol=1e-5)


def test_extrapolation_merge_beta_one_is_first_extrapolated(tiny_models):
    theta0, ft = tiny_models
    assert_state_close(extrapolation_merge(ft[0], ft[1], theta0, alpha=0.5, beta=1.0), expo(ft[0], theta0, 0.5))


def test_extrapolation_merge_formula(tiny_models):
    theta0, ft = tiny_models
    alpha, beta = 0.4, 0.3
    merged = extrapolation_merge(ft[0], ft[1], theta0, alpha, beta)
    for k, v in theta0.items():
        e1 = ft[0][k] + alpha * (ft[0][k] - v)
        e2 = ft[1][k] + alpha * (ft[1][k] - v)
        torch.testing.assert_close(merged[k], beta * e1 + (1 - beta) * e2, atol=1e-5, rtol=0, msg=k)


def test_interpolate_endpoints(tiny_models):
    _, ft = tiny_models
    assert_state_close(interpolate(ft[0], ft[1], 0.0), ft[1])
    assert_state_close(interpolate(ft[0], ft[1], 1.0), ft[0])


@pytest.mark.parametrize("optimum", [{"alpha": 0.37, "beta": 0.81}, {"alpha": -0.2, "beta": 0.1}])
def test_local_search_finds_planted_optimum_within_budget(optimum):
    calls = []

    def objective(p):
        calls.append(p)
        return -((p["alpha"] - optimum["alpha"]) ** 2) - 2 * (p["beta"] - optimum["beta"]) ** 2

    result = local_search(objective, start={"alpha": 0.0, "beta": 0.5}, step={"alpha": 0.25, "beta": 0.25},
                          bounds={"beta": (0.0, 1.0)}, budget=60)
    assert len(calls) == result.evaluations <= 60
    assert result.best["alpha"] == pytest.approx(optimum["alpha"], abs=0.02)
    assert result.best["beta"] == pytest.approx(optimum["beta"], abs=0.02)


def test_local_search_respects_bounds_and_minimises():
    result = local_search(lambda p: (p["x"] - 5.0) ** 2, {"x": 0.0}, {"x": 1.0}, bounds={"x": (0.0, 2.0)},
                          budget=20, maximize=False)
    assert result.best["x"] == 2.0
    assert all(0.0 <= point["x"] <= 2.0 for point, _ in result.history)


def test_local_search_stops_at_budget():
    result = local_search(lambda p: p["x"], {"x": 0.0}, {"x": 1.0}, budget=5)
    assert result.evaluations == 5 and result.best["x"] == 3.0  # visits 0, ±1, 2, 3


def test_local_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no step size"):
        local_search(lambda p: 0.0, {"x": 0.0, "y": 0.0}, {"x": 1.0})
    with pytest.raises(ValueError, match="budget"):
        local_search(lambda p: 0.0, {"x": 0.0}, {"x": 1.0}, budget=0)
