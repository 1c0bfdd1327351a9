"""Merge methods as the config tree names them (``conf/method/*.yaml`` → these classes).

Each method turns a :class:`MergeContext` (backbone, tasks, θ₀, θₖ, heads) into a
:class:`MergeResult`; the math itself lives in :mod:`adamerge.merging`.

The classes load on first use (PEP 562): ``adamerge-merge-models`` reads the registry without importing
Lightning and open_clip, which only the CLIP methods need.
"""

from importlib import import_module

_WHERE = {"AdaMerging": "adamerging", "MergeContext": "base", "MergeResult": "base", "Individual": "baselines",
          "IndividualBest": "baselines", "Pretrained": "baselines", "WeightAveraging": "baselines", "Dare": "dare",
          "ExPO": "extrapolation", "ExtrapolationMerging": "extrapolation", "FisherMerging": "fisher",
          "RegMean": "regmean", "EvaluateSaved": "saved", "TaskArithmetic": "scaled", "Ties": "scaled"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
