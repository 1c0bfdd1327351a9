"""CLIP prompt templates of the eight benchmark tasks, as the task-vectors literature uses them.

Data, not code: the lists of mlfoundations/task_vectors (``src/datasets/templates.py``), which
AdaMerging and later merging papers reuse unchanged; they go back to OpenAI CLIP's prompts. Each
template is a ``str.format`` pattern with one ``{}`` for the class name, as
:func:`adamerge.models.heads.zero_shot_head` fills them.
"""

from __future__ import annotations

SUN397 = [
    "a photo of a {}.",
    "a photo of the {}.",
]

CARS = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
]

RESISC45 = [
    "satellite imagery of {}.",
    "aerial imagery of {}.",
    "satellite photo of {}.",
    "aerial photo of {}.",
    "satellite view of {}.",
    "aerial view of {}.",
    "satellite imagery of a {}.",
    "aerial imagery of a {}.",
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    "satellite view of a {}.",
    "aerial view of a {}.",
    "satellite imagery of the {}.",
    "aerial imagery of the {}.",
    "satellite photo of the {}.",
    "aerial photo of the {}.",
    "satellite view of the {}.",
    "aerial view of the {}.",
]

EUROSAT = [
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
]

SVHN = [
    'a photo of the number: "{}".',
]

GTSRB = [
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
]

MNIST = [
    'a photo of the number: "{}".',
]

DTD = [
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
    "a photo of the {} thing.",
    "a photo of the {} object.",
]

TEMPLATES: dict[str, list[str]] = {
    "sun397": SUN397, "cars": CARS, "resisc45": RESISC45, "eurosat": EUROSAT,
    "svhn": SVHN, "gtsrb": GTSRB, "mnist": MNIST, "dtd": DTD,
}
