"""The config tree is the registry: every preset composes, and a wrong name lists the valid ones."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from adamerge.runtime.config import CONF_DIR
from tests.helpers import compose_cfg as _compose


def compose_cfg(overrides=()):
    return _compose(overrides, hydra=True)



GROUPS = ["model", "tasks", "pool", "method", "optimizer", "trainer", "logger", "callbacks", "experiment", "paths",
          "hydra"]


def test_required_groups_exist():
    for group in GROUPS:
        assert (CONF_DIR / group).is_dir(), group


@pytest.mark.parametrize("preset", sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                                          for p in (CONF_DIR / "experiment").rglob("*.yaml")))
def test_every_experiment_preset_composes(preset):
    cfg = compose_cfg([f"experiment={preset}"])
    if cfg.get("llm") is not None:  # the LLM pipeline: its methods are the searches' presets
        assert cfg.name and all("_target_" in cfg.llm[k] for k in ("expo", "extrapolation", "evaluator"))
        assert cfg.get("model") is None and cfg.get("method") is None  # the CLIP groups are off
        return
    assert cfg.name and "_target_" in cfg.method and "_target_" in cfg.model


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")))
def test_every_method_composes_and_states_its_formula_and_command(method):
    cfg = compose_cfg([f"method={method}"])
    assert cfg.method._target_.startswith("adamerge.methods.")
    header = (CONF_DIR / "method" / f"{method}.yaml").read_text().splitlines()[0:6]
    assert any("adamerge method=" in line for line in header), f"{method}.yaml header lacks the exact command"
    assert any(("θ" in line or "=" in line) for line in header[:3]), f"{method}.yaml header lacks the formula"


def test_unknown_method_lists_valid_choices():
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(["method=adamergin"])
    msg = str(err.value)
    assert "adamerging_layerwise" in msg and "task_arithmetic" in msg and "ties" in msg


@pytest.mark.parametrize("group", ["model", "tasks", "logger", "trainer"])
def test_unknown_group_option_lists_valid_choices(group):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg([f"{group}=nope"])
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert all(o in str(err.value) for o in options)


def test_misplaced_key_is_rejected_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["method=task_arithmetic", "method.lr=0.1"])
    assert "method.lr" in str(err.value) or "lr" in str(err.value)


def test_paper_protocol_defaults():
    cfg = compose_cfg()
    OmegaConf.resolve(cfg.method)
    assert cfg.method.init == 0.3 and list(cfg.method.clamp) == [0.0, 1.0]
    assert cfg.method.batch_size == 16 and cfg.method.batches_per_task == 2
    assert cfg.optimizer.lr == 1e-3 and cfg.trainer.max_steps == 500


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml")))
def test_every_hparams_search_preset_composes(preset):
    cfg = compose_cfg([f"hparams_search={preset}"])
    assert cfg.optimized_metric == "val" and cfg.hydra.sweeper.params


@pytest.mark.parametrize("launcher", ["parallel", "slurm_gpu"])
def test_launcher_configs_compose(launcher):
    cfg = compose_cfg([f"hydra/launcher={launcher}"])
    target = cfg.hydra.launcher._target_
    assert ("Joblib" in target) if launcher == "parallel" else ("Slurm" in target and cfg.hydra.launcher.gpus_per_node == 1)
