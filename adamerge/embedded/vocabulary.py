"""The attributes the embedded world is made of, with the words captions and prompts use for them.

One list per concept, in class-index order: a task's labels are indices into these lists, and the
same words appear in pre-training captions, so zero-shot prompts can find them.
"""

from __future__ import annotations

import torch

SHAPES = ["circle", "square", "triangle", "cross", "ring", "rectangle"]

COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
COLOR_RGB = torch.tensor([
    [0.90, 0.10, 0.10],
    [1.00, 0.55, 0.05],
    [0.95, 0.90, 0.10],
    [0.10, 0.70, 0.15],
    [0.10, 0.85, 0.90],
    [0.15, 0.25, 0.95],
    [0.55, 0.15, 0.80],
    [1.00, 0.50, 0.75],
])

SIZES = ["small", "medium", "large"]
# Object radius (fraction of the image side) for each size; gaps keep the classes separable.
SIZE_RADIUS = [(0.10, 0.12), (0.16, 0.18), (0.23, 0.26)]

POSITIONS = ["top left", "top right", "bottom left", "bottom right", "center"]
POSITION_XY = torch.tensor([[0.28, 0.28], [0.72, 0.28], [0.28, 0.72], [0.72, 0.72], [0.5, 0.5]])

TEXTURES = ["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard",
            "polka dots", "grid", "zigzag", "speckles"]

COUNTS = ["one", "two", "three", "four", "five"]

SCENES = ["beach", "desert", "forest", "field", "city", "mountain", "night sky", "sunset"]

DIGITS = [str(d) for d in range(10)]
