"""The eight benchmark datasets: fake folders in each real layout, read through the real loaders.

Every dataset gets a tiny copy of its on-disk layout (all class folders, one or two small images
each); the tests check labels against the canonical class lists, the task_vectors validation
hold-out, that the decode-once cache yields exactly the plain PIL pipeline's tensors, each
missing-data error, and ``adamerge-prepare-data`` without touching the network.
"""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms as T

import adamerge.data.decode_cache as decode_cache
import adamerge.data.prepare as prepare
from adamerge.data.benchmark import (PAPER_NAMES, PAPER_TASKS, BenchmarkTasks, benchmark_tasks, hold_out_val,
                                     raw_splits, task_name)
from adamerge.data.classnames import CLASSNAMES
from adamerge.data.decode_cache import DecodedImages, Preprocessed, cache_key, cached_split, split_transform
from adamerge.data.errors import DatasetNotFoundError, IncompleteDatasetError
from adamerge.data.layouts import DTD_FOLDERS, EUROSAT_FOLDERS, SUN397_FOLDERS, sun397_folder
from adamerge.data.task import TensorImages
from adamerge.data.templates import TEMPLATES


from tests.fake_datasets import (_picture, make_cars, make_dtd, make_eurosat, make_gtsrb, make_mnist,  # noqa: E402
                                 make_resisc45, make_sun397, make_svhn)


@pytest.fixture()
def svhn_md5_skipped(monkeypatch):
    """Fake .mat files cannot have torchvision's MD5; everything else of torchvision's SVHN runs."""
    from torchvision.datasets import SVHN
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)


def _labels(dataset) -> list[int]:
    return [int(label) for _, label in (dataset[i] for i in range(len(dataset)))]


# --- class names, templates, task names -----------------------------------------------------------

def test_class_lists_and_templates_are_the_literature_ones():
    counts = {"sun397": 397, "cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10, "dtd": 47}
    assert {t: len(CLASSNAMES[t]) for t in PAPER_TASKS} == counts
    assert all(len(set(CLASSNAMES[t])) == n for t, n in counts.items())
    assert PAPER_TASKS == ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert list(PAPER_NAMES.values()) == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    for task in PAPER_TASKS:
        assert TEMPLATES[task] and all(t.count("{}") == 1 for t in TEMPLATES[task])
    assert [len(TEMPLATES[t]) for t in PAPER_TASKS] == [2, 8, 18, 3, 1, 3, 1, 8]
    assert CLASSNAMES["eurosat"][2] == "brushland or shrubland" and CLASSNAMES["cars"][0] == "AM General Hummer SUV 2000"
    # SUN397's class folders, sorted as ImageFolder sorts them, give the label order of the class list.
    assert SUN397_FOLDERS == sorted(SUN397_FOLDERS)
    assert sun397_folder("apartment building outdoor") == "a_apartment_building_outdoor"
    assert TEMPLATES["gtsrb"][0].format("stop") == 'a zoomed in photo of a "stop" traffic sign.'


def test_task_names_any_case_and_unknown_names_list_the_valid_ones():
    assert task_name("SUN397") == "sun397" and task_name("EuroSAT") == "eurosat"
    with pytest.raises(ValueError, match="valid: sun397, cars, resisc45, eurosat, svhn, gtsrb, mnist, dtd"):
        task_name("imagenet")


def test_val_hold_out_is_task_vectors_random_split():
    train, val = hold_out_val(60000)
    assert train[0] == 36044  # the index task_vectors asserts for MNISTVal
    assert len(val) == 5000 and len(train) == 55000  # 10 % capped at 5,000
    train, val = hold_out_val(397)
    assert len(val) == 39 and sorted(train + val) == list(range(397))
    assert hold_out_val(397) == (train, val)  # fixed seed
    with pytest.raises(ValueError, match="too small"):
        hold_out_val(5)


# --- every layout, read through the real loaders --------------------------------------------------

def _load(task, data_dir, backbone, **kw):
    tasks = benchmark_tasks([task.upper()], data_dir, backbone=backbone, **kw)  # any case
    assert isinstance(tasks, BenchmarkTasks) and [t.name for t in tasks] == [task]
    return tasks[0]


def _check_task(task, expected_test_labels, n_train_total, backbone):
    assert task.classnames == CLASSNAMES[task.name] and task.templates == TEMPLATES[task.name]
    assert _labels(task.split("test")) == list(expected_test_labels)
    image, _ = task.split("test")[0]
    assert image.dtype == torch.float32 and image.shape == (3, backbone.image_size, backbone.image_size)
    n_val = len(task.split("val"))
    assert len(task.split("train")) + n_val == n_train_total


@pytest.mark.parametrize("test_name", ["test", "val"])  # AdaMerging's name and task_vectors' name of the test folder
def test_sun397_layout(tmp_path, tiny_backbone, test_name):
    make_sun397(tmp_path, test_name)
    raw = raw_splits("sun397", tmp_path, ["test"])["test"]
    assert raw.dataset.targets == list(range(397))  # folder i ↔ class i, over all 397 folders
    assert Path(raw.dataset.samples[396][0]).parent.name == "y_youth_hostel"
    task = _load("sun397", tmp_path, tiny_backbone)
    assert len(task.split("val")) == 39 and len(task.split("train")) == 358  # 10 % of 397 held out
    assert [int(task.split("test")[i][1]) for i in (0, 200, 396)] == [0, 200, 396]


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_dtd_layout(tmp_path, tiny_backbone, test_name):
    make_dtd(tmp_path, test_name)
    _check_task(_load("dtd", tmp_path, tiny_backbone), range(47), 47, tiny_backbone)


def test_eurosat_layout_has_its_own_val_folder(tmp_path, tiny_backbone):
    make_eurosat(tmp_path)
    task = _load("eurosat", tmp_path, tiny_backbone)
    _check_task(task, [c for c in range(10) for _ in range(2)], 30, tiny_backbone)
    assert len(task.split("val")) == 10 and _labels(task.split("val")) == list(range(10))
    assert len(task.split("train")) == 20  # the whole train folder: nothing held out


def test_resisc45_layout_reads_the_split_lists(tmp_path, tiny_backbone):
    make_resisc45(tmp_path)
    _check_task(_load("resisc45", tmp_path, tiny_backbone), range(45), 45, tiny_backbone)


@pytest.mark.parametrize("in_devkit", [False, True])  # torchvision's place and AdaMerging's place of the test labels
def test_cars_layout(tmp_path, tiny_backbone, in_devkit):
    labels = make_cars(tmp_path, in_devkit)
    task = _load("cars", tmp_path, tiny_backbone)
    _check_task(task, labels["test"], len(labels["train"]), tiny_backbone)
    assert sorted(_labels(task.split("train")) + _labels(task.split("val"))) == sorted(labels["train"])


def test_gtsrb_layout(tmp_path, tiny_backbone):
    test_labels = make_gtsrb(tmp_path)
    _check_task(_load("gtsrb", tmp_path, tiny_backbone), test_labels, 43, tiny_backbone)
    assert raw_splits("gtsrb", tmp_path, ["train"])["train"].dataset.dataset.targets == list(range(43))


def test_mnist_layout(tmp_path, tiny_backbone):
    labels = make_mnist(tmp_path)
    _check_task(_load("mnist", tmp_path, tiny_backbone), labels["test"], 30, tiny_backbone)


def test_svhn_layout_maps_label_ten_to_zero(tmp_path, tiny_backbone, svhn_md5_skipped):
    labels = make_svhn(tmp_path)
    _check_task(_load("svhn", tmp_path, tiny_backbone), labels["test"], 20, tiny_backbone)


def test_unseen_tasks_come_apart_from_the_merged_ones(tmp_path, tiny_backbone):
    make_eurosat(tmp_path)
    make_mnist(tmp_path)
    tasks = benchmark_tasks(["eurosat"], tmp_path, backbone=tiny_backbone, unseen=["mnist"], splits=["test"])
    assert [t.name for t in tasks] == ["eurosat"] and [t.name for t in tasks.unseen] == ["mnist"]
    with pytest.raises(ValueError, match="both merged and 'unseen'"):
        benchmark_tasks(["eurosat"], tmp_path, backbone=tiny_backbone, unseen=["EuroSAT"])
    with pytest.raises(ValueError, match="backbone"):
        benchmark_tasks(["eurosat"], tmp_path)


# --- decode-once cache ----------------------------------------------------------------------------

@pytest.mark.parametrize("task,make", [("eurosat", make_eurosat), ("mnist", make_mnist)])
def test_cache_yields_exactly_the_plain_pil_pipeline(tmp_path, tiny_backbone, task, make):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make(data)
    plain = _load(task, data, tiny_backbone, cache_dir=None)
    cached = _load(task, data, tiny_backbone, cache_dir=cache)
    for split in ("test", "val"):
        fast = cached.split(split)
        assert isinstance(fast, TensorImages) and isinstance(fast.images, DecodedImages)
        assert fast.images.array.dtype == np.uint8  # stored before ToTensor: a quarter of the float size
        expected = [plain.split(split)[i] for i in range(len(plain.split(split)))]
        assert len(fast) == len(expected)
        for i, (image, label) in enumerate(expected):
            got_image, got_label = fast[i]
            assert torch.equal(got_image, image) and int(got_label) == label
        # batch indexing (what evaluation and adaptation use) gives the same tensors
        stacked = torch.stack([img for img, _ in expected])
        assert torch.equal(fast.images[0:len(fast)], stacked)
        assert torch.equal(fast.images[torch.tensor([2, 0])], stacked[[2, 0]])
    assert not isinstance(cached.split("train"), TensorImages)  # train is not cached by default
    # a DataLoader worker gets the file path, not the array
    clone = pickle.loads(pickle.dumps(cached.split("test").images))
    assert torch.equal(clone[0:3], cached.split("test").images[0:3])


def test_cache_is_built_once_and_keyed_by_content(tmp_path, tiny_backbone, monkeypatch):
    make_dtd(tmp_path / "data")
    raw = raw_splits("dtd", tmp_path / "data", ["test"])["test"]
    preprocess = tiny_backbone.preprocess
    first = cached_split(raw, preprocess, tmp_path / "cache", "DTD-test", root=tmp_path / "data")
    entries = list((tmp_path / "cache" / "datasets").glob("DTD-test-*"))
    assert len([e for e in entries if e.is_dir()]) == 1

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")
    monkeypatch.setattr(decode_cache, "_build", no_rebuild)
    again = cached_split(raw, preprocess, tmp_path / "cache", "DTD-test", root=tmp_path / "data")
    assert torch.equal(again.images[0:47], first.images[0:47])

    stored, _ = split_transform(preprocess)
    key = cache_key(raw, stored, tmp_path / "data")
    assert key == cache_key(raw_splits("dtd", tmp_path / "data", ["test"])["test"], stored, tmp_path / "data")
    assert key != cache_key(raw, T.Compose([T.Resize(20), T.CenterCrop(20)]), tmp_path / "data")
    assert key != cache_key(raw.subset([0, 1]), stored, tmp_path / "data")
    changed = raw.files[5]
    _picture(changed, seed=99, size=(30, 30))  # same name, new content: size and mtime change
    assert key != cache_key(raw, stored, tmp_path / "data")


def test_cache_key_ignores_object_addresses(tmp_path):
    make_eurosat(tmp_path)
    raw = raw_splits("eurosat", tmp_path, ["val"])["val"]

    def converter():
        def to_rgb(image):
            return image.convert("RGB")
        return to_rgb
    a, b = T.Compose([converter(), T.Resize(8)]), T.Compose([converter(), T.Resize(8)])
    assert " at 0x" in repr(a) and repr(a) != repr(b) and cache_key(raw, a, tmp_path) == cache_key(raw, b, tmp_path)


def test_transform_without_to_tensor_is_cached_whole(tmp_path):
    make_eurosat(tmp_path)
    raw = raw_splits("eurosat", tmp_path, ["test"])["test"]
    transform = T.Compose([T.Resize((8, 8)), T.PILToTensor()])
    assert split_transform(transform) == (transform, None)
    cached = cached_split(raw, transform, tmp_path / "cache", "EuroSAT-test")
    plain = Preprocessed(raw.dataset, transform)
    assert all(torch.equal(cached[i][0], plain[i][0]) for i in range(len(plain)))


# --- missing, empty and incomplete data -----------------------------------------------------------

def test_missing_dataset_names_folder_layout_and_fix(tmp_path, tiny_backbone):
    with pytest.raises(DatasetNotFoundError) as info:
        benchmark_tasks(["dtd"], tmp_path, backbone=tiny_backbone)
    message = str(info.value)
    assert not isinstance(info.value, IncompleteDatasetError)
    assert str(tmp_path / "dtd" / "train") in message and "dtd/test/<class>/*.jpg" in message
    assert f"adamerge-prepare-data --tasks dtd --data-dir {tmp_path}" in message


def test_empty_dataset_folder(tmp_path, tiny_backbone):
    (tmp_path / "EuroSAT_splits" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no class folders"):
        benchmark_tasks(["eurosat"], tmp_path, backbone=tiny_backbone)


def test_missing_class_folder_is_named(tmp_path, tiny_backbone):
    make_dtd(tmp_path)
    for image in (tmp_path / "dtd" / "test" / "paisley").iterdir():
        image.unlink()
    (tmp_path / "dtd" / "test" / "paisley").rmdir()
    with pytest.raises(IncompleteDatasetError, match=r"1 of 47 class folders missing: paisley") as info:
        benchmark_tasks(["dtd"], tmp_path, backbone=tiny_backbone)
    assert "adamerge-prepare-data --tasks dtd" in str(info.value)


def test_class_folder_without_images(tmp_path, tiny_backbone):
    make_eurosat(tmp_path)
    for image in (tmp_path / "EuroSAT_splits" / "test" / "River").iterdir():
        image.unlink()
    with pytest.raises(IncompleteDatasetError, match="without images"):
        benchmark_tasks(["eurosat"], tmp_path, backbone=tiny_backbone)


def test_missing_split_folder_and_missing_annotated_images(tmp_path, tiny_backbone):
    make_dtd(tmp_path)
    for folder in (tmp_path / "dtd" / "test").iterdir():
        for image in folder.iterdir():
            image.unlink()
        folder.rmdir()
    (tmp_path / "dtd" / "test").rmdir()
    with pytest.raises(IncompleteDatasetError, match="folder not found"):
        benchmark_tasks(["dtd"], tmp_path, backbone=tiny_backbone)
    make_cars(tmp_path)
    (tmp_path / "stanford_cars" / "cars_test" / "00001.jpg").unlink()
    with pytest.raises(IncompleteDatasetError, match=r"1 of 3 annotated images missing: 00001.jpg"):
        benchmark_tasks(["cars"], tmp_path, backbone=tiny_backbone)


def test_svhn_file_failing_torchvisions_md5_says_partial_download(tmp_path, tiny_backbone):
    make_svhn(tmp_path)
    with pytest.raises(IncompleteDatasetError, match="MD5"):
        benchmark_tasks(["svhn"], tmp_path, backbone=tiny_backbone)


# --- adamerge-prepare-data --------------------------------------------------------------------

def test_check_reports_present_and_missing(tmp_path, capsys):
    make_eurosat(tmp_path)
    assert prepare.main(["--check", "--tasks", "EuroSAT,mnist", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "EuroSAT   complete  train 20, val 10, test 20" in out
    assert "MNIST     MISSING" in out and str(tmp_path / "MNIST" / "raw") in out
    assert prepare.main(["--check", "--tasks", "EuroSAT", "--data-dir", str(tmp_path)]) == 0


def test_offline_download_fails_fast_with_a_clear_message(tmp_path, capsys, monkeypatch):
    calls = []

    def offline(task, data_dir, downloads):
        calls.append(task)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(prepare, "fetch", offline)
    assert prepare.main(["--tasks", "MNIST", "SVHN", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert calls == ["mnist"]  # stops at the first failure
    assert "could not download MNIST" in err and "--tasks mnist" in err and "offline" in err and "MNIST/raw/" in err


def test_manual_datasets_print_instructions(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare, "fetch", lambda *a: pytest.fail("Cars must not be downloaded"))
    assert prepare.main(["--tasks", "Cars", "RESISC45", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "stanford_cars/devkit/cars_meta.mat" in out and "resisc45/NWPU-RESISC45/<class>/*.jpg" in out
    assert "resisc45-train.txt" in out and "Not complete yet: Cars, RESISC45" in out


def test_download_then_arrange_dtd_into_the_task_vectors_layout(tmp_path, tiny_backbone, capsys, monkeypatch):
    def fake_dtd_download(task, data_dir, downloads):  # what torchvision.datasets.DTD(download=True) leaves
        base = downloads / "dtd" / "dtd"
        lists = {"train1": [], "val1": [], "test1": []}
        for label, cls in enumerate(DTD_FOLDERS):
            for k, split in enumerate(lists):
                _picture(base / "images" / cls / f"{cls}_{k:04d}.jpg", seed=label * 3 + k)
                lists[split].append(f"{cls}/{cls}_{k:04d}.jpg")
        for split, lines in lists.items():
            (base / "labels").mkdir(parents=True, exist_ok=True)
            (base / "labels" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(prepare, "fetch", fake_dtd_download)
    assert prepare.main(["--tasks", "dtd", "--data-dir", str(tmp_path)]) == 0
    assert "DTD: complete (train 85, val 9, test 47)" in capsys.readouterr().out
    assert len(list((tmp_path / "dtd" / "train" / "banded").iterdir())) == 2  # train1 + val1
    assert prepare.main(["--tasks", "DTD", "--data-dir", str(tmp_path)]) == 0  # second run: nothing to do
    assert "already complete" in capsys.readouterr().out


def test_arrange_eurosat_and_sun397(tmp_path):
    source = tmp_path / "downloads" / "eurosat" / "2750"
    for cls in EUROSAT_FOLDERS:
        for k in range(4):
            _picture(source / cls / f"{cls}_{k}.jpg", seed=k)
    prepare.arrange_eurosat(tmp_path / "downloads", tmp_path, held_out=1)
    splits = raw_splits("eurosat", tmp_path)
    assert {s: len(d) for s, d in splits.items()} == {"train": 20, "val": 10, "test": 10}
    names = [set(Path(f).name for f in splits[s].files) for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])

    sun = tmp_path / "downloads" / "SUN397"
    for path in ("a/abbey/sun_a.jpg", "a/apartment_building/outdoor/sun_b.jpg", "y/youth_hostel/sun_c.jpg"):
        _picture(sun / path, seed=len(path))
    (sun / "Training_01.txt").write_text("/a/abbey/sun_a.jpg\n/a/apartment_building/outdoor/sun_b.jpg\n")
    (sun / "Testing_01.txt").write_text("/y/youth_hostel/sun_c.jpg\n")
    prepare.arrange_sun397(tmp_path / "downloads", tmp_path)
    assert (tmp_path / "sun397" / "train" / "a_apartment_building_outdoor" / "sun_b.jpg").is_file()
    assert (tmp_path / "sun397" / "test" / sun397_folder("youth hostel") / "sun_c.jpg").is_file()


# --- configs ------------------------------------------------------------------------------------

def _compose(overrides):
    from adamerge.runtime.config import CONF_DIR
    from tests.helpers import compose_cfg

    return compose_cfg(overrides), CONF_DIR


@pytest.mark.parametrize("preset", ["paper8", "paper6_unseen_mnist_eurosat", "paper6_unseen_resisc45_svhn"])
def test_task_configs_compose_state_their_command_and_cover_the_eight(preset):
    cfg, conf_dir = _compose([f"tasks={preset}"])
    header = (conf_dir / "tasks" / f"{preset}.yaml").read_text().splitlines()[:12]
    assert any(line.lstrip("# ").startswith("adamerge ") and f"tasks={preset}" in line for line in header)
    merged, unseen = list(cfg.tasks.names), list(cfg.tasks.unseen or [])
    if preset == "paper8":
        assert merged == PAPER_TASKS and unseen == []
    else:
        assert len(merged) == 6 and len(unseen) == 2 and sorted(merged + unseen) == sorted(PAPER_TASKS)


def test_paper8_config_instantiates_through_hydra(tmp_path, tiny_backbone):
    from hydra.utils import instantiate

    make_eurosat(tmp_path / "data")
    make_mnist(tmp_path / "data")
    cfg, _ = _compose(["tasks=paper8", f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}",
                       "tasks.names=[eurosat]", "tasks.unseen=[mnist]", "tasks.num_workers=0"])
    tasks = instantiate(cfg.tasks, backbone=tiny_backbone)  # as experiment.py does
    assert [t.name for t in tasks] == ["eurosat"] and [t.name for t in tasks.unseen] == ["mnist"]
    assert isinstance(tasks[0].split("test"), TensorImages) and len(tasks[0].split("test")) == 20


def test_train_split_uses_the_training_transform_and_val_test_do_not(tmp_path, tiny_backbone):
    make_eurosat(tmp_path)
    assert tiny_backbone.preprocess_train is not None
    task = _load("eurosat", tmp_path, tiny_backbone, cache_dir=None)
    assert task.split("train").transform is tiny_backbone.preprocess_train
    assert task.split("val").transform is tiny_backbone.preprocess
    plain = _load("eurosat", tmp_path, tiny_backbone, cache_dir=None, train_augmentation=False)
    assert plain.split("train").transform is tiny_backbone.preprocess
