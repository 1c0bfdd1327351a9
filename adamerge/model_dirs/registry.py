"""The methods ``adamerge-merge-models`` offers: those of the config tree (``conf/method/*.yaml``) that can merge
weights alone, composed and instantiated exactly as ``adamerge method=<name>`` would — one registry, one set of
names and defaults for CLIP experiments and model directories."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from adamerge.methods.base import Method
from adamerge.runtime.config import CONF_DIR, compose

CHOSEN_BY_EVALUATION = ("lam_grid", "objective")  # set to null here unless the user sets them (then refused)
# Presets that exist to choose by evaluation (λ on val, α per task by search): their fixed form is another preset.
EVALUATION_PRESETS = ("_tuned", "_searched", "_entropy", "_per_task")  # _per_task: CLIP rows, one model per task


@dataclass(frozen=True)
class MethodEntry:
    name: str
    target: type
    header: str  # the YAML file's comment header: formula, reference, exact commands


def _header(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip() if line.startswith("# ") or line == "#" else line[1:])
    return "\n".join(lines)


@lru_cache(maxsize=1)
def weight_methods() -> dict[str, MethodEntry]:
    """conf/method entries whose class implements :meth:`Method.weights_merger`, by name."""
    found = {}
    for path in sorted((CONF_DIR / "method").glob("*.yaml")):
        if path.stem.endswith(EVALUATION_PRESETS):
            continue
        target = OmegaConf.load(path).get("_target_")
        if target is None:
            continue
        cls = get_class(target)
        if cls.weights_merger is not Method.weights_merger:
            found[path.stem] = MethodEntry(path.stem, cls, _header(path.read_text(encoding="utf-8")))
    return found


def _null_evaluation_options(node: DictConfig, user_paths: set[str]) -> list[str]:
    """The method's own λ grid / search objective → null (an inner ``merge`` keeps its own: if it is used and
    needs an evaluation, it refuses)."""
    nulled = [key for key in CHOSEN_BY_EVALUATION
              if node.get(key) is not None and key not in user_paths]
    for key in nulled:
        node[key] = None
    return nulled


def compose_method(name: str, options: Mapping[str, object] | None = None,
                   overrides: Sequence[str] = ()) -> tuple[Method, DictConfig, int, list[str]]:
    """(method, its resolved config, the run seed, options set to null) for ``method=name`` with ``options``
    (``--lam 0.5`` → ``lam``, mapped through the class's ``option_paths``) and raw ``overrides``
    (``zero_sign=positive`` → ``method.zero_sign=positive``)."""
    methods = weight_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r} for merging weights alone; choose from {', '.join(methods)}")
    entry = methods[name]
    plain = compose([f"method={name}"]).method
    paths = getattr(entry.target, "option_paths", {})
    user, wrong = [], []
    for option, value in (options or {}).items():
        if value is None:
            continue
        path = paths.get(option, option)
        if OmegaConf.select(plain, path, default="<absent>") == "<absent>":
            wrong.append(option)
        user.append((path, value))
    if wrong:
        accepted = [f"--{o}" for o in ("lam", "keep", "alpha", "beta", "p", "seed")
                    if OmegaConf.select(plain, paths.get(o, o), default="<absent>") != "<absent>"]
        raise ValueError(f"{', '.join('--' + o for o in wrong)} does not apply to --method {name} "
                         f"(its options: {', '.join(accepted) or 'none'}; any key with --set KEY=VALUE)")
    for raw in overrides:
        if "=" not in raw:
            raise ValueError(f"--set {raw!r}: expected KEY=VALUE (a key of conf/method/{name}.yaml, e.g. zero_sign=positive)")
    overrides = [f"method.{path}={str(value).lower() if isinstance(value, bool) else value}"
                 for path, value in user] + [f"method.{raw}" for raw in overrides]
    cfg = compose([f"method={name}", *overrides])
    user_paths = {o.split("=", 1)[0][len("method."):] for o in overrides}
    with open_dict(cfg):
        nulled = _null_evaluation_options(cfg.method, user_paths)
    method_cfg = OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True))
    return instantiate(method_cfg), method_cfg, int(cfg.seed), nulled
