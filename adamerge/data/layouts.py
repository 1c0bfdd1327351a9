"""Where each benchmark dataset lives under ``data_dir``, and how its splits are read.

The layouts are the ones mlfoundations/task_vectors and EnnengYang/AdaMerging read, so a data
folder prepared for either works here unchanged: torchvision's own layout where torchvision has
the dataset (MNIST, SVHN, GTSRB), the task-vectors image-folder conventions otherwise.

Labels are always indices into :data:`adamerge.data.classnames.CLASSNAMES`: class folders are
matched by name to the canonical list (never "whatever folders happen to exist, sorted"), so a
missing class folder is an error instead of silently shifted labels.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset, Subset
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from adamerge.data.classnames import CLASSNAMES
from adamerge.data.errors import DatasetNotFoundError, IncompleteDatasetError

log = logging.getLogger(__name__)


@dataclass
class RawSplit:
    """One split as stored: ``dataset`` yields ``(PIL image, label)``; ``files`` are what it is read from.

    ``files`` (and ``indices``, for a subset held out of a larger split) key the decode-once cache.
    """

    dataset: Dataset
    files: list[Path]
    indices: list[int] | None = None

    def subset(self, indices: Sequence[int]) -> "RawSplit":
        return RawSplit(Subset(self.dataset, list(indices)), self.files, list(indices))

    def __len__(self) -> int:
        return len(self.dataset)


class CanonicalImageFolder(DatasetFolder):
    """torchvision's image folder with the class folders fixed in advance (label i = ``folders[i]``)."""

    def __init__(self, root: Path, folders: Sequence[str], extensions=IMG_EXTENSIONS, is_valid_file=None):
        self.folders = list(folders)
        super().__init__(str(root), loader=default_loader, is_valid_file=is_valid_file,
                         extensions=None if is_valid_file is not None else extensions)

    def find_classes(self, directory):  # torchvision's documented hook for a custom class list
        return list(self.folders), {name: i for i, name in enumerate(self.folders)}


class ListedImages(Dataset):
    """Images named by an annotation file: ``samples`` is ``[(path, label), …]``, decoded with PIL."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return default_loader(path), label


@dataclass(frozen=True)
class DatasetLayout:
    key: str                    # the task name (lower case, as in configs and checkpoint file names)
    name: str                   # the paper's spelling (messages, tables)
    folder: str                 # its folder under data_dir
    layout: tuple[str, ...]     # what must exist, one line per item (error messages, README)
    source: str                 # where the files come from
    downloadable: bool          # adamerge-prepare-data can fetch and arrange it
    val_on_disk: bool = False   # val is its own folder (EuroSAT); otherwise held out of train


def _fail(layout: DatasetLayout, data_dir: Path, looked_in: Path, problem: str, incomplete: bool = False):
    cls = IncompleteDatasetError if incomplete else DatasetNotFoundError
    raise cls(layout.key, data_dir, looked_in, f"{layout.name}: {problem}", list(layout.layout))


def _listing(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _need_file(layout: DatasetLayout, data_dir: Path, path: Path) -> Path:
    if not path.is_file():
        parent_exists = (data_dir / layout.folder).exists()
        _fail(layout, data_dir, path, "file not found", incomplete=parent_exists)
    return path


def _folder_split(layout: DatasetLayout, data_dir: Path, root: Path, folders: Sequence[str],
                  extensions=IMG_EXTENSIONS, is_valid_file: Callable[[str], bool] | None = None) -> RawSplit:
    """Every canonical class folder of ``root``, each with at least one image, as a ``RawSplit``."""
    if not root.is_dir():
        _fail(layout, data_dir, root, "folder not found", incomplete=(data_dir / layout.folder).exists())
    present = {p.name for p in root.iterdir() if p.is_dir()}
    if not present:
        _fail(layout, data_dir, root, "folder has no class folders")
    missing = [f for f in folders if f not in present]
    if missing:
        _fail(layout, data_dir, root, f"{len(missing)} of {len(folders)} class folders missing: {_listing(missing)}",
              incomplete=True)
    extra = sorted(present - set(folders))
    if extra:
        log.warning("%s: ignoring %d folder(s) that are not classes of the dataset in %s: %s",
                    layout.name, len(extra), root, _listing(extra))
    try:
        dataset = CanonicalImageFolder(root, folders, extensions=extensions, is_valid_file=is_valid_file)
    except FileNotFoundError as err:  # torchvision: a class folder without a single valid image
        _fail(layout, data_dir, root, f"class folder(s) without images: {err}", incomplete=True)
    return RawSplit(dataset, [Path(p) for p, _ in dataset.samples])


def _listed_split(layout: DatasetLayout, data_dir: Path, samples: list[tuple[str, int]], looked_in: Path) -> RawSplit:
    if not samples:
        _fail(layout, data_dir, looked_in, "annotation file lists no images", incomplete=True)
    absent = [p for p, _ in samples if not Path(p).is_file()]
    if absent:
        _fail(layout, data_dir, looked_in, f"{len(absent)} of {len(samples)} annotated images missing: "
              f"{_listing([Path(p).name for p in absent])}", incomplete=True)
    return RawSplit(ListedImages(samples), [Path(p) for p, _ in samples])


# --- the eight datasets ----------------------------------------------------------------------------

def sun397_folder(classname: str) -> str:
    """``"apartment building outdoor"`` → ``"a_apartment_building_outdoor"`` (SUN397's /a/apartment_building/outdoor)."""
    return f"{classname[0]}_{classname.replace(' ', '_')}"


EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
GTSRB_FOLDERS = [f"{i:05d}" for i in range(43)]
RESISC45_FOLDERS = [c.replace(" ", "_") for c in CLASSNAMES["resisc45"]]
SUN397_FOLDERS = [sun397_folder(c) for c in CLASSNAMES["sun397"]]
DTD_FOLDERS = list(CLASSNAMES["dtd"])
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

LAYOUTS: dict[str, DatasetLayout] = {
    "sun397": DatasetLayout(
        "sun397", "SUN397", "sun397",
        ("sun397/train/<class>/*.jpg   397 class folders a_abbey … y_youth_hostel (partition 1: Training_01.txt)",
         "sun397/test/<class>/*.jpg    same folders (Testing_01.txt); task_vectors' name for it, val/, is read too"),
        "https://vision.princeton.edu/projects/2010/SUN/ (SUN397.tar.gz + Partitions.zip)", True),
    "cars": DatasetLayout(
        "cars", "Cars", "stanford_cars",
        ("stanford_cars/devkit/cars_meta.mat, stanford_cars/devkit/cars_train_annos.mat",
         "stanford_cars/cars_train/*.jpg, stanford_cars/cars_test/*.jpg",
         "stanford_cars/cars_test_annos_withlabels.mat   (or in devkit/, as AdaMerging's copy has it)"),
        "Stanford Cars, https://ai.stanford.edu/~jkrause/cars/car_dataset.html (offline now; "
        "torchvision.datasets.StanfordCars reads the same layout)", False),
    "resisc45": DatasetLayout(
        "resisc45", "RESISC45", "resisc45",
        ("resisc45/NWPU-RESISC45/<class>/*.jpg   45 class folders airplane … wetland",
         "resisc45/resisc45-train.txt, resisc45/resisc45-test.txt   (file names per split)"),
        "NWPU-RESISC45 (https://www.tensorflow.org/datasets/catalog/resisc45, OneDrive NWPU-RESISC45.rar); "
        "split lists https://storage.googleapis.com/remote_sensing_representations/resisc45-{train,test}.txt", False),
    "eurosat": DatasetLayout(
        "eurosat", "EuroSAT", "EuroSAT_splits",
        ("EuroSAT_splits/{train,val,test}/<class>/*.jpg   10 class folders AnnualCrop … SeaLake",),
        "EuroSAT RGB (https://github.com/phelber/EuroSAT), split 21,600 / 2,700 / 2,700", True, val_on_disk=True),
    "svhn": DatasetLayout(
        "svhn", "SVHN", "svhn",
        ("svhn/train_32x32.mat, svhn/test_32x32.mat   (torchvision.datasets.SVHN, root=<data_dir>/svhn)",),
        "http://ufldl.stanford.edu/housenumbers/ (via torchvision)", True),
    "gtsrb": DatasetLayout(
        "gtsrb", "GTSRB", "gtsrb",
        ("gtsrb/GTSRB/Training/<00000…00042>/*.ppm   (torchvision.datasets.GTSRB, root=<data_dir>)",
         "gtsrb/GTSRB/Final_Test/Images/*.ppm, gtsrb/GT-final_test.csv"),
        "https://benchmark.ini.rub.de/ (via torchvision)", True),
    "mnist": DatasetLayout(
        "mnist", "MNIST", "MNIST",
        ("MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   (torchvision.datasets.MNIST, root=<data_dir>)",),
        "http://yann.lecun.com/exdb/mnist/ (via torchvision's mirrors)", True),
    "dtd": DatasetLayout(
        "dtd", "DTD", "dtd",
        ("dtd/train/<class>/*.jpg   47 class folders banded … zigzagged (DTD partition 1: train1 + val1)",
         "dtd/test/<class>/*.jpg    (test1); task_vectors' name for it, val/, is read too"),
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz)", True),
}


def _test_or_legacy_val(base: Path) -> Path:
    """task_vectors named the test folders of SUN397 and DTD ``val``; AdaMerging renamed them ``test``."""
    test = base / "test"
    return test if test.exists() or not (base / "val").is_dir() else base / "val"


def _sun397(data_dir: Path, split: str) -> RawSplit:
    base = data_dir / "sun397"
    root = base / "train" if split == "train" else _test_or_legacy_val(base)
    return _folder_split(LAYOUTS["sun397"], data_dir, root, SUN397_FOLDERS)


def _dtd(data_dir: Path, split: str) -> RawSplit:
    base = data_dir / "dtd"
    root = base / "train" if split == "train" else _test_or_legacy_val(base)
    return _folder_split(LAYOUTS["dtd"], data_dir, root, DTD_FOLDERS)


def _eurosat(data_dir: Path, split: str) -> RawSplit:
    return _folder_split(LAYOUTS["eurosat"], data_dir, data_dir / "EuroSAT_splits" / split, EUROSAT_FOLDERS)


def _resisc45(data_dir: Path, split: str) -> RawSplit:
    layout = LAYOUTS["resisc45"]
    listing = _need_file(layout, data_dir, data_dir / "resisc45" / f"resisc45-{split}.txt")
    names = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
    return _folder_split(layout, data_dir, data_dir / "resisc45" / "NWPU-RESISC45", RESISC45_FOLDERS,
                         is_valid_file=lambda path: Path(path).name in names)


def _cars(data_dir: Path, split: str) -> RawSplit:
    import scipy.io

    layout = LAYOUTS["cars"]
    base = data_dir / "stanford_cars"
    if not base.is_dir():
        _fail(layout, data_dir, base, "folder not found")
    _need_file(layout, data_dir, base / "devkit" / "cars_meta.mat")
    if split == "train":
        annotations, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annotations, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
        if not annotations.is_file() and (base / "devkit" / annotations.name).is_file():
            annotations = base / "devkit" / annotations.name
    _need_file(layout, data_dir, annotations)
    if not images.is_dir():
        _fail(layout, data_dir, images, "folder not found", incomplete=True)
    rows = scipy.io.loadmat(str(annotations), squeeze_me=True)["annotations"]
    samples = [(str(images / str(row["fname"])), int(row["class"]) - 1) for row in rows.flat]
    return _listed_split(layout, data_dir, samples, annotations)


def _gtsrb(data_dir: Path, split: str) -> RawSplit:
    layout = LAYOUTS["gtsrb"]
    base = data_dir / "gtsrb"
    if split == "train":
        return _folder_split(layout, data_dir, base / "GTSRB" / "Training", GTSRB_FOLDERS, extensions=(".ppm",))
    images = base / "GTSRB" / "Final_Test" / "Images"
    if not images.is_dir():
        _fail(layout, data_dir, images, "folder not found", incomplete=base.exists())
    truth = _need_file(layout, data_dir, base / "GT-final_test.csv")
    with open(truth, newline="") as handle:
        samples = [(str(images / row["Filename"]), int(row["ClassId"]))
                   for row in csv.DictReader(handle, delimiter=";", skipinitialspace=True)]
    return _listed_split(layout, data_dir, samples, truth)


def _mnist(data_dir: Path, split: str) -> RawSplit:
    from torchvision.datasets import MNIST

    layout = LAYOUTS["mnist"]
    files = [_need_file(layout, data_dir, data_dir / "MNIST" / "raw" / name) for name in MNIST_FILES[split]]
    return RawSplit(MNIST(str(data_dir), train=split == "train", download=False), files)


def _svhn(data_dir: Path, split: str) -> RawSplit:
    from torchvision.datasets import SVHN

    layout = LAYOUTS["svhn"]
    path = _need_file(layout, data_dir, data_dir / "svhn" / f"{split}_32x32.mat")
    try:
        dataset = SVHN(str(data_dir / "svhn"), split=split, download=False)
    except RuntimeError as err:  # torchvision checks the file's MD5
        _fail(layout, data_dir, path, f"file fails torchvision's MD5 check, probably a partial download ({err})",
              incomplete=True)
    return RawSplit(dataset, [path])


_OPENERS: dict[str, Callable[[Path, str], RawSplit]] = {
    "sun397": _sun397, "cars": _cars, "resisc45": _resisc45, "eurosat": _eurosat,
    "svhn": _svhn, "gtsrb": _gtsrb, "mnist": _mnist, "dtd": _dtd,
}


def open_split(task: str, data_dir: str | Path, split: str) -> RawSplit:
    """The stored ``train`` or ``test`` split of ``task`` (and ``val`` where it is on disk: EuroSAT)."""
    layout = LAYOUTS[task]
    allowed = ("train", "val", "test") if layout.val_on_disk else ("train", "test")
    if split not in allowed:
        raise ValueError(f"{layout.name} stores the splits {allowed}, not {split!r}")
    return _OPENERS[task](Path(data_dir).expanduser(), split)
