"""The eight benchmark datasets as tiny fake folders in each real on-disk layout (all class folders, one or two
small images each), for the loader tests and the paper presets' runs."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from adamerge.data.classnames import CLASSNAMES
from adamerge.data.layouts import DTD_FOLDERS, EUROSAT_FOLDERS, GTSRB_FOLDERS, RESISC45_FOLDERS, SUN397_FOLDERS


def _picture(path: Path, seed: int, size=(20, 14), mode="RGB") -> None:
    """A small random picture (sizes vary so that resize and crop do real work)."""
    gen = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = gen.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)


def _class_folders(root: Path, folders, per_class: int = 1, ext: str = ".jpg", start: int = 0) -> list[tuple[str, int]]:
    written = []
    for label, folder in enumerate(folders):
        for k in range(per_class):
            name = f"{folder}_{start + k}{ext}"
            _picture(root / folder / name, seed=1000 * label + start + k, size=(16 + label % 7, 12 + k % 5))
            written.append((name, label))
    return written


def make_sun397(data_dir: Path, test_name: str = "test") -> None:
    _class_folders(data_dir / "sun397" / "train", SUN397_FOLDERS)
    _class_folders(data_dir / "sun397" / test_name, SUN397_FOLDERS, start=5)


def make_dtd(data_dir: Path, test_name: str = "test") -> None:
    _class_folders(data_dir / "dtd" / "train", DTD_FOLDERS)
    _class_folders(data_dir / "dtd" / test_name, DTD_FOLDERS, start=5)


def make_eurosat(data_dir: Path) -> None:
    for split, per_class in (("train", 2), ("val", 1), ("test", 2)):
        _class_folders(data_dir / "EuroSAT_splits" / split, EUROSAT_FOLDERS, per_class, start=10 * len(split))


def make_resisc45(data_dir: Path) -> None:
    root = data_dir / "resisc45" / "NWPU-RESISC45"
    train = _class_folders(root, RESISC45_FOLDERS, start=0)
    test = _class_folders(root, RESISC45_FOLDERS, start=1)
    (data_dir / "resisc45" / "resisc45-train.txt").write_text("\n".join(n for n, _ in train) + "\n")
    (data_dir / "resisc45" / "resisc45-test.txt").write_text("\n".join(n for n, _ in test) + "\n")


def _annotations(rows: list[tuple[str, int]]) -> np.ndarray:
    out = np.empty(len(rows), dtype=[("fname", object), ("class", object)])
    for i, (fname, cls) in enumerate(rows):
        out[i] = (fname, np.uint8(cls))
    return out


def make_cars(data_dir: Path, test_annotations_in_devkit: bool = False) -> dict[str, list[int]]:
    base = data_dir / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(CLASSNAMES["cars"], dtype=object)})
    labels = {"train": [3, 0, 195, 7, 7, 42, 100, 150, 1, 2, 9, 11], "test": [195, 0, 17]}
    for split, classes in labels.items():
        rows = [(f"{i:05d}.jpg", c + 1) for i, c in enumerate(classes)]  # the .mat counts classes from 1
        for i, (fname, _) in enumerate(rows):
            _picture(base / f"cars_{split}" / fname, seed=i + len(split))
        target = (base / "devkit" / "cars_train_annos.mat" if split == "train" else
                  base / ("devkit" if test_annotations_in_devkit else "") / "cars_test_annos_withlabels.mat")
        scipy.io.savemat(target, {"annotations": _annotations(rows)})
    return labels


def make_gtsrb(data_dir: Path) -> list[int]:
    base = data_dir / "gtsrb"
    _class_folders(base / "GTSRB" / "Training", GTSRB_FOLDERS, ext=".ppm")
    test_labels = [42, 0, 14, 14, 7]
    with open(base / "GT-final_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for i, label in enumerate(test_labels):
            _picture(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", seed=i)
            writer.writerow([f"{i:05d}.ppm", 20, 14, 1, 1, 19, 13, label])
    return test_labels


def _idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0x0800 | ndim, uint8), big-endian sizes, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(data_dir: Path) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(0)
    labels = {"train": np.arange(30) % 10, "test": np.array([7, 2, 1, 0, 4])}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _idx(data_dir / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", gen.integers(0, 256, (len(labels[split]), 28, 28)))
        _idx(data_dir / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels[split])
    return labels


def make_svhn(data_dir: Path) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(1)
    labels = {"train": np.arange(1, 21) % 10, "test": np.array([0, 5, 9])}
    for split, digits in labels.items():
        stored = np.where(digits == 0, 10, digits).reshape(-1, 1)  # SVHN stores the digit 0 as 10
        images = gen.integers(0, 256, (32, 32, 3, len(digits)), dtype=np.uint8)
        (data_dir / "svhn").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(data_dir / "svhn" / f"{split}_32x32.mat", {"X": images, "y": stored})
    return labels
