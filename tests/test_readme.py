"""README's examples run as they are written: "Adding a method" (a class outside the package and its YAML on
Hydra's search path) through the command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli_runner import adamerge, records

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(section: str) -> dict[str, str]:
    """The fenced code blocks of one README section, by language."""
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return {lang: code for lang, code in re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)}


@pytest.mark.slow
def test_the_add_a_method_example_runs_and_equals_weight_averaging_at_lambda_one(tmp_path, embedded_cache):
    code = blocks("Adding a method")
    (tmp_path / "my_methods.py").write_text(code["python"])
    conf = tmp_path / "myconf" / "method"
    conf.mkdir(parents=True)
    (conf / "mean_task_arithmetic.yaml").write_text(code["yaml"])
    assert "hydra.searchpath=[file://$PWD/myconf] method=mean_task_arithmetic" in code["bash"]
    common = ["experiment=smoke", "threads=1", "print_config=false", "logger=none"]
    env = {"PYTHONPATH": str(tmp_path)}
    adamerge([*common, f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "method=mean_task_arithmetic"],
             tmp_path, embedded_cache, env=env)
    adamerge([*common, "method=weight_averaging"], tmp_path, embedded_cache, env=env)
    mine, averaged = records(tmp_path, "smoke")
    assert mine["label"] == "Mean Task Arithmetic" and averaged["label"] == "Weight Averaging"
    for task, value in averaged["accuracy"].items():  # θ₀ + (1/K) Σ (θₖ − θ₀) = (1/K) Σ θₖ, up to rounding
        assert abs(mine["accuracy"][task] - value) <= 1 / 128 + 1e-9, task


def test_the_research_loop_commands_compose_from_the_config_tree():
    """Every `adamerge …` line of "The research loop" names options that exist (composed as the CLI would)."""
    import shlex

    from omegaconf import OmegaConf

    import adamerge

    code = blocks("The research loop: a sweep, its table, its dashboards, the merged model")["bash"]
    commands = [shlex.split(line.split("#")[0].replace("<run>", "RUN")) for line in code.splitlines()
                if line.startswith("adamerge ")]
    assert len(commands) >= 4
    for words in commands:
        overrides = [w for w in words[1:] if w != "-m"]
        cfg = adamerge.compose(overrides)
        for override in overrides:
            key, _, value = override.partition("=")
            if "," not in value and "." in key:  # a plain value: it reached the composed config
                assert OmegaConf.select(cfg, key) is not None, override
