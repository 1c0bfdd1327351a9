"""Merge math: plain functions over state dicts and stacked task vectors. No Hydra, no Lightning, no I/O.

Notation follows the AdaMerging paper (Yang et al., ICLR 2024): θ₀ pre-trained weights, θₖ the
fine-tuned weights of task k, τₖ = θₖ − θ₀ its task vector, λ merge coefficients.
"""

from adamerge.merging.averaging import weight_average
from adamerge.merging.coefficients import MergeCoefficients
from adamerge.merging.dare import dare_drop, dare_merge, dare_task_vectors, dare_vector
from adamerge.merging.entropy import entropy_loss
from adamerge.merging.fisher import diagonal_fisher, fisher_merge
from adamerge.merging.regmean import collect_input_grams, reduce_off_diagonal, regmean_linear, regmean_merge
from adamerge.merging.stacked import StackedTaskVectors
from adamerge.merging.task_arithmetic import sum_vectors, task_arithmetic
from adamerge.merging.task_vectors import (CheckpointMismatchError, NonFiniteTensorError, add_scaled, check_compatible,
                                           check_finite, mergeable_keys, task_vector)
from adamerge.merging.ties import elect_sign, ties_merge, ties_task_vectors, ties_vector, trim_top_k

__all__ = [
    "CheckpointMismatchError", "MergeCoefficients", "NonFiniteTensorError", "check_finite", "StackedTaskVectors", "add_scaled", "check_compatible",
    "dare_drop", "dare_merge", "dare_task_vectors", "dare_vector",
    "collect_input_grams", "diagonal_fisher", "fisher_merge", "reduce_off_diagonal", "regmean_linear", "regmean_merge",
    "elect_sign", "entropy_loss", "mergeable_keys", "sum_vectors", "task_arithmetic", "task_vector", "ties_merge",
    "ties_task_vectors", "ties_vector", "trim_top_k", "weight_average",
]
