"""Captioned images for contrastive pre-training: the embedded world's "web-scale" image-text pairs.

Captions describe some, not all, of what is drawn (like alt-text), in varied phrasings, so the
text tower learns each attribute word rather than one fixed sentence per image. Colour and
background, the easiest attributes to see, are named least often: a batch whose captions differ
in colour can be solved by colour alone, and the model would never need to see shape or position.
Most object captions name a single attribute, for the same reason: such captions teach an
attribute about as fast as labels would, where long captions spread the signal thin. And objects come in
groups of ``GROUP`` that differ in one attribute only (minimal pairs), always named in the caption:
a batch then holds pictures that only that attribute tells apart.
"""

from __future__ import annotations

import random

import torch

from adamerge.embedded.canvas import render_resolution, to_uint8
from adamerge.embedded.digits import styled_digits
from adamerge.embedded.objects import dot_scenes, object_scenes
from adamerge.embedded.scenes import landscape
from adamerge.embedded.textures import textured_background
from adamerge.embedded.vocabulary import COLORS, COUNTS, DIGITS, POSITIONS, SCENES, SHAPES, SIZES, TEXTURES

# Share of each kind of picture in pre-training.
MIX = {"objects": 0.42, "dots": 0.12, "textures": 0.10, "digits": 0.20, "scenes": 0.16}
OBJECT_ATTRIBUTES = ["shape", "color", "size", "position", "texture"]
OBJECT_CHOICES = {"shape": len(SHAPES), "color": len(COLORS), "size": len(SIZES), "position": len(POSITIONS),
                  "texture": len(TEXTURES) + 1}  # texture: -1 (plain) and each pattern
SINGLE_ATTRIBUTE_SHARE = 0.75  # object captions that name the focus attribute only
RICH_CAPTION_PROBS = [0.9, 0.3, 0.5, 0.6, 0.25]  # how often other captions name each attribute
OBJECT_TEXTURE_PROB = 0.5  # objects on a patterned (not plain) background
GROUP = 4  # pictures per minimal-pair group; batches are drawn group by group

PREFIXES = ["a photo of ", "an image of ", "a drawing of ", "a picture of "]
NOUNS = ["object", "shape", "thing"]
TEXTURE_PHRASES = ["a {} pattern", "a {} texture", "a photo of a {} texture", "{}"]
DIGIT_PHRASES = ["a photo of the digit {}", "the digit {}", "a handwritten {}", "the number {}", "a photo of the number {}"]
SCENE_PHRASES = ["a photo of a {}", "a {}", "a picture of the {}", "an image of a {}"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(adjectives: list[str], noun: str) -> str:
    words = adjectives + [noun]
    return f"{_article(words[0])} {' '.join(words)}"


def object_caption(shape: int, color: int, size: int, position: int, texture: int, focus: int,
                   rng: random.Random) -> tuple[str, tuple]:
    """E.g. "a small red circle in the top left on a grid background", or one attribute only.

    ``focus`` (an index into ``OBJECT_ATTRIBUTES``) is the attribute that is always named. Returns
    the caption and its meaning: the attributes it names (nouns like "object" and prefixes like
    "a photo of" carry none).
    """
    values = [SHAPES[shape], COLORS[color], SIZES[size], POSITIONS[position], TEXTURES[texture] if texture >= 0 else "plain"]
    if rng.random() < SINGLE_ATTRIBUTE_SHARE:
        named = {focus}
    else:
        named = {focus} | {a for a, p in enumerate(RICH_CAPTION_PROBS) if rng.random() < p}
    noun = values[0] if 0 in named else rng.choice(NOUNS)
    text = _noun_phrase([values[a] for a in (2, 1) if a in named], noun)
    if 3 in named:
        text += f" in the {values[3]}"
    if 4 in named:
        text += f" on a {values[4]} background"
    if len(named) > 1 and rng.random() < 0.3:
        text = rng.choice(PREFIXES) + text
    return text, ("objects",) + tuple((OBJECT_ATTRIBUTES[a], values[a]) for a in sorted(named))


def dots_caption(count: int, color: int, rng: random.Random) -> tuple[str, tuple]:
    noun = "dot" if count == 0 else "dots"
    with_color = rng.random() < 0.5
    words = f"{COUNTS[count]} {COLORS[color]} {noun}" if with_color else f"{COUNTS[count]} {noun}"
    text = rng.choice(["{}", "a photo of {}", "there are {}"]).format(words)
    return text, ("dots", count, color if with_color else None)


def caption(kind: str, attributes: list[int], rng: random.Random) -> tuple[str, tuple]:
    """A fresh ``(caption, meaning)`` for a picture of ``kind`` drawn from ``attributes``.

    Captions with one meaning but different wording are positives for each other in the loss.
    """
    if kind == "objects":
        return object_caption(*attributes, rng)
    if kind == "dots":
        return dots_caption(attributes[0], attributes[1], rng)
    phrases = {"textures": TEXTURE_PHRASES, "digits": DIGIT_PHRASES, "scenes": SCENE_PHRASES}[kind]
    words = {"textures": TEXTURES, "digits": DIGITS, "scenes": SCENES}[kind]
    return rng.choice(phrases).format(words[attributes[0]]), (kind, attributes[0])


def caption_corpus() -> list[str]:
    """Every word captions can use: the text tower's working vocabulary (see ``pretraining``)."""
    words = SHAPES + COLORS + SIZES + POSITIONS + TEXTURES + COUNTS + SCENES + [str(d) for d in range(10)]
    phrases = PREFIXES + NOUNS + TEXTURE_PHRASES + DIGIT_PHRASES + SCENE_PHRASES
    return words + phrases + ["a an in the on plain background dot dots there are"]


def _minimal_pairs(n: int, res: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Objects in groups of ``GROUP`` sharing every attribute but one, the group's focus."""
    groups = n // GROUP
    base = object_scenes(groups, 4, gen, texture_prob=OBJECT_TEXTURE_PROB).attributes  # a cheap, tiny draw just to sample attributes
    given = {k: v.repeat_interleave(GROUP) for k, v in base.items()}
    focus = torch.randint(0, len(OBJECT_ATTRIBUTES), (groups,), generator=gen)
    for f, name in enumerate(OBJECT_ATTRIBUTES):
        rows = (focus == f).nonzero().flatten()
        choices = OBJECT_CHOICES[name]
        values = torch.argsort(torch.rand(len(rows), max(choices, GROUP), generator=gen), dim=1)[:, :GROUP] % choices
        values = values - 1 if name == "texture" else values
        members = (rows[:, None] * GROUP + torch.arange(GROUP)).flatten()
        given[name][members] = values.flatten()
    scenes = object_scenes(len(focus) * GROUP, res, gen, given=given, texture_prob=OBJECT_TEXTURE_PROB)
    a = scenes.attributes
    return scenes.canvas, torch.stack([a["shape"], a["color"], a["size"], a["position"], a["texture"],
                                       focus.repeat_interleave(GROUP)], 1)


def _draw(kind: str, n: int, res: int, gen: torch.Generator, digit_images: torch.Tensor,
          digit_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(canvas, attributes [n, k])`` for ``n`` pictures of one kind."""
    if kind == "objects":
        return _minimal_pairs(n, res, gen)
    if kind == "dots":
        scenes = dot_scenes(n, res, gen)
        return scenes.canvas, torch.stack([scenes.attributes["count"], scenes.attributes["color"]], 1)
    if kind == "textures":
        texture = torch.randint(0, len(TEXTURES), (n,), generator=gen)
        return textured_background(texture, res, gen, vivid=True), texture[:, None]
    if kind == "digits":
        pick = torch.randint(0, len(digit_labels), (n,), generator=gen)
        return styled_digits(digit_images[pick], res, gen), digit_labels[pick][:, None]
    scene = torch.randint(0, len(SCENES), (n,), generator=gen)
    return landscape(scene, res, gen), scene[:, None]


class CaptionPool:
    """A seeded pool of pictures, re-captioned afresh every time one is drawn into a batch.

    Drawing pictures once and re-using them (with new captions) costs a fraction of drawing every
    batch anew. Digits come from ``digit_images`` only: pass the digits *train* split, so the
    digits task's val / test images are never seen in pre-training.
    """

    def __init__(self, size: int, image_size: int, digit_images: torch.Tensor, digit_labels: torch.Tensor,
                 seed: int, chunk: int = 512):
        gen = torch.Generator().manual_seed(seed)
        res = render_resolution(image_size)
        counts = {k: GROUP * int(round(f * size / GROUP)) for k, f in MIX.items()}
        counts["objects"] += GROUP * ((size - sum(counts.values())) // GROUP)
        images, self.kinds, self.attributes = [], [], []
        for kind, count in counts.items():
            for start in range(0, count, chunk):  # chunk is a multiple of GROUP
                canvas, attributes = _draw(kind, min(chunk, count - start), res, gen, digit_images, digit_labels)
                images.append(to_uint8(canvas, image_size))
                self.attributes += attributes.tolist()
                self.kinds += [kind] * len(attributes)
        self.images = torch.cat(images)
        self.gen = gen
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.kinds)

    def batch(self, n: int) -> tuple[torch.Tensor, list[str], list[tuple]]:
        """``(uint8 images [n, 3, S, S], captions, meanings)``: ``n // GROUP`` random groups, with replacement."""
        groups = torch.randint(0, len(self) // GROUP, (max(1, n // GROUP),), generator=self.gen)
        idx = (groups[:, None] * GROUP + torch.arange(GROUP)).flatten().tolist()
        captions, meanings = zip(*(caption(self.kinds[i], self.attributes[i], self.rng) for i in idx))
        return self.images[idx], list(captions), list(meanings)
