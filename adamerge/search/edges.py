"""Did a search stop at the edge of what it searched? Then the best value may lie outside, and a reader must know.

Shared by the in-run grids (``method.lam_grid``), the local search and the sweep tables.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

_INTERVAL = re.compile(r"interval\(\s*([^,\s]+)\s*,\s*([^)\s]+)\s*\)")


def edge_warnings(chosen: Mapping[str, Any], tried: Sequence[Mapping[str, Any]], specs: Mapping[str, Any],
                  fraction: float = 0.05) -> list[str]:
    """A chosen value at the edge of a grid (its smallest or largest of three or more values tried), or within
    ``fraction`` of an Optuna ``interval(lo, hi)`` bound (on a log scale under ``tag(log, …)``), says the optimum
    may lie outside what was searched."""
    warnings = []
    for key, value in chosen.items():
        if not _is_number(value):
            continue
        spec = str(specs.get(key, specs.get(f"+{key}", "")))
        match = _INTERVAL.search(spec)
        if match:
            lo, hi = float(match.group(1)), float(match.group(2))
            scale = math.log if "log" in spec and lo > 0 else (lambda x: x)
            span = scale(hi) - scale(lo)
            if span > 0 and min(scale(value) - scale(lo), scale(hi) - scale(value)) <= fraction * span:
                warnings.append(f"{key}={value:g} was chosen within {fraction:.0%} of the searched interval "
                                f"[{lo:g}, {hi:g}]: the best value may lie outside it; widen the interval")
            continue
        values = sorted({float(t[key]) for t in tried if _is_number(t.get(key))})
        if len(values) >= 3 and float(value) in (values[0], values[-1]):
            warnings.append(f"{key}={value:g} was chosen at the edge of its grid [{values[0]:g} … {values[-1]:g}]: "
                            "the best value may lie outside it; extend the grid")
    return warnings


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bound_warnings(best: Mapping[str, float], bounds: Mapping[str, tuple[float, float]]) -> list[str]:
    """A bounded local search that ended on a bound: it would have moved further had it been allowed to."""
    warnings = []
    for key, (lo, hi) in bounds.items():
        if key in best and best[key] in (lo, hi):
            warnings.append(f"{key}={best[key]:g} ended on a bound of its search range [{lo:g}, {hi:g}]: the best "
                            "value may lie outside it; widen the bounds")
    return warnings
