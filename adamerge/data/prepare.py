"""``adamerge-prepare-data``: fetch and arrange the eight benchmark datasets under one data folder.

What torchvision can download (MNIST, SVHN, GTSRB, DTD, EuroSAT, SUN397) is downloaded with it and
arranged into the task-vectors layout (:mod:`adamerge.data.layouts`); for the rest (Cars,
RESISC45) it prints where to get the files and the exact folders to create. ``--check`` only
reports what is present. Offline, the first failed download stops the command with a message
saying what to copy from a machine that has internet.

    adamerge-prepare-data --data-dir data                       # all eight
    adamerge-prepare-data --tasks MNIST SVHN --data-dir data
    adamerge-prepare-data --check --data-dir data
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sys
from pathlib import Path

import adamerge  # noqa: F401  (repairs torchvision before it is imported)
from adamerge.data.benchmark import PAPER_TASKS, raw_splits, task_name
from adamerge.data.errors import DatasetNotFoundError
from adamerge.data.layouts import EUROSAT_FOLDERS, LAYOUTS

SUN397_PARTITIONS_URL = "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip"
SUN397_PARTITIONS_MD5 = "29a205c0a0129d21f36cbecfefe81881"
EUROSAT_HELD_OUT_PER_CLASS = 270  # val and test images per class: 2,700 each, 21,600 train (task_vectors' sizes)
MANUAL = {
    "cars": [
        "Get car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat from a mirror of the "
        "original archives (e.g. on Kaggle), or the processed copy of all eight datasets linked from "
        "EnnengYang/AdaMerging issue #1, and unpack them into stanford_cars/.",
    ],
    "resisc45": [
        "Get NWPU-RESISC45 (Cheng et al., Proc. IEEE 2017; NWPU-RESISC45.rar, also in the processed copy linked "
        "from EnnengYang/AdaMerging issue #1) and unpack it so that the 45 class folders are in resisc45/NWPU-RESISC45/.",
        "Get the split lists https://storage.googleapis.com/remote_sensing_representations/resisc45-train.txt and "
        "resisc45-test.txt (same folder) into resisc45/.",
    ],
}


class DownloadError(RuntimeError):
    """A download failed (no network, server gone); says what to copy in by hand."""


# --- the one function that touches the network ------------------------------------------------

def fetch(task: str, data_dir: Path, downloads: Path) -> None:
    """Download ``task`` with torchvision: straight into place, or into ``downloads`` for arranging."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    if task == "mnist":
        for train in (True, False):
            datasets.MNIST(str(data_dir), train=train, download=True)
    elif task == "svhn":
        for split in ("train", "test"):
            datasets.SVHN(str(data_dir / "svhn"), split=split, download=True)
    elif task == "gtsrb":
        for split in ("train", "test"):
            datasets.GTSRB(str(data_dir), split=split, download=True)
    elif task == "dtd":
        datasets.DTD(str(downloads), split="train", partition=1, download=True)
    elif task == "eurosat":
        datasets.EuroSAT(str(downloads), download=True)
    elif task == "sun397":
        datasets.SUN397(str(downloads), download=True)
        download_and_extract_archive(SUN397_PARTITIONS_URL, download_root=str(downloads / "SUN397"),
                                     md5=SUN397_PARTITIONS_MD5)
    else:
        raise ValueError(f"{task} cannot be downloaded automatically")


# --- arranging downloaded files into the task-vectors layout (no network) -------------------------

def _place(source: Path, target: Path) -> None:
    """Hard link (no extra disk) where the file system allows it, else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def arrange_dtd(downloads: Path, data_dir: Path) -> None:
    """DTD partition 1: ``train1`` + ``val1`` → ``dtd/train``, ``test1`` → ``dtd/test`` (as task_vectors)."""
    base = downloads / "dtd" / "dtd"
    for split, lists in (("train", ("train1.txt", "val1.txt")), ("test", ("test1.txt",))):
        for listing in lists:
            for line in (base / "labels" / listing).read_text().split():
                _place(base / "images" / line, data_dir / "dtd" / split / line)


def arrange_eurosat(downloads: Path, data_dir: Path, seed: int = 0, held_out: int = EUROSAT_HELD_OUT_PER_CLASS) -> None:
    """EuroSAT RGB split per class into ``held_out`` val, ``held_out`` test, the rest train.

    Seeded, with task_vectors' sizes (21,600 / 2,700 / 2,700); their own file lists were never published.
    """
    source = downloads / "eurosat" / "2750"
    for cls in EUROSAT_FOLDERS:
        files = sorted(p.name for p in (source / cls).iterdir() if p.is_file())
        random.Random(f"{seed}-{cls}").shuffle(files)
        k = held_out
        for split, chosen in (("val", files[:k]), ("test", files[k:2 * k]), ("train", files[2 * k:])):
            for name in chosen:
                _place(source / cls / name, data_dir / "EuroSAT_splits" / split / cls / name)


def arrange_sun397(downloads: Path, data_dir: Path) -> None:
    """SUN397 partition 1: ``Training_01.txt`` → ``sun397/train``, ``Testing_01.txt`` → ``sun397/test``.

    ``/a/apartment_building/outdoor/sun_x.jpg`` goes to the class folder ``a_apartment_building_outdoor``.
    """
    base = downloads / "SUN397"
    for split, listing in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        found = sorted(base.rglob(listing))
        if not found:
            raise FileNotFoundError(f"{listing} not found under {base} (from {SUN397_PARTITIONS_URL})")
        for line in found[0].read_text().split():
            parts = line.strip("/").split("/")
            _place(base.joinpath(*parts), data_dir / "sun397" / split / "_".join(parts[:-1]) / parts[-1])


ARRANGE = {"dtd": arrange_dtd, "eurosat": arrange_eurosat, "sun397": arrange_sun397}


# --- the command ------------------------------------------------------------------------------------

def status(task: str, data_dir: Path) -> tuple[bool, str]:
    """``(complete, one line)``: split sizes when every split opens, else the first line of the error."""
    try:
        splits = raw_splits(task, data_dir)
    except (DatasetNotFoundError, ValueError) as err:
        return False, str(err).splitlines()[0]
    return True, ", ".join(f"{name} {len(split)}" for name, split in splits.items())


def instructions(task: str, data_dir: Path) -> str:
    layout = LAYOUTS[task]
    lines = [f"{layout.name} has to be fetched by hand. Source: {layout.source}"]
    lines += [f"  - {step}" for step in MANUAL.get(task, [])]
    lines += [f"  Arrange under {data_dir}:"] + [f"    {line}" for line in layout.layout]
    lines += [f"  Then check: adamerge-prepare-data --check --tasks {task} --data-dir {data_dir}"]
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="adamerge-prepare-data",
        description="Download and arrange the eight benchmark datasets (SUN397 Cars RESISC45 EuroSAT SVHN GTSRB "
                    "MNIST DTD) in the task-vectors layout; print instructions for those that need a manual step.")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS),
                        help="task names, any case, space or comma separated (default: all eight)")
    parser.add_argument("--data-dir", default=os.environ.get("ADAMERGE_DATA", "data"),
                        help="the data folder (paths.data_dir; default $ADAMERGE_DATA or ./data)")
    parser.add_argument("--downloads", default=None,
                        help="where raw archives are unpacked before arranging (default: <data-dir>/downloads)")
    parser.add_argument("--check", action="store_true", help="only report which datasets are present and complete")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        tasks = [task_name(t) for item in args.tasks for t in item.split(",") if t]
    except ValueError as err:
        print(f"adamerge-prepare-data: {err}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).expanduser()
    downloads = Path(args.downloads).expanduser() if args.downloads else data_dir / "downloads"

    if args.check:
        complete = True
        for task in tasks:
            ok, line = status(task, data_dir)
            complete &= ok
            print(f"{LAYOUTS[task].name:9s} {'complete' if ok else 'MISSING '}  {line}")
        return 0 if complete else 1

    socket.setdefaulttimeout(args.timeout)  # a dead network fails instead of hanging
    pending = []
    for task in tasks:
        shown = LAYOUTS[task].name
        ok, line = status(task, data_dir)
        if ok:
            print(f"{shown}: already complete ({line})")
            continue
        if not LAYOUTS[task].downloadable:
            print(instructions(task, data_dir) + "\n")
            pending.append(shown)
            continue
        print(f"{shown}: downloading with torchvision …", flush=True)
        try:
            fetch(task, data_dir, downloads)
        except Exception as err:  # torchvision raises URLError, OSError, RuntimeError for a failed download
            print(f"adamerge-prepare-data: could not download {shown}: {type(err).__name__}: {err}\n"
                  f"  Is this machine offline? Run `adamerge-prepare-data --tasks {task} --data-dir DIR` on a machine "
                  f"with internet and copy DIR/{LAYOUTS[task].folder} into {data_dir}/, or fetch it by hand:\n"
                  + instructions(task, data_dir), file=sys.stderr)
            return 2  # fail fast: the next downloads would fail the same way
        if task in ARRANGE:
            print(f"{shown}: arranging into {data_dir / LAYOUTS[task].folder} …", flush=True)
            ARRANGE[task](downloads, data_dir)
        ok, line = status(task, data_dir)
        print(f"{shown}: {'complete' if ok else 'STILL INCOMPLETE'} ({line})")
        if not ok:
            pending.append(shown)
    if pending:
        print(f"Not complete yet: {', '.join(pending)} (see above). Downloads, if any, are in {downloads}.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
