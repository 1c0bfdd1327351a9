"""Merge whole Hugging Face-style model directories (safetensors, single file or sharded), any model family.

``adamerge-merge-models --base DIR --models DIR [DIR ...] --method task_arithmetic --lam 0.3 --out DIR``.
The math is :mod:`adamerge.merging`'s, applied one tensor at a time (:mod:`.methods`); :mod:`.layout`
reads a directory's weights lazily; :mod:`.merge` writes the merged directory atomically.
"""

from adamerge.model_dirs.layout import ModelDir, ModelDirError, TensorInfo, check_same_tensors
from adamerge.model_dirs.merge import MERGE_CONFIG, merge_model_dirs
from adamerge.model_dirs.methods import METHODS, MergeMethod, get_method

__all__ = ["MERGE_CONFIG", "METHODS", "MergeMethod", "ModelDir", "ModelDirError", "TensorInfo", "check_same_tensors",
           "get_method", "merge_model_dirs"]
