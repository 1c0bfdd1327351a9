"""Common corruptions of test images (Hendrycks & Dietterich, ICLR 2019): AdaMerging's robustness test.

AdaMerging's robustness experiment (Yang et al., ICLR 2024) merges the ViT-B/32 models of Cars, EuroSAT,
RESISC45 and GTSRB and adapts / evaluates on their test sets under seven corruptions, in table order:
motion blur, impulse noise, Gaussian noise, pixelate, spatter, contrast, JPEG compression
(:data:`CORRUPTIONS`; ``"clean"`` means none). Each function takes a PIL image, a severity 1–5 and a
NumPy generator and returns a PIL image of the same mode.

Two sets of constants (``profile``):

* ``"imagenet-c"`` — ImageNet-C's (Hendrycks' ``make_imagenet_c.py``); pixelate scales with the image.
* ``"cifar-10-c"`` — CIFAR-10-C's, which the published corrupted test sets behind the reference
  numbers use: FusionBench's ``fusion_bench/dataset/image_corruption/make_corruption.py`` holds these
  constants, and the HF datasets ``tanganke/{stanford_cars,eurosat,resisc45,gtsrb}`` (splits named by
  corruption) are FusionBench's test sets. Severity 2 is what the loaders of the same lineage read
  (tanganke/subspace_fusion ``src/datasets/corruption/*.py``: ``…_Corruption/severity_2/<corruption>``).
  Its pixelate resizes every image to 32×32 whatever its size (CIFAR's size is hard-coded there; the
  Cars pixelate split is 3.7 MB for 8,041 images): reproduced as is, which is why Cars scores ~2 %.

Randomness (noise, blur angle, spatter) comes from a generator seeded by ``seed`` and the image's own
pixels (:func:`image_seed`): the corruption is a pure function of the image, so the decode-once
cache, DataLoader workers and any reading order give the same corrupted image.

Written with NumPy, SciPy and PIL (torchvision for the Compose). Motion blur follows ImageMagick's
``MotionBlurImage`` kernel (one-sided Gaussian weights along a line) instead of calling ImageMagick. Spatter is simplified: the
reference's OpenCV Canny edges are Sobel-magnitude edges here, the rest (distance transform, histogram
equalisation, emboss, water / mud colours) follows the reference.
"""

from __future__ import annotations

import hashlib
import io
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from torchvision import transforms as T

CLEAN = "clean"
CORRUPTIONS = ("motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast",
               "jpeg_compression")  # the robustness table's column order
PROFILES = ("imagenet-c", "cifar-10-c")

# Severity 1..5 constants, per profile.
_PARAMS = {
    "imagenet-c": {
        "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
        "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
        "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],      # (radius, sigma)
        "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],                              # fraction of the size
        "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
        "jpeg_compression": [25, 18, 15, 10, 7],                             # JPEG quality
        "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                    (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
    },
    "cifar-10-c": {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],                           # of 32 px, output 32×32
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                    (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
    },
}
_WATER = np.array([175, 238, 238], np.float32) / 255   # pale turquoise
_MUD = np.array([63, 42, 20], np.float32) / 255


def _param(name: str, severity: int, profile: str):
    if profile not in _PARAMS:
        raise ValueError(f"unknown corruption profile {profile!r}; valid: {', '.join(PROFILES)}")
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be 1..5 (ImageNet-C's levels), got {severity}")
    return _PARAMS[profile][name][int(severity) - 1]


def _floats(image: Image.Image) -> np.ndarray:
    """RGB pixels as float32 in [0, 1], shape (H, W, 3)."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def _image(array: np.ndarray, mode: str) -> Image.Image:
    """[0, 1] floats back to 8-bit (truncated, as the reference saves them) in the input's mode."""
    pixels = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    out = Image.fromarray(pixels, "RGB")
    return out if mode == "RGB" else out.convert(mode)


def gaussian_noise(image: Image.Image, severity: int, rng: np.random.Generator,
                   profile: str = "imagenet-c") -> Image.Image:
    """x + N(0, c²) per pixel and channel."""
    x = _floats(image)
    return _image(x + rng.normal(scale=_param("gaussian_noise", severity, profile), size=x.shape), image.mode)


def impulse_noise(image: Image.Image, severity: int, rng: np.random.Generator,
                  profile: str = "imagenet-c") -> Image.Image:
    """Salt and pepper: a fraction c of the values set to 0 or 1 with equal odds (scikit-image's s&p)."""
    x = _floats(image)
    flipped = rng.random(x.shape) < _param("impulse_noise", severity, profile)
    salt = rng.random(x.shape) < 0.5
    x = np.where(flipped & salt, 1.0, np.where(flipped, 0.0, x))
    return _image(x, image.mode)


def _motion_blur_array(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage: width 2⌈radius⌉+1, weights exp(−i²/2σ²), taps i·(cos, sin)(angle), edge pixels repeated."""
    width = 2 * int(np.ceil(radius)) + 1
    steps = np.arange(width)
    weights = np.exp(-(steps ** 2) / (2.0 * sigma ** 2))
    weights /= weights.sum()
    theta = np.deg2rad(angle)
    dx, dy = np.rint(steps * np.cos(theta)).astype(int), np.rint(steps * np.sin(theta)).astype(int)
    h, w = x.shape[:2]
    pad = width - 1
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for weight, ox, oy in zip(weights, dx, dy):
        out += weight * padded[pad + oy:pad + oy + h, pad + ox:pad + ox + w]
    return out


def motion_blur(image: Image.Image, severity: int, rng: np.random.Generator,
                profile: str = "imagenet-c") -> Image.Image:
    """Blur along a line at a random angle in [−45°, 45°] (ImageMagick's kernel)."""
    radius, sigma = _param("motion_blur", severity, profile)
    angle = rng.uniform(-45, 45)
    return _image(_motion_blur_array(_floats(image), radius, sigma, angle), image.mode)


def pixelate(image: Image.Image, severity: int, rng: np.random.Generator | None = None,
             profile: str = "imagenet-c") -> Image.Image:
    """Box-downsample by c and box-upsample back; cifar-10-c: to int(32c)² and back to 32×32 (any input size)."""
    c = _param("pixelate", severity, profile)
    if profile == "cifar-10-c":
        small, size = (int(32 * c), int(32 * c)), (32, 32)
    else:
        small, size = (max(1, int(image.width * c)), max(1, int(image.height * c))), image.size
    return image.resize(small, Image.BOX).resize(size, Image.BOX)


def contrast(image: Image.Image, severity: int, rng: np.random.Generator | None = None,
             profile: str = "imagenet-c") -> Image.Image:
    """(x − mean) · c + mean, the mean per channel."""
    x = _floats(image)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _image((x - means) * _param("contrast", severity, profile) + means, image.mode)


def jpeg_compression(image: Image.Image, severity: int, rng: np.random.Generator | None = None,
                     profile: str = "imagenet-c") -> Image.Image:
    """Saved and re-read as JPEG at quality c."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=_param("jpeg_compression", severity, profile))
    out = Image.open(buffer).convert("RGB")
    return out if image.mode == "RGB" else out.convert(image.mode)


def _equalize(values: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a uint8 array (OpenCV's equalizeHist)."""
    hist = np.bincount(values.ravel(), minlength=256)
    cdf = hist.cumsum()
    lo = cdf[np.nonzero(hist)[0][0]]
    if cdf[-1] == lo:
        return values
    lut = np.clip(np.rint((cdf - lo) * 255.0 / (cdf[-1] - lo)), 0, 255).astype(np.uint8)
    return lut[values]


def spatter(image: Image.Image, severity: int, rng: np.random.Generator,
            profile: str = "imagenet-c") -> Image.Image:
    """Water drops (severities with mode 0) or mud (mode 1) from a thresholded smoothed noise layer.

    Simplified from the reference: edges of the liquid layer are Sobel-magnitude edges instead of
    OpenCV's Canny; distance transform, equalisation, emboss kernel and colours as the reference.
    """
    loc, scale, sigma, threshold, strength, mud = _param("spatter", severity, profile)
    x = _floats(image)
    liquid = ndimage.gaussian_filter(rng.normal(loc=loc, scale=scale, size=x.shape[:2]), sigma=sigma, mode="nearest")
    liquid[liquid < threshold] = 0
    if not mud:
        layer = (liquid * 255).astype(np.uint8).astype(np.float32)
        edges = np.hypot(ndimage.sobel(layer, 0), ndimage.sobel(layer, 1)) > 150
        dist = np.minimum(ndimage.distance_transform_edt(~edges), 20)
        dist = _equalize(ndimage.uniform_filter(dist, 3).astype(np.uint8))
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)
        dist = np.clip(ndimage.correlate(dist.astype(np.float32), emboss), 0, 255).astype(np.uint8)
        dist = ndimage.uniform_filter(dist.astype(np.float32), 3)
        m = liquid * dist
        peak = m.max()
        m = m / peak * strength if peak > 0 else m
        return _image(x + m[..., None] * _WATER, image.mode)
    m = ndimage.gaussian_filter((liquid > threshold).astype(np.float32), sigma=strength, mode="nearest")
    m[m < 0.8] = 0
    return _image(x * (1 - m[..., None]) + _MUD * m[..., None], image.mode)


CORRUPTION_FUNCTIONS: dict[str, Callable[..., Image.Image]] = {
    "motion_blur": motion_blur, "impulse_noise": impulse_noise, "gaussian_noise": gaussian_noise,
    "pixelate": pixelate, "spatter": spatter, "contrast": contrast, "jpeg_compression": jpeg_compression,
}


def check_corruption(name: str | None) -> str | None:
    """``name`` if it is a corruption, ``None`` for no corruption (``None`` or ``"clean"``); else a clear error."""
    if name is None or name == CLEAN:
        return None
    if name not in CORRUPTION_FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {CLEAN}, {', '.join(CORRUPTIONS)}")
    return name


def image_seed(image: Image.Image, seed: int = 0) -> list[int]:
    """``[seed, digest of the pixels]``: one generator per image, whatever the order images are read in."""
    h = hashlib.blake2b(f"{image.mode} {image.size}".encode(), digest_size=8)
    h.update(image.tobytes())
    return [int(seed), int.from_bytes(h.digest(), "little")]


def corrupt(image: Image.Image, name: str, severity: int = 5, seed: int = 0, profile: str = "imagenet-c") -> Image.Image:
    """``image`` under corruption ``name`` at ``severity``; the same image and seed always give the same result."""
    if check_corruption(name) is None:
        return image
    rng = np.random.default_rng(image_seed(image, seed))
    return CORRUPTION_FUNCTIONS[name](image, severity, rng, profile=profile)


class Corrupt:
    """PIL → PIL transform: :func:`corrupt` with fixed arguments; its ``repr`` keys the decode-once cache."""

    def __init__(self, name: str, severity: int = 5, seed: int = 0, profile: str = "imagenet-c"):
        if check_corruption(name) is None:
            raise ValueError("Corrupt needs a corruption name, not 'clean' / None")
        _param(name, severity, profile)  # fail now on a bad severity or profile, not at the first image
        self.name, self.severity, self.seed, self.profile = name, int(severity), int(seed), profile

    def __call__(self, image: Image.Image) -> Image.Image:
        return corrupt(image, self.name, self.severity, self.seed, self.profile)

    def __repr__(self) -> str:
        return f"Corrupt(name={self.name!r}, severity={self.severity}, seed={self.seed}, profile={self.profile!r})"


def with_corruption(preprocess: Callable, name: str | None, severity: int = 5, seed: int = 0,
                    profile: str = "imagenet-c") -> Callable:
    """``preprocess`` preceded by the corruption (unchanged for none); stays a flat ``Compose`` so the cache can split it."""
    if check_corruption(name) is None:
        return preprocess
    step = Corrupt(name, severity, seed, profile)
    steps = list(preprocess.transforms) if isinstance(preprocess, T.Compose) else [preprocess]
    return T.Compose([step, *steps])
