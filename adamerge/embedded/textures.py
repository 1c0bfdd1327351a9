"""DTD-like texture patterns (indices into ``vocabulary.TEXTURES``), each with random scale and phase."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adamerge.embedded.canvas import blend, by_kind, column, coordinates, fill, uniform
from adamerge.embedded.vocabulary import TEXTURES


def _triangle_wave(t: torch.Tensor) -> torch.Tensor:
    return 2 * (t - torch.floor(t + 0.5)).abs()


def texture_pattern(kind: torch.Tensor, res: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, res, res]`` 0/1 patterns; the frequency (cycles per image side) varies per image."""
    n = len(kind)
    y, x = coordinates(res)
    freq = uniform(n, 3.0, 5.0, gen)
    phase1, phase2 = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    speckle = torch.rand(n, 1, res // 4, res // 4, generator=gen)
    two_pi = 2 * math.pi

    def draw(k: int, idx: torch.Tensor) -> torch.Tensor:
        f, p1, p2 = column(freq[idx]), column(phase1[idx]), column(phase2[idx])
        if k == 0:  # horizontal stripes
            return torch.sin(two_pi * (f * y + p1)) > 0
        if k == 1:  # vertical stripes
            return torch.sin(two_pi * (f * x + p1)) > 0
        if k == 2:  # diagonal stripes, either direction
            return torch.sin(two_pi * (f * (x + column(flip[idx]) * y) / math.sqrt(2) * 1.3 + p1)) > 0
        if k == 3:  # checkerboard
            return torch.sin(two_pi * (f / 1.5 * x + p1)) * torch.sin(two_pi * (f / 1.5 * y + p2)) > 0
        if k == 4:  # polka dots
            return ((f * x + p1) % 1 - 0.5) ** 2 + ((f * y + p2) % 1 - 0.5) ** 2 < 0.26 ** 2
        if k == 5:  # grid
            return ((f * x + p1) % 1 > 0.78) | ((f * y + p2) % 1 > 0.78)
        if k == 6:  # zigzag
            return torch.sin(two_pi * (f * y + 0.8 * _triangle_wave(f / 1.3 * x + p2) + p1)) > 0
        return F.interpolate(speckle[idx], size=res, mode="nearest")[:, 0] > 0.62  # speckles

    return by_kind(kind, len(TEXTURES), draw, (res, res))


def muted_colors(n: int, gen: torch.Generator, low: float = 0.25, high: float = 0.75) -> torch.Tensor:
    """Greyish colours with a slight tint: backgrounds that leave an object's colour salient."""
    grey = uniform(n, low, high, gen)[:, None]
    return (grey + 0.08 * (torch.rand(n, 3, generator=gen) - 0.5)).clamp(0, 1)


def contrasting_colors(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random colours per image whose brightness differs enough for a pattern to be visible."""
    a = torch.rand(n, 3, generator=gen)
    b = torch.rand(n, 3, generator=gen)
    gap = b.mean(1, keepdim=True) - a.mean(1, keepdim=True)
    push = torch.where(gap >= 0, 1.0, -1.0) * (0.3 - gap.abs()).clamp(min=0)
    return (a - push / 2).clamp(0, 1), (b + push / 2).clamp(0, 1)


def textured_background(kind: torch.Tensor, res: int, gen: torch.Generator, *, vivid: bool) -> torch.Tensor:
    """Texture canvases ``[n, 3, res, res]``: vivid colours for texture images, muted behind objects.

    ``kind`` == -1 gives a plain background.
    """
    n = len(kind)
    if vivid:
        bg, fg = contrasting_colors(n, gen)
    else:
        bg = muted_colors(n, gen)
        fg = (bg + torch.where(torch.rand(n, 1, generator=gen) < 0.5, 1.0, -1.0) * uniform(n, 0.15, 0.3, gen)[:, None]).clamp(0, 1)
    pattern = texture_pattern(kind.clamp(min=0), res, gen) * (kind >= 0).float()[:, None, None]
    return blend(fill(bg, res), fill(fg, res), pattern)
