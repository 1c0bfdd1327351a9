"""What makes two runs "the same experiment up to the seed": their resolved configs minus the keys that cannot
change a number. Tables average only runs that agree here; everything else is a different row.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

#: Config keys that never change a run's numbers (where files go, logging, threads, how evaluation is batched);
#: runs of one row may differ in them and in ``seed``, which a row averages over.
NOT_RESULT_KEYS = ("seed", "name", "paths", "logger", "callbacks", "print_config", "verbose", "threads", "device",
                   "eval_batch_size", "reuse_host_memory", "ckpt_path", "optimized_metric", "table_history", "hydra",
                   "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy",
                   "trainer.default_root_dir", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
                   "method_name", "model_name", "reference", "method.reuse_host_memory", "method.label",
                   "save_merged", "save_merged_dtype", "search_reevaluate")


def result_config(config: Mapping[str, Any] | None, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The config flattened to ``a.b.c`` keys, without :data:`NOT_RESULT_KEYS` and ``ignore``."""
    skip = (*NOT_RESULT_KEYS, *ignore)
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if any(name == k or name.startswith(k + ".") for k in skip):
                continue
            if isinstance(value, Mapping) and value:
                walk(value, name + ".")
            else:
                out[name] = value

    walk(config or {}, "")
    return out


def fingerprint(config: Mapping[str, Any] | None, ignore: Iterable[str] = ()) -> str:
    """A short hash of :func:`result_config`: equal for runs that differ only in seed and bookkeeping."""
    text = json.dumps(result_config(config, ignore), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def distinguishing_keys(configs: list[Mapping[str, Any] | None]) -> list[str]:
    """The result keys whose values are not the same in all ``configs``, in sorted order."""
    flat = [result_config(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    differing = [k for k in keys if len({json.dumps(f.get(k, "∅"), sort_keys=True, default=str) for f in flat}) > 1]
    shown: list[str] = []
    for key in sorted(differing, key=lambda k: (k.count("."), k)):  # the shortest name of an interpolated copy
        if not all(key in copies_of(f, shown) for f in flat):
            shown.append(key)
    return sorted(shown)


def copies_of(flat: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """Keys that repeat one of ``keys`` through an interpolation (``method.optimizer.lr: ${optimizer.lr}``): same last
    name, same value. A search over ``optimizer.lr`` varies them too, and they must not tell trials apart."""
    keys = list(keys)
    return [other for other in flat if other not in keys and any(
        other.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and key in flat and flat[other] == flat[key] for key in keys)]


def short_value(value: Any) -> str:
    """A config value as a table label shows it: numbers in ``%g``, long lists elided."""
    if isinstance(value, float):
        return f"{value:g}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "…"
