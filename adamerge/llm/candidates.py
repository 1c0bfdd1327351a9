"""One live model whose weights are set in place to each candidate of a search.

θ₀ and the SFT checkpoints a method needs are read once (through :class:`~adamerge.model_dirs.ModelDir`, the
reader ``adamerge-merge-models`` uses) and kept in their stored dtype, on the host (``store='host'``: the device
holds only the live model, plus the tensors of one parameter while it is rebuilt) or on the device (``'device'``:
no host↔device copies, one model of memory per stored model). A candidate is built tensor by tensor with the
method's own :meth:`~adamerge.methods.base.Method.weights_merger`, in float32 and cast to the base's dtype —
the very computation that writes a merged model directory, so a written model scores what its candidate scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from adamerge.merging.views import LazyState
from adamerge.model_dirs.layout import ModelDir, ModelDirError, check_same_tensors

STORES = ("host", "device")


class Candidates:
    def __init__(self, model: torch.nn.Module, base: str | Path, checkpoints: Sequence[str | Path], store: str = "host"):
        if store not in STORES:
            raise ValueError(f"llm.store must be one of {', '.join(STORES)}, got {store!r}")
        self.model = model
        self.device = next(model.parameters()).device
        base_dir = ModelDir(base)
        dirs = [ModelDir(c) for c in checkpoints]
        base_only = check_same_tensors(base_dir, dirs)
        if base_only:
            raise ModelDirError(f"{len(base_only)} tensors of {base} are in no checkpoint (e.g. {base_only[0]})")
        live = dict(model.state_dict())
        self.keys = [k for k, info in base_dir.info.items() if info.is_floating_point() and k in live]
        absent = [k for k, info in base_dir.info.items() if k not in live]
        if absent:
            raise ModelDirError(f"{base} holds tensors the model does not have (e.g. {absent[0]}): is it another "
                                "architecture than its config.json says?")
        self._live = {k: live[k] for k in self.keys}
        where = self.device if store == "device" else torch.device("cpu")
        self.stored = [{k: d.tensor(k).to(where) for k in self.keys} for d in (base_dir, *dirs)]
        self.names = ["base", *(Path(c).name for c in checkpoints)]

    def _view(self, index: int) -> LazyState:
        state = self.stored[index]
        return LazyState(self.keys, lambda key: state[key].to(self.device, torch.float32))

    @torch.no_grad()
    def set_model(self, index: int) -> torch.nn.Module:
        """The live model becomes stored model ``index`` (0: θ₀, i: the i-th checkpoint) exactly."""
        for key in self.keys:
            self._live[key].copy_(self.stored[index][key])
        return self.model

    @torch.no_grad()
    def set_merge(self, method, models: Sequence[int]) -> torch.nn.Module:
        """The live model becomes ``method`` merging the stored models ``models`` with θ₀ as base."""
        merged = method.weights_merger(self._view(0), [self._view(i) for i in models])
        for key in self.keys:
            value = merged(key)
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"candidate tensor {key} is not finite: the point {getattr(method, 'start', '')} "
                                 "leaves the range this model can take")
            self._live[key].copy_(value.to(self._live[key].dtype))
        return self.model

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self.stored for t in state.values())
