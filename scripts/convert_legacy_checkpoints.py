#!/usr/bin/env python
"""Convert legacy pickled CLIP checkpoints (task-vectors / AdaMerging layout) to native safetensors, once.

    python scripts/convert_legacy_checkpoints.py /path/to/checkpoints/ViT-B-32 --out checkpoints/ViT-B-32

Reads ``zeroshot.pt`` and ``<Task>/finetuned.pt`` (or any ``.pt`` files given) without the old
open_clip or the code that pickled them, and writes ``pretrained.safetensors`` and
``<task>.safetensors`` (vision-tower state dicts) that ``pool=native`` reads. Nothing runs from the
pickles: every class they name is replaced by an inert stand-in (adamerge/models/legacy.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import adamerge  # noqa: F401
from adamerge.models.checkpoints import save_state_dict
from adamerge.models.legacy import read_legacy_checkpoint, vision_tower


def plan(source: Path) -> list[tuple[Path, str]]:
    """(legacy file, output name) pairs: zeroshot.pt → pretrained, <Task>/finetuned.pt → <task>."""
    if source.is_file():
        return [(source, "pretrained" if source.stem == "zeroshot" else source.parent.name.lower() if source.stem == "finetuned" else source.stem)]
    pairs = []
    if (source / "zeroshot.pt").exists():
        pairs.append((source / "zeroshot.pt", "pretrained"))
    for path in sorted(source.glob("*/finetuned.pt")):
        pairs.append((path, path.parent.name.lower()))
    if not pairs:
        raise SystemExit(f"no zeroshot.pt or <Task>/finetuned.pt under {source}")
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a legacy .pt file or the folder holding zeroshot.pt and <Task>/finetuned.pt")
    parser.add_argument("--out", type=Path, required=True, help="folder for the native .safetensors files")
    args = parser.parse_args(argv)
    for path, name in plan(args.source):
        state = vision_tower(read_legacy_checkpoint(path))
        written = save_state_dict(args.out / f"{name}.safetensors", state, metadata={"converted_from": str(path)})
        print(f"{path} -> {written} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
