"""``adamerge-merge-models``: merge fine-tuned model directories (safetensors) into a new model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from adamerge.merging.task_vectors import CheckpointMismatchError
from adamerge.model_dirs.layout import ModelDirError
from adamerge.model_dirs.merge import merge_model_dirs
from adamerge.model_dirs.methods import METHODS

PROG = "adamerge-merge-models"
PARAMETERS = {
    "lam": (float, "λ, the scale of the merged task vector"),
    "keep": (float, "TIES: fraction of each tensor's task-vector entries kept by magnitude, in (0, 1]"),
    "alpha": (float, "α, how far ExPO extrapolates beyond the fine-tuned model (α > 0)"),
    "beta": (float, "β, the weight of the first checkpoint when interpolating the two extrapolated ones"),
    "p": (float, "DARE: drop rate in [0, 1); survivors are scaled by 1/(1 − p)"),
    "seed": (int, "DARE: seed of the drop masks (each tensor's mask is seeded by (seed, tensor name))"),
}


def _methods_help() -> str:
    lines = ["methods (θ₀ = --base, θₖ = the k-th --models, τₖ = θₖ − θ₀):"]
    for m in METHODS.values():
        defaults = ", ".join(f"--{k} {'(required)' if v is None else v}" for k, v in m.defaults.items())
        lines.append(f"  {m.name:<21} {m.formula}")
        lines.append(f"  {'':<21} {m.title}, {m.reference}" + (f"; {defaults}" if defaults else ""))
    lines += [
        "",
        "Tensors are read one at a time (safetensors), merged in float32 and written in the base's dtype;",
        "non-float tensors are copied from the base. The output has the base's layout (single file or the same",
        "shards + index), its non-weight files (config.json, generation_config.json, tokenizer files; not README.md)",
        "from the base or --copy-from, and merge_config.json recording the method, parameters and inputs.",
        "For ExPO/extrapolation, --copy-from SFT_DIR keeps the fine-tuned model's tokenizer and chat template.",
        "",
        "example:",
        f"  {PROG} --base Llama-3-8B --models sft-math sft-code --method task_arithmetic --lam 0.3 --out merged",
        f"  {PROG} --base base --models sft/checkpoint-800 sft/checkpoint-1000 --method extrapolation \\",
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
    parser.add_argument("--method", required=True, choices=list(METHODS), help="how to merge (formulas below)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the new model directory to write")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it exists (only once the merge has succeeded)")
    parser.add_argument("--copy-from", type=Path, metavar="DIR",
                        help="copy config/tokenizer files from this directory instead of --base")
    for name, (kind, text) in PARAMETERS.items():
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, merge, and return the exit status (errors are printed, not raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    params = {name: getattr(args, name) for name in PARAMETERS}
    try:
        merge_model_dirs(args.base, args.models, args.method, params, args.out, force=args.force,
                         copy_from=args.copy_from, command=[PROG, *argv])
    except (ModelDirError, CheckpointMismatchError, ValueError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
