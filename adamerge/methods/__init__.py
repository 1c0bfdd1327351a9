"""Merge methods as the config tree names them (``conf/method/*.yaml`` → these classes).

Each method turns a :class:`MergeContext` (backbone, tasks, θ₀, θₖ, heads) into a
:class:`MergeResult`; the math itself lives in :mod:`adamerge.merging`.
"""

from adamerge.methods.adamerging import AdaMerging
from adamerge.methods.base import MergeContext, MergeResult
from adamerge.methods.baselines import Individual, IndividualBest, Pretrained, WeightAveraging
from adamerge.methods.dare import Dare
from adamerge.methods.extrapolation import ExPO, ExtrapolationMerging
from adamerge.methods.fisher import FisherMerging
from adamerge.methods.regmean import RegMean
from adamerge.methods.saved import EvaluateSaved
from adamerge.methods.scaled import TaskArithmetic, Ties

__all__ = ["AdaMerging", "Dare", "EvaluateSaved", "ExPO", "ExtrapolationMerging", "FisherMerging", "Individual", "IndividualBest", "MergeContext",
           "MergeResult", "Pretrained", "RegMean", "TaskArithmetic", "Ties", "WeightAveraging"]
