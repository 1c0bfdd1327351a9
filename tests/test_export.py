"""Keeping the merged model (save_merged=true) and evaluating it again (method=evaluate_saved): the saved tensors
are the merge (recomputed here from the pool's own files), re-evaluation gives the recorded accuracy exactly, HF
backbones also get a folder transformers loads, and bad saved input fails, named, before any evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import adamerge  # noqa: F401  (before anything imports torchvision)
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from adamerge.merging.task_vectors import NonFiniteTensorError
from adamerge.methods.base import MergeContext
from adamerge.models.checkpoints import load_state_dict
from adamerge.models.export import DESCRIPTION, HF_BACKBONE, TOWER_FILE, SavedModelError, save_merged
from adamerge.validation import ConfigError


def run(tmp_path, cache, name, overrides):
    """One in-process tiny run (experiment=smoke) in ``tmp_path/name``; returns (its record, its config)."""
    cfg = adamerge.compose(["experiment=smoke", "threads=1", "print_config=false", "logger=none",
                            f"paths.cache_dir={cache}", f"paths.results_dir={tmp_path / 'results'}",
                            f"paths.output_dir={tmp_path / name}", *overrides])
    adamerge.run(cfg)
    return json.loads((tmp_path / name / "record.json").read_text()), cfg


def evaluate_saved(tmp_path, cache, path, name="evaluated", extra=()):
    return run(tmp_path, cache, name, ["method=evaluate_saved", f"method.path={path}", *extra])[0]


def pool_checkpoints(cfg):
    """θ₀ and θₖ straight from the pool's files (not from the run's objects): the independent side."""
    pool = instantiate(cfg.pool)
    return load_state_dict(pool.pretrained), {t: load_state_dict(pool.path_for(t)) for t in pool.finetuned}


def assert_close(saved, want, atol=1e-6):
    assert saved.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(saved[key], want[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def task_arithmetic_run(tmp_path_factory, embedded_cache):
    root = tmp_path_factory.mktemp("ta")
    record, cfg = run(root, embedded_cache, "ta", ["method=task_arithmetic", "save_merged=true"])
    return root, record, cfg


def test_task_arithmetic_saves_theta0_plus_lambda_sum_and_reevaluates_exactly(task_arithmetic_run, embedded_cache):
    root, record, cfg = task_arithmetic_run
    folder = Path(record["extra"]["merged_model"])
    assert folder == root / "ta" / "merged" and (folder / TOWER_FILE).is_file()
    assert not (folder / "config.json").exists()  # an open_clip backbone: no transformers layout
    theta0, finetuned = pool_checkpoints(cfg)
    want = {k: v + 0.3 * sum(ft[k] - v for ft in finetuned.values()) for k, v in theta0.items()}
    saved = load_file(str(folder / TOWER_FILE))
    assert_close(saved, want)
    assert all(v.dtype == torch.float32 for v in saved.values())  # the tiny pool stores float32
    described = json.loads((folder / DESCRIPTION).read_text())
    assert described["method"] == "task_arithmetic" and described["label"] == "Task Arithmetic (λ=0.3)"
    assert described["tasks"] == record["tasks"] and described["lambda"] == 0.3
    assert described["model"]["name"] == "tiny" and described["model"]["architecture"]["open_clip"]["vision_cfg"]["layers"] == 2
    assert set(described["sources"]["finetuned"]) == set(record["tasks"])
    again = evaluate_saved(root, embedded_cache, folder)
    assert again["accuracy"] == record["accuracy"]
    assert again["label"] == "Task Arithmetic (λ=0.3) (saved)" and again["method"] == "evaluate_saved"
    assert again["extra"]["evaluated_from"] == str(folder)


def test_ties_saves_the_official_trim_elect_disjoint_sum(tmp_path, embedded_cache):
    # n = the tower (FusionBench's count): on the tiny CLIP the ImageEncoder's text embeddings would outnumber
    # the tower and keep all of it, so the official count would not exercise the trim
    record, cfg = run(tmp_path, embedded_cache, "ties", ["method=ties", "method.trim_count=tower", "save_merged=true"])
    theta0, finetuned = pool_checkpoints(cfg)
    keys = [k for k, v in theta0.items() if v.is_floating_point()]
    flat = torch.stack([torch.cat([(ft[k] - theta0[k]).reshape(-1) for k in keys]) for ft in finetuned.values()])
    n = flat.shape[1]
    threshold = flat.abs().kthvalue(n - int(0.2 * n), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= threshold)
    assert 0.19 < (trimmed != 0).float().mean() < 0.25
    sign = torch.sign(trimmed.sum(0))
    sign = torch.where(sign == 0, torch.sign(sign.sum()), sign)
    merged = (trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)).sum(0)
    parts = dict(zip(keys, merged.split([theta0[k].numel() for k in keys])))
    want = {k: theta0[k] + 0.3 * parts[k].view(theta0[k].shape) for k in keys}
    assert_close(load_file(str(Path(record["extra"]["merged_model"]) / TOWER_FILE)), want)
    assert evaluate_saved(tmp_path, embedded_cache, record["extra"]["merged_model"])["accuracy"] == record["accuracy"]


def test_a_per_task_method_saves_one_folder_per_task(tmp_path, embedded_cache):
    record, cfg = run(tmp_path, embedded_cache, "ind", ["method=individual", "save_merged=true"])
    _, finetuned = pool_checkpoints(cfg)
    folders = record["extra"]["merged_models"]
    assert set(folders) == set(record["tasks"])
    for task, folder in folders.items():
        saved = load_file(str(Path(folder) / TOWER_FILE))
        assert saved.keys() == finetuned[task].keys() and all(torch.equal(saved[k], finetuned[task][k]) for k in saved)
        assert json.loads((Path(folder) / DESCRIPTION).read_text())["task"] == task
    again = evaluate_saved(tmp_path, embedded_cache, record["extra"]["merged_model"])
    assert again["accuracy"] == record["accuracy"]
    # one task's model on every task; and a per-task folder refuses tasks it has no model for
    one = evaluate_saved(tmp_path, embedded_cache, folders["digits"], name="one", extra=["tasks.names=[digits,shapes]"])
    assert one["accuracy"]["digits"] == record["accuracy"]["digits"] and one["label"] == "Individual: digits (saved)"
    (Path(record["extra"]["merged_model"]) / "shapes" / TOWER_FILE).unlink()
    with pytest.raises(InstantiationException, match=r"merged/shapes holds no model weights"):
        evaluate_saved(tmp_path, embedded_cache, record["extra"]["merged_model"], name="broken")


def test_taskwise_adamerging_saves_theta0_plus_learned_lambda(tmp_path, embedded_cache):
    record, cfg = run(tmp_path, embedded_cache, "ada", ["method=adamerging_taskwise", "trainer.max_steps=2",
                                                        "save_merged=true"])
    theta0, finetuned = pool_checkpoints(cfg)
    lam = load_state_dict(record["extra"]["coefficients_file"])["coefficients"]
    assert lam.shape[0] == len(record["tasks"]) and torch.equal(lam, lam[:, :1].expand_as(lam))  # one λ per task
    want = {k: v + sum(lam[i, 0] * (finetuned[t][k] - v) for i, t in enumerate(record["tasks"]))
            for k, v in theta0.items()}
    folder = Path(record["extra"]["merged_model"])
    assert_close(load_file(str(folder / TOWER_FILE)), want)
    assert json.loads((folder / DESCRIPTION).read_text())["coefficients"] == record["extra"]["coefficients_file"]
    assert evaluate_saved(tmp_path, embedded_cache, folder)["accuracy"] == record["accuracy"]


def test_save_options_are_checked_up_front_and_the_dtype_is_chosen(tmp_path, embedded_cache):
    with pytest.raises(ConfigError, match="save_merged='yes'"):
        run(tmp_path, embedded_cache, "bad", ["method=pretrained", "save_merged=yes"])
    with pytest.raises(ConfigError, match="save_merged_dtype='fp8'"):
        run(tmp_path, embedded_cache, "bad", ["method=pretrained", "save_merged=true", "save_merged_dtype=fp8"])
    record, _ = run(tmp_path, embedded_cache, "half", ["method=weight_averaging", "save_merged=true",
                                                       "save_merged_dtype=bfloat16"])
    saved = load_file(str(Path(record["extra"]["merged_model"]) / TOWER_FILE))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    plain, _ = run(tmp_path, embedded_cache, "plain", ["method=weight_averaging"])
    assert "merged_model" not in plain["extra"] and not (tmp_path / "plain" / "merged").exists()


# bad saved input: named, with the fix, before any evaluation --------------------------------------------------

@pytest.fixture()
def no_evaluation(monkeypatch):
    def evaluate(*args, **kwargs):
        raise AssertionError("evaluated a model that should have been refused")

    monkeypatch.setattr(MergeContext, "evaluate", evaluate)


def broken_copy(folder: Path, target: Path, change) -> Path:
    target.mkdir(parents=True)
    (target / DESCRIPTION).write_text((folder / DESCRIPTION).read_text())
    state = load_file(str(folder / TOWER_FILE))
    change(state)
    save_file(state, str(target / TOWER_FILE))
    return target


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("ln_post.bias"), r"missing 1 tensor\(s\): ln_post\.bias"),
    (lambda s: s.__setitem__("ln_post.bias", torch.zeros(7)), r"ln_post\.bias \(7,\) vs \(32,\)"),
    (lambda s: s["conv1.weight"].view(-1).__setitem__(0, float("nan")), r"non-finite.*conv1\.weight"),
], ids=["missing-key", "wrong-shape", "nan"])
def test_a_broken_saved_model_is_refused_naming_the_file(task_arithmetic_run, embedded_cache, tmp_path, no_evaluation,
                                                         change, message):
    root, record, _ = task_arithmetic_run
    bad = broken_copy(Path(record["extra"]["merged_model"]), tmp_path / "bad", change)
    error = SavedModelError if "non-finite" not in message else NonFiniteTensorError
    with pytest.raises(error, match=message) as err:
        evaluate_saved(tmp_path, embedded_cache, bad)
    assert str(bad / TOWER_FILE) in str(err.value)
    assert "save_merged=true" in str(err.value)
    assert not (tmp_path / "results" / "raw" / "smoke.jsonl").exists()


def test_a_missing_or_empty_folder_is_refused_before_anything_loads(tmp_path, embedded_cache, no_evaluation):
    for path in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(InstantiationException) as err:
            evaluate_saved(tmp_path, embedded_cache, path)
        assert str(path) in str(err.value) and "save_merged=true" in str(err.value)
        assert "adamerge-merge-models" in str(err.value)
    with pytest.raises(InstantiationException, match="needs method.path"):
        run(tmp_path, embedded_cache, "none", ["method=evaluate_saved"])


# Hugging Face backbones: the transformers layout too -----------------------------------------------------------

TASKS = ["t0", "t1"]


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory):
    """A saved CLIPModel with its tokenizer (native backbone), one with OpenAI's vocabulary size (renamed to
    open_clip), and two fine-tuned CLIPVisionModels of each."""
    from transformers import CLIPModel

    from tests.hf_fixtures import randomize, save_finetuned_towers, save_pretrained_clip, tiny_clip_config

    root = tmp_path_factory.mktemp("hfworld")
    native = save_pretrained_clip(root / "native" / "pretrained", seed=0)
    save_finetuned_towers(native, root / "native" / "finetuned", TASKS, seed=1)
    renamed = randomize(CLIPModel(tiny_clip_config(49408)), seed=3)
    renamed.save_pretrained(root / "renamed" / "pretrained")
    save_finetuned_towers(renamed, root / "renamed" / "finetuned", TASKS, seed=4)
    return root


@pytest.mark.parametrize("native", [True, False], ids=["native", "open_clip"])
def test_hf_backbone_saves_a_folder_transformers_loads_and_it_round_trips(hf_world, tmp_path, native):
    from torch.func import functional_call
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    from adamerge.methods import EvaluateSaved, TaskArithmetic
    from adamerge.models.hf_clip import hf_checkpoint_pool, open_clip_to_hf_vision
    from tests.helpers import make_tasks, random_heads

    world = hf_world / ("native" if native else "renamed")
    model_cfg = OmegaConf.create({"_target_": HF_BACKBONE, "source": str(world / "pretrained"), "native": native,
                                  "arch": None, "hub_cache_dir": None, "download": False, "cache_dir": str(tmp_path)})
    backbone = instantiate(model_cfg)
    pool = hf_checkpoint_pool(finetuned_dir=str(world / "finetuned"), pattern="{task}", cache_dir=str(tmp_path / "hf"))
    theta0, finetuned = pool.load(TASKS, backbone.visual)
    tasks = make_tasks(n_tasks=2)
    ctx = MergeContext(backbone=backbone, tasks=tasks, pretrained=theta0, finetuned=finetuned, pool=pool,
                       heads=random_heads(tasks, dim=24), run_dir=tmp_path / "run")
    method = TaskArithmetic(lam=0.3, label="Task Arithmetic (λ=0.3)")
    result = method.run(ctx)
    cfg = OmegaConf.create({"save_merged": True, "save_merged_dtype": "stored", "method_name": "task_arithmetic",
                            "model_name": "hf_clip", "seed": 0, "model": model_cfg})
    folder = Path(save_merged(cfg, ctx, method, result)["merged_model"])
    assert_close(load_file(str(folder / TOWER_FILE)), result.params, atol=0)
    described = json.loads((folder / DESCRIPTION).read_text())
    assert described["model"]["architecture"]["transformers"]["num_hidden_layers"] == 2
    assert described["tower"]["layout"] == ("transformers vision_model" if native else "open_clip visual")
    assert described["sources"]["finetuned"] == {t: str(world / "finetuned" / t) for t in TASKS}

    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = functional_call(backbone.visual, result.params, (images,))
    with_projection = CLIPVisionModelWithProjection.from_pretrained(str(folder)).eval()
    torch.testing.assert_close(with_projection(pixel_values=images).image_embeds, ours, atol=1e-5, rtol=0)
    plain = CLIPVisionModel.from_pretrained(str(folder)).eval()
    hf_params = result.params if native else open_clip_to_hf_vision(result.params)
    for key, value in plain.state_dict().items():
        if not key.endswith("position_ids"):
            assert torch.equal(value, hf_params[key]), key

    # a pool=huggingface reads the folder back as this merge (the projection round-trips)
    again = hf_checkpoint_pool(finetuned={"t0": str(folder)}, cache_dir=str(tmp_path / "hf2"))
    assert_close(again.load(["t0"], backbone.visual)[1]["t0"], result.params, atol=0)

    # evaluate_saved: the folder as written, and its transformers layout alone, give the merge back
    before = ctx.evaluate(result.params)
    (folder / TOWER_FILE).rename(tmp_path / "aside.safetensors")
    for path in (tmp_path / "aside.safetensors", folder):
        saved = EvaluateSaved(path=str(path)).run(ctx).params
        assert_close(saved, result.params, atol=0)
        assert ctx.evaluate(saved) == before

    # an adamerge-merge-models output (a whole CLIPModel folder: θ₀'s text tower and projection) evaluates too
    from adamerge.model_dirs.cli import main

    out = tmp_path / "merge-models"
    assert main(["--base", str(world / "pretrained"), "--models", *(str(world / "finetuned" / t) for t in TASKS),
                 "--method", "task_arithmetic", "--lam", "0.3", "--out", str(out)]) == 0
    method = EvaluateSaved(path=str(out))
    assert method.label == "Task Arithmetic (λ=0.3) (saved)"
    assert_close(method.run(ctx).params, result.params, atol=1e-6)
