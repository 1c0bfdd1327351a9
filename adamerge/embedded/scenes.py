"""SUN397-like landscape scenes (indices into ``vocabulary.SCENES``): layouts of colour regions.

Each scene is recognised from its global layout (sky over sand, trunks, skyline, ...), unlike the
object tasks, which need one local object.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adamerge.embedded.canvas import column, coordinates, disc_mask, paint, uniform


def _rgb(n: int, base: tuple[float, float, float], gen: torch.Generator, jitter: float = 0.08) -> torch.Tensor:
    return (torch.tensor(base) + jitter * (2 * torch.rand(n, 3, generator=gen) - 1)).clamp(0, 1)


def _gradient(top: torch.Tensor, bottom: torch.Tensor, res: int) -> torch.Tensor:
    y, _ = coordinates(res)
    t = y[:, None]  # [1, 1, res, res]
    return top[:, :, None, None] * (1 - t) + bottom[:, :, None, None] * t


def _sky(n: int, gen: torch.Generator, res: int) -> torch.Tensor:
    return _gradient(_rgb(n, (0.35, 0.55, 0.95), gen), _rgb(n, (0.7, 0.85, 1.0), gen), res)


def _beach(n, res, gen):
    y, _ = coordinates(res)
    h = column(uniform(n, 0.3, 0.45, gen))
    img = paint(_sky(n, gen, res), (y > h).float(), _rgb(n, (0.1, 0.35, 0.75), gen))
    return paint(img, (y > h + column(uniform(n, 0.12, 0.25, gen))).float(), _rgb(n, (0.93, 0.83, 0.6), gen))


def _desert(n, res, gen):
    y, x = coordinates(res)
    dune = column(uniform(n, 0.4, 0.6, gen)) + 0.06 * torch.sin(2 * math.pi * (column(uniform(n, 1, 2.5, gen)) * x + column(torch.rand(n, generator=gen))))
    img = paint(_gradient(_rgb(n, (0.6, 0.75, 0.95), gen), _rgb(n, (0.95, 0.9, 0.8), gen), res),
                (y > dune).float(), _rgb(n, (0.9, 0.65, 0.3), gen))
    shade = (y > dune + 0.15 + 0.04 * torch.sin(2 * math.pi * 3 * x)).float() * 0.5
    return paint(img, shade, _rgb(n, (0.75, 0.5, 0.2), gen))


def _forest(n, res, gen):
    y, x = coordinates(res)
    img = _gradient(_rgb(n, (0.1, 0.45, 0.15), gen), _rgb(n, (0.05, 0.25, 0.05), gen), res)
    trunks = (torch.sin(2 * math.pi * (column(uniform(n, 3, 6, gen)) * x + column(torch.rand(n, generator=gen)))) > 0.6)
    img = paint(img, (trunks & (y > 0.35)).float(), _rgb(n, (0.4, 0.25, 0.1), gen))
    canopy = y < 0.3 + 0.08 * torch.sin(2 * math.pi * (column(uniform(n, 4, 7, gen)) * x))
    return paint(img, canopy.float(), _rgb(n, (0.2, 0.6, 0.15), gen))


def _field(n, res, gen):
    y, x = coordinates(res)
    img = paint(_sky(n, gen, res), (y > column(uniform(n, 0.35, 0.6, gen))).float(), _rgb(n, (0.35, 0.75, 0.2), gen))
    flowers = (torch.rand(n, res // 4, res // 4, generator=gen) > 0.9).float()[:, None]
    flowers = F.interpolate(flowers, size=res, mode="nearest")[:, 0] * (y > 0.65).float()
    return paint(img, flowers, _rgb(n, (0.95, 0.95, 0.5), gen))


def _city(n, res, gen):
    y, x = coordinates(res)
    img = _gradient(_rgb(n, (0.55, 0.6, 0.7), gen), _rgb(n, (0.8, 0.8, 0.85), gen), res)
    columns = 6
    tops = 0.15 + 0.5 * torch.rand(n, columns, generator=gen)
    idx = (x * columns).long().clamp(max=columns - 1).expand(n, res, res)
    building = y > torch.gather(tops, 1, idx.reshape(n, -1)).reshape(n, res, res)
    img = paint(img, building.float(), _rgb(n, (0.3, 0.3, 0.35), gen))
    wf = column(uniform(n, 10, 14, gen))
    windows = building & ((wf * x) % 1 > 0.5) & ((wf * y) % 1 > 0.5)
    return paint(img, windows.float(), _rgb(n, (0.95, 0.85, 0.35), gen))


def _mountain(n, res, gen):
    y, x = coordinates(res)
    k = column(uniform(n, 1.2, 2.2, gen))
    tri = 2 * ((k * x + column(torch.rand(n, generator=gen))) % 1 - 0.5).abs()
    ridge = 0.2 + 0.45 * tri
    img = paint(_sky(n, gen, res), (y > ridge).float(), _rgb(n, (0.45, 0.42, 0.45), gen))
    snow = (y > ridge) & (y < ridge + 0.08 + 0.1 * (1 - tri))
    img = paint(img, snow.float(), _rgb(n, (0.95, 0.95, 0.97), gen, 0.03))
    return paint(img, (y > 0.8).float(), _rgb(n, (0.3, 0.45, 0.25), gen))


def _night_sky(n, res, gen):
    y, x = coordinates(res)
    img = _gradient(_rgb(n, (0.02, 0.02, 0.12), gen, 0.02), _rgb(n, (0.1, 0.1, 0.3), gen, 0.05), res)
    stars = (torch.rand(n, res // 2, res // 2, generator=gen) > 0.95).float()[:, None]
    img = paint(img, F.interpolate(stars, size=res, mode="nearest")[:, 0], _rgb(n, (0.95, 0.95, 0.9), gen, 0.03))
    moon = disc_mask(uniform(n, 0.2, 0.8, gen), uniform(n, 0.15, 0.4, gen), 0.09, res) * (torch.rand(n, generator=gen) < 0.6).float()[:, None, None]
    img = paint(img, moon, _rgb(n, (0.95, 0.95, 0.8), gen, 0.03))
    return paint(img, (y > column(uniform(n, 0.75, 0.9, gen))).float(), _rgb(n, (0.03, 0.03, 0.05), gen, 0.02))


def _sunset(n, res, gen):
    y, _ = coordinates(res)
    h = uniform(n, 0.55, 0.75, gen)
    img = _gradient(_rgb(n, (0.45, 0.2, 0.5), gen), _rgb(n, (1.0, 0.55, 0.2), gen), res)
    sun = disc_mask(uniform(n, 0.25, 0.75, gen), h - 0.05, uniform(n, 0.1, 0.16, gen), res)
    img = paint(img, sun, _rgb(n, (1.0, 0.85, 0.3), gen, 0.05))
    return paint(img, (y > column(h)).float(), _rgb(n, (0.15, 0.08, 0.12), gen, 0.04))


_RENDERERS = [_beach, _desert, _forest, _field, _city, _mountain, _night_sky, _sunset]


def landscape(kind: torch.Tensor, res: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 3, res, res]`` scenes of the given kinds (drawn kind by kind, then put back in order)."""
    out = torch.empty(len(kind), 3, res, res)
    for k, render in enumerate(_RENDERERS):
        idx = (kind == k).nonzero().flatten()
        if len(idx):
            out[idx] = render(len(idx), res, gen)
    return out
