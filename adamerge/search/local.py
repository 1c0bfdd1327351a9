"""Budgeted coordinate search around a start point, the local search of Extrapolation Merging.

Each round tries one step up and one step down along every coordinate and moves to the best point
that improves the objective; a round without improvement halves the steps. It stops when the
evaluation budget is spent or every step is below ``min_step``. Evaluations are cached, so revisiting
a point is free — each one is a full evaluation of a merged model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from adamerge.runtime.progress import progress
from adamerge.search.edges import bound_warnings


@dataclass
class SearchResult:
    best: dict[str, float]
    value: float
    evaluations: int
    history: list[tuple[dict[str, float], float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the best point on a bound (search.edges.bound_warnings)


def local_search(objective: Callable[[dict[str, float]], float], start: Mapping[str, float],
                 step: Mapping[str, float], bounds: Mapping[str, tuple[float, float]] | None = None,
                 budget: int = 30, min_step: float = 1e-3, maximize: bool = True,
                 desc: str | None = None) -> SearchResult:
    """Find a local optimum of ``objective`` over the coordinates of ``start`` within ``budget`` calls.

    A bar (``desc``, default "local search") counts evaluations against the budget, as each is a full
    evaluation of a merged model; a search that converges early ends its bar at the count it used.
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1 evaluation, got {budget}")
    missing = set(start) - set(step)
    if missing:
        raise ValueError(f"no step size for {sorted(missing)}; give one per coordinate of the start point")
    bounds = dict(bounds or {})
    unknown = set(bounds) - set(start)
    if unknown:
        raise ValueError(f"bounds for unknown coordinates {sorted(unknown)}; coordinates: {sorted(start)}")
    sign = 1.0 if maximize else -1.0
    cache: dict[tuple, float] = {}
    history: list[tuple[dict[str, float], float]] = []
    bar = progress(total=budget, desc=desc or "local search", unit="evaluation")

    def clip(name: str, value: float) -> float:
        lo, hi = bounds.get(name, (float("-inf"), float("inf")))
        return min(max(value, lo), hi)

    def evaluate(point: dict[str, float]) -> float | None:
        key = tuple(round(point[k], 12) for k in sorted(point))
        if key not in cache:
            if len(cache) >= budget:
                return None
            cache[key] = float(objective(dict(point)))
            history.append((dict(point), cache[key]))
            bar.set_postfix(best=f"{sign * max(sign * v for v in cache.values()):.4g}", refresh=False)
            bar.update(1)
        return cache[key]

    with bar:
        best = {k: clip(k, float(v)) for k, v in start.items()}
        best_value = evaluate(best)
        steps = {k: float(step[k]) for k in start}
        while len(cache) < budget and any(s >= min_step for s in steps.values()):
            candidate, candidate_value = None, best_value
            for name in best:
                if steps[name] < min_step:
                    continue
                for direction in (1.0, -1.0):
                    point = dict(best)
                    point[name] = clip(name, best[name] + direction * steps[name])
                    if point[name] == best[name]:
                        continue
                    value = evaluate(point)
                    if value is None:
                        break
                    if sign * value > sign * candidate_value:
                        candidate, candidate_value = point, value
            if candidate is None:
                steps = {k: s / 2 for k, s in steps.items()}
            else:
                best, best_value = candidate, candidate_value
        bar.total = len(cache)  # converged before the budget: the bar ends full at the evaluations used
    return SearchResult(best=best, value=best_value, evaluations=len(cache), history=history,
                        warnings=bound_warnings(best, bounds))
