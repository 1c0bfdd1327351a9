"""The embedded world's eight classification tasks, in a fixed, paper-like order.

Like the paper's eight datasets they need different features: global layout (scenes), local shape,
colour, location, counting, scale, real handwriting (digits, from scikit-learn) and texture.
Procedural splits are drawn from independent seeds; the digits splits are disjoint index sets.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from adamerge.embedded.canvas import render_resolution, to_uint8
from adamerge.embedded.digits import digit_splits, scanned_digits
from adamerge.embedded.objects import dot_scenes, object_scenes
from adamerge.embedded.scenes import landscape
from adamerge.embedded.shifts import lighting_shift
from adamerge.embedded.textures import textured_background
from adamerge.embedded.vocabulary import COLORS, COUNTS, DIGITS, POSITIONS, SCENES, SHAPES, SIZES, TEXTURES

SPLITS = ("train", "val", "test")
Drawer = Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # (n, res, gen) -> canvas, labels


@dataclass(frozen=True)
class TaskSpec:
    """How to make one task: its words (class names, prompt templates) and how to draw its images.

    ``draw`` is None for the digits task, whose images are real rather than drawn.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    draw: Drawer | None


def _object_task(attribute: str, **kwargs) -> Drawer:
    def draw(n: int, res: int, gen: torch.Generator):
        scenes = object_scenes(n, res, gen, **kwargs)
        return scenes.canvas, scenes.attributes[attribute]
    return draw


def _shifted(draw: Drawer, **shift) -> Drawer:
    def shifted(n: int, res: int, gen: torch.Generator):
        canvas, labels = draw(n, res, gen)
        return lighting_shift(canvas, gen, **shift), labels
    return shifted


def _draw_scenes(n, res, gen):
    kind = torch.randint(0, len(SCENES), (n,), generator=gen)
    return landscape(kind, res, gen), kind


def _draw_counting(n, res, gen):
    scenes = dot_scenes(n, res, gen)
    return scenes.canvas, scenes.attributes["count"]


def _draw_textures(n, res, gen):
    kind = torch.randint(0, len(TEXTURES), (n,), generator=gen)
    return textured_background(kind, res, gen, vivid=True), kind


TASK_SPECS: list[TaskSpec] = [
    TaskSpec("scenes", SCENES, ["a photo of a {}.", "a photo of the {}.", "a view of the {}."], _shifted(_draw_scenes, tint=0.3, fade_prob=0.5)),
    TaskSpec("shapes", SHAPES, ["a photo of a {}.", "a {} shape.", "a drawing of a {}."], _object_task("shape", sizes=[2], texture_prob=0.35)),
    TaskSpec("colors", COLORS, ["a photo of a {} object.", "a {} shape.", "something {}."], _shifted(_object_task("color"), tint=0.35)),
    TaskSpec("positions", POSITIONS, ["a photo of an object in the {}.", "a shape in the {}.", "something in the {}."],
             _object_task("position")),
    TaskSpec("counting", COUNTS, ["a photo of {} dots.", "{} dots.", "there are {} dots."], _draw_counting),
    TaskSpec("sizes", SIZES, ["a photo of a {} object.", "a {} shape.", "a {} thing."], _object_task("size", texture_prob=0.35)),
    TaskSpec("digits", DIGITS, ['a photo of the number: "{}".', "a photo of the digit {}.", "the digit {}."], None),
    TaskSpec("textures", TEXTURES, ["a photo of a {} texture.", "a {} pattern.", "{} texture."], _draw_textures),
]
TASK_NAMES = [spec.name for spec in TASK_SPECS]


def task_spec(name: str) -> TaskSpec:
    for spec in TASK_SPECS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown embedded task {name!r}; valid names: {', '.join(TASK_NAMES)}")


def split_seed(seed: int, task: str, split: str) -> int:
    """A stable seed per (world seed, task, split): splits never share a random stream."""
    return zlib.crc32(f"{seed}/{task}/{split}".encode())


def make_task_splits(spec: TaskSpec, sizes: dict[str, int], image_size: int, seed: int,
                     chunk: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``split -> (uint8 images [n, 3, S, S], labels [n])`` for every split in ``SPLITS``.

    Digits use all scikit-learn images not held out for val / test as train (at most ``sizes['train']``).
    """
    if spec.draw is None:
        parts = digit_splits(seed, sizes["test"], sizes["val"])
        out = {}
        for split in SPLITS:
            images8, labels, _ = parts[split]
            images8, labels = images8[:sizes[split]], labels[:sizes[split]]
            gen = torch.Generator().manual_seed(split_seed(seed, spec.name, split))
            out[split] = (to_uint8(scanned_digits(images8, image_size, gen), image_size), labels)
        return out
    res = render_resolution(image_size)
    out = {}
    for split in SPLITS:
        gen = torch.Generator().manual_seed(split_seed(seed, spec.name, split))
        images, labels = [], []
        for start in range(0, sizes[split], chunk):
            canvas, label = spec.draw(min(chunk, sizes[split] - start), res, gen)
            images.append(to_uint8(canvas, image_size))
            labels.append(label)
        out[split] = (torch.cat(images), torch.cat(labels))
    return out
