"""Read-only state dicts whose tensors are computed on access: a merge that walks keys one at a time
(model directories, TIES) then holds one tensor per model, never whole models."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch


class LazyState(Mapping[str, torch.Tensor]):
    """``keys`` (in order) → ``compute(key)``, evaluated on every access (nothing is kept)."""

    def __init__(self, keys: Sequence[str], compute: Callable[[str], torch.Tensor]):
        self._keys, self._known, self._compute = list(keys), frozenset(keys), compute

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self._compute(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
