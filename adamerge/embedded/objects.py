"""Scenes with objects: one coloured shape on a background, or a number of dots to count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adamerge.embedded.canvas import disc_mask, fill, paint, shape_mask, uniform
from adamerge.embedded.textures import muted_colors, textured_background
from adamerge.embedded.vocabulary import COLOR_RGB, COLORS, COUNTS, POSITION_XY, POSITIONS, SHAPES, SIZE_RADIUS, SIZES, TEXTURES

POSITION_JITTER = 0.045
DOT_GRID = 4  # dots sit in distinct cells of a DOT_GRID x DOT_GRID lattice, so they never touch
DOT_RADIUS = 0.07


@dataclass
class Scenes:
    """Supersampled canvases ``[n, 3, res, res]`` and the attribute indices they were drawn from.

    ``texture`` is -1 for a plain background; ``count`` is the class index (0 means one dot).
    """

    canvas: torch.Tensor
    attributes: dict[str, torch.Tensor]


def _choice(n: int, allowed: list[int] | None, size: int, gen: torch.Generator) -> torch.Tensor:
    allowed_t = torch.tensor(allowed if allowed is not None else list(range(size)))
    return allowed_t[torch.randint(0, len(allowed_t), (n,), generator=gen)]


def object_colors(color: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Palette colours with per-object jitter in hue and brightness."""
    n = len(color)
    rgb = COLOR_RGB[color] + 0.06 * (2 * torch.rand(n, 3, generator=gen) - 1)
    return (rgb * uniform(n, 0.85, 1.05, gen)[:, None]).clamp(0, 1)


def object_scenes(n: int, res: int, gen: torch.Generator, *, shapes: list[int] | None = None,
                  sizes: list[int] | None = None, texture_prob: float = 0.7,
                  given: dict[str, torch.Tensor] | None = None) -> Scenes:
    """One shape of random colour, size and position, on a muted texture or a plain background.

    ``given`` fixes any of the attributes (``shape``, ``color``, ``size``, ``position``, ``texture``).
    """
    shape = _choice(n, shapes, len(SHAPES), gen)
    color = _choice(n, None, len(COLORS), gen)
    size = _choice(n, sizes, len(SIZES), gen)
    position = _choice(n, None, len(POSITIONS), gen)
    textured = torch.rand(n, generator=gen) < texture_prob
    texture = torch.where(textured, torch.randint(0, len(TEXTURES), (n,), generator=gen), -1)
    given = given or {}
    shape, color, size = given.get("shape", shape), given.get("color", color), given.get("size", size)
    position, texture = given.get("position", position), given.get("texture", texture)

    low = torch.tensor([r[0] for r in SIZE_RADIUS])[size]
    high = torch.tensor([r[1] for r in SIZE_RADIUS])[size]
    radius = low + (high - low) * torch.rand(n, generator=gen)
    xy = POSITION_XY[position] + POSITION_JITTER * (2 * torch.rand(n, 2, generator=gen) - 1)
    angle = uniform(n, -0.2, 0.2, gen)

    canvas = textured_background(texture, res, gen, vivid=False)
    canvas = paint(canvas, shape_mask(shape, xy[:, 0], xy[:, 1], radius, angle, res), object_colors(color, gen))
    return Scenes(canvas, {"shape": shape, "color": color, "size": size, "position": position, "texture": texture})


def dot_scenes(n: int, res: int, gen: torch.Generator) -> Scenes:
    """One to five dots of one colour on a plain muted background (CLEVR-count-like)."""
    count = torch.randint(0, len(COUNTS), (n,), generator=gen)
    color = torch.randint(0, len(COLORS), (n,), generator=gen)
    k = len(COUNTS)
    cells = torch.argsort(torch.rand(n, DOT_GRID * DOT_GRID, generator=gen), dim=1)[:, :k]
    jitter = 0.03 * (2 * torch.rand(n, k, 2, generator=gen) - 1)
    cx = ((cells % DOT_GRID).float() + 0.5) / DOT_GRID + jitter[..., 0]
    cy = ((cells // DOT_GRID).float() + 0.5) / DOT_GRID + jitter[..., 1]
    present = (torch.arange(k)[None] <= count[:, None]).float()
    mask = (disc_mask(cx, cy, DOT_RADIUS, res) * present[..., None, None]).amax(dim=1)
    canvas = paint(fill(muted_colors(n, gen), res), mask, object_colors(color, gen))
    return Scenes(canvas, {"count": count, "color": color})
