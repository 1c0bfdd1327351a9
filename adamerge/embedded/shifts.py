"""Domain shift between pre-training pictures and task images, as between web photos and a benchmark.

Without it the tasks whose attribute pre-training captions spell out (scene, colour) would be
solved zero-shot; with it they need fine-tuning to adapt, as EuroSAT or SVHN do for real CLIP.
"""

from __future__ import annotations

import torch

from adamerge.embedded.canvas import uniform


def lighting_shift(canvas: torch.Tensor, gen: torch.Generator, *, tint: float, fade_prob: float = 0.0) -> torch.Tensor:
    """Coloured light (a random gain per channel, up to ``±tint``) and, for ``fade_prob`` of the
    images, colours faded most of the way to grey."""
    n = len(canvas)
    gain = 1 + tint * (2 * torch.rand(n, 3, generator=gen) - 1)
    out = canvas * gain[:, :, None, None]
    fade = (torch.rand(n, generator=gen) < fade_prob).float() * uniform(n, 0.6, 0.9, gen)
    grey = out.mean(1, keepdim=True)
    out = out + (grey - out) * fade[:, None, None, None]
    return out.clamp(0, 1)
