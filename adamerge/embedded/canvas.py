"""Vectorised drawing on batches of images: coordinates, shape masks, painting, anti-aliasing.

Everything is drawn in continuous coordinates (the image is the unit square, y pointing down) at a
supersampled resolution and averaged down, so the same scene renders at any model image size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from adamerge.embedded.vocabulary import SHAPES

SUPERSAMPLE_PIXELS = 64  # draw at least this many pixels per side, then average down


def render_resolution(size: int) -> int:
    """A multiple of ``size`` large enough that small shapes keep clean, anti-aliased edges."""
    return size * max(1, math.ceil(SUPERSAMPLE_PIXELS / size))


def coordinates(res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``(y, x)``, each ``[1, res, res]`` in (0, 1), ready to broadcast over a batch."""
    axis = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return y[None], x[None]


def uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def column(v: torch.Tensor) -> torch.Tensor:
    """``[n]`` -> ``[n, 1, 1]`` so per-image parameters broadcast against ``[1, res, res]`` grids."""
    return v[:, None, None]


def by_kind(kind: torch.Tensor, n_kinds: int, draw: Callable[[int, torch.Tensor], torch.Tensor],
            shape: tuple[int, ...]) -> torch.Tensor:
    """Run ``draw(k, indices)`` once per kind on the images of that kind; results back in batch order.

    Parameters are sampled for the whole batch before drawing, so the random stream does not
    depend on how the batch splits into kinds.
    """
    out = torch.zeros(len(kind), *shape)
    for k in range(n_kinds):
        idx = (kind == k).nonzero().flatten()
        if len(idx):
            out[idx] = draw(k, idx).float()
    return out


def shape_mask(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor,
               angle: torch.Tensor, res: int) -> torch.Tensor:
    """``[n, res, res]`` 0/1 masks of shapes (indices into ``vocabulary.SHAPES``) of comparable area."""
    y, x = coordinates(res)

    def draw(k: int, idx: torch.Tensor) -> torch.Tensor:
        dx, dy = (x - column(cx[idx])) / column(radius[idx]), (column(cy[idx]) - y) / column(radius[idx])  # y up
        cos, sin = column(torch.cos(angle[idx])), column(torch.sin(angle[idx]))
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        au, av, r2 = u.abs(), v.abs(), u ** 2 + v ** 2
        if k == 0:  # circle
            return r2 <= 1.0
        if k == 1:  # square
            return torch.maximum(au, av) <= 0.82
        if k == 2:  # triangle
            return (v >= -0.55) & (v <= 1.05 - math.sqrt(3) * au)
        if k == 3:  # cross
            return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
        if k == 4:  # ring
            return (r2 <= 1.0) & (r2 >= 0.5 ** 2)
        return (au <= 1.05) & (av <= 0.45)  # rectangle, wide and flat

    return by_kind(shape, len(SHAPES), draw, (res, res))


def disc_mask(cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor | float, res: int) -> torch.Tensor:
    """Discs; ``cx``/``cy`` may carry extra leading dims (e.g. ``[n, k]`` for k dots per image)."""
    y, x = coordinates(res)
    r = radius if isinstance(radius, float) else radius[..., None, None]
    return (((x - cx[..., None, None]) ** 2 + (y - cy[..., None, None]) ** 2) <= r ** 2).float()


def fill(rgb: torch.Tensor, res: int) -> torch.Tensor:
    """Canvases ``[n, 3, res, res]`` of one colour each (``rgb`` is ``[n, 3]``)."""
    return rgb[:, :, None, None].expand(-1, -1, res, res).clone()


def paint(canvas: torch.Tensor, mask: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Composite colour ``rgb [n, 3]`` over ``canvas`` where ``mask [n, res, res]`` is 1."""
    m = mask[:, None]
    return canvas * (1 - m) + rgb[:, :, None, None] * m


def blend(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel mix of two canvases: ``b`` where ``mask`` is 1."""
    m = mask[:, None]
    return a * (1 - m) + b * m


def to_uint8(canvas: torch.Tensor, size: int) -> torch.Tensor:
    """Average the supersampled canvas down to ``size`` px and quantise: the cached image format."""
    small = F.adaptive_avg_pool2d(canvas, size) if canvas.shape[-1] != size else canvas
    return (small.clamp(0, 1) * 255).round().to(torch.uint8)
