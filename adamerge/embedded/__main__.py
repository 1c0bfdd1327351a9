"""``python -m adamerge.embedded --cache-dir DIR --preset demo``: build the world, print its accuracies."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import adamerge  # noqa: F401  (repairs torchvision before open_clip is imported)


def format_table(manifest: dict) -> str:
    """Zero-shot vs fine-tuned test accuracy per task (and task arithmetic, the build's sanity check)."""
    lambdas = list(manifest.get("task_arithmetic", {}))
    header = f"{'task':<10} {'zero-shot':>9} {'fine-tuned':>10}" + "".join(f" {'TA λ=' + lam:>9}" for lam in lambdas)
    rows = [header, "-" * len(header)]
    names = [t["name"] for t in manifest["tasks"]]
    for name in names + ["average"]:
        if name == "average":
            zs = sum(manifest["accuracy"][n]["zero_shot"] for n in names) / len(names)
            ft = sum(manifest["accuracy"][n]["finetuned"] for n in names) / len(names)
            ta = [sum(manifest["task_arithmetic"][lam][n] for n in names) / len(names) for lam in lambdas]
            rows.append("-" * len(header))
        else:
            zs, ft = manifest["accuracy"][name]["zero_shot"], manifest["accuracy"][name]["finetuned"]
            ta = [manifest["task_arithmetic"][lam][name] for lam in lambdas]
        rows.append(f"{name:<10} {100 * zs:>9.1f} {100 * ft:>10.1f}" + "".join(f" {100 * a:>9.1f}" for a in ta))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamerge.embedded", description=__doc__)
    parser.add_argument("--cache-dir", required=True, help="where worlds are cached (not the repository)")
    parser.add_argument("--preset", default="demo", help="demo (default) or tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("adamerge").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from adamerge.embedded.world import build_world, read_manifest

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    world = build_world(args.cache_dir, preset=args.preset, seed=args.seed)
    manifest = read_manifest(world)
    print(f"embedded world: {world}  (preset {manifest['preset']}, arch {manifest['arch']}, "
          f"built in {manifest['timings']['total']:.1f} s; this call {time.perf_counter() - start:.1f} s)")
    print(format_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
