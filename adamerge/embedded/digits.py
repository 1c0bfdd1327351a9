"""Real handwritten digits that ship offline: scikit-learn's ``load_digits`` (1,797 images, 8x8).

Split once by seed into test / val / train; pre-training only ever sees the train split, drawn in
varied colours and poses, light ink on dark; the digits task shows grey digits, half inverted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from adamerge.embedded.canvas import uniform

N_DIGITS = 1797


def digit_splits(seed: int, n_test: int, n_val: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``split -> (images [m, 8, 8] in [0, 1], labels [m], indices into load_digits [m])``, disjoint."""
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    if n_test + n_val >= len(order):
        raise ValueError(f"digits: {n_test} test + {n_val} val leaves no training images of {len(order)}")
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: (images[idx], labels[idx], idx) for name, idx in parts.items()}


def clean_digits(images8: torch.Tensor, size: int) -> torch.Tensor:
    """White digits on black, upsampled to ``size`` px: ``[m, 3, size, size]`` in [0, 1]."""
    up = F.interpolate(images8[:, None], size=size, mode="bilinear", align_corners=False)
    return up.expand(-1, 3, -1, -1).clamp(0, 1)


def scanned_digits(images8: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """The digits task's images: grey digits, half of them dark ink on light paper.

    Pre-training only shows light ink on dark grounds, so the inverted half is the task's domain
    shift (zero-shot gets it mostly wrong; fine-tuning learns it).
    """
    m = len(images8)
    ink = clean_digits(images8, size)
    inverted = (torch.rand(m, generator=gen) < 0.5)[:, None, None, None]
    ground, stroke = uniform(m, 0.0, 0.2, gen), uniform(m, 0.8, 1.0, gen)
    ground, stroke = torch.where(inverted[:, 0, 0, 0], stroke, ground), torch.where(inverted[:, 0, 0, 0], ground, stroke)
    return ground[:, None, None, None] * (1 - ink) + stroke[:, None, None, None] * ink


def styled_digits(images8: torch.Tensor, res: int, gen: torch.Generator) -> torch.Tensor:
    """Light digits on dark grounds of random hues, scale, rotation and shift: pre-training's digits.

    (Random colour pairs with dark-on-light inversions kept a small ViT from learning digits at all.)
    """
    m = len(images8)
    scale, angle = uniform(m, 0.9, 1.1, gen), uniform(m, -0.15, 0.15, gen)
    shift = 0.08 * (2 * torch.rand(m, 2, generator=gen) - 1)
    theta = torch.zeros(m, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * scale, -torch.sin(angle) * scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * scale, torch.cos(angle) * scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [m, 1, res, res], align_corners=False)
    ink = F.grid_sample(images8[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bg = 0.35 * torch.rand(m, 3, generator=gen)         # dark ground of any hue
    fg = 0.6 + 0.4 * torch.rand(m, 3, generator=gen)    # light ink of any hue
    return bg[:, :, None, None] * (1 - ink) + fg[:, :, None, None] * ink
