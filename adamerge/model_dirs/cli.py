"""``adamerge-merge-models``: merge fine-tuned model directories (safetensors) into a new model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from hydra.errors import HydraException

from adamerge.merging.task_vectors import CheckpointMismatchError, NonFiniteTensorError
from adamerge.model_dirs.layout import ModelDirError
from adamerge.model_dirs.merge import merge_model_dirs
from adamerge.model_dirs.registry import weight_methods

PROG = "adamerge-merge-models"
PARAMETERS = {
    "lam": (float, "λ, the scale of the merged task vector (method.lam)"),
    "keep": (float, "TIES: fraction of each task vector's entries kept by magnitude, in (0, 1] (method.keep)"),
    "alpha": (float, "α, how far ExPO extrapolates beyond the fine-tuned model (method.alpha; "
                     "extrapolation_merging: method.start.alpha)"),
    "beta": (float, "β, the weight of the first checkpoint between the two extrapolated ones (method.start.beta)"),
    "p": (float, "DARE: drop rate in [0, 1) (method.p)"),
    "seed": (int, "DARE: seed of the drop masks; each tensor of each model is seeded by (seed, tensor name, model) "
                  "(method.seed; default: the config's seed)"),
}


def _methods_help() -> str:
    lines = ["methods — conf/method/<name>.yaml, the same names and defaults as `adamerge method=<name>`",
             "(θ₀ = --base, θₖ = the k-th --models, τₖ = θₖ − θ₀; `--set KEY=VALUE` sets any key of the YAML):", ""]
    for entry in weight_methods().values():
        header = [line for line in entry.header.splitlines() if line.strip()]
        lines.append(f"  {entry.name}")
        lines += [f"      {line}" for line in header[:3]]
    lines += [
        "",
        "Conventions: `ties` is the official AdaMerging/FusionBench TIES (one threshold over the whole task vector,",
        "ties at it kept, zero-sum signs by majority, dis-sum, λ 0.3); `ties_mergekit`, `dare_ties_mergekit` and",
        "`dare_linear_mergekit` are mergekit's (per tensor, exactly int(n·density) kept, zero sum → +1, L1 rescale).",
        "Options that choose by evaluation (lam_grid, objective) are set to null: nothing is evaluated here.",
        "",
        "Tensors are read one at a time (safetensors), merged in float32 and written in the base's dtype;",
        "non-float tensors are copied from the base. The output has the base's layout (single file or the same",
        "shards + index), its non-weight files (config.json, generation_config.json, tokenizer files; not README.md)",
        "from the base or --copy-from, and merge_config.json recording the method, parameters and inputs.",
        "For ExPO/extrapolation, --copy-from SFT_DIR keeps the fine-tuned model's tokenizer and chat template.",
        "",
        "example:",
        f"  {PROG} --base Llama-3-8B --models sft-math sft-code --method task_arithmetic --lam 0.3 --out merged",
        f"  {PROG} --base base --models sft/checkpoint-800 sft/checkpoint-1000 --method extrapolation_merging \\",
        "      --alpha 0.5 --beta 0.6 --out extrapolated --copy-from sft/checkpoint-1000",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_methods_help(),
        description="Merge fine-tuned model directories of one base model into a new model directory.\n"
                    "Any model family: weights in model.safetensors, or shards + model.safetensors.index.json.")
    parser.add_argument("--base", required=True, type=Path, metavar="DIR", help="the pre-trained model θ₀")
    parser.add_argument("--models", required=True, nargs="+", type=Path, metavar="DIR",
                        help="the fine-tuned models θ₁..θ_K (checkpoints of the same architecture as --base)")
    parser.add_argument("--method", required=True, choices=list(weight_methods()), metavar="NAME",
                        help="how to merge: a conf/method name (formulas below)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the new model directory to write")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it exists (only once the merge has succeeded)")
    parser.add_argument("--copy-from", type=Path, metavar="DIR",
                        help="copy config/tokenizer files from this directory instead of --base")
    for name, (kind, text) in PARAMETERS.items():
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any key of the method's YAML, e.g. --set zero_sign=positive --set trim_scope=tensor")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, merge, and return the exit status (errors are printed, not raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    params = {name: getattr(args, name) for name in PARAMETERS}
    try:
        merge_model_dirs(args.base, args.models, args.method, params, args.out, force=args.force,
                         copy_from=args.copy_from, command=[PROG, *argv], overrides=args.set)
    except (ModelDirError, CheckpointMismatchError, NonFiniteTensorError, ValueError, OSError, HydraException) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
