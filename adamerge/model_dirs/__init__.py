"""Merge whole Hugging Face-style model directories (safetensors, single file or sharded), any model family.

``adamerge-merge-models --base DIR --models DIR [DIR ...] --method task_arithmetic --lam 0.3 --out DIR``.
The methods are the config tree's (:mod:`.registry`), merging tensor by tensor through
:meth:`~adamerge.methods.base.Method.weights_merger`; :mod:`.layout` reads a directory's weights one tensor at
a time; :mod:`.merge` writes the merged directory atomically.
"""

from adamerge.model_dirs.layout import ModelDir, ModelDirError, TensorInfo, check_same_tensors
from adamerge.model_dirs.merge import MERGE_CONFIG, merge_model_dirs
from adamerge.model_dirs.registry import compose_method, weight_methods

__all__ = ["MERGE_CONFIG", "ModelDir", "ModelDirError", "TensorInfo", "check_same_tensors", "compose_method",
           "merge_model_dirs", "weight_methods"]
