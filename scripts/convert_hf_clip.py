#!/usr/bin/env python
"""Convert Hugging Face transformers CLIP vision towers to native open_clip safetensors, once.

    python scripts/convert_hf_clip.py --out checkpoints/vit_b32 \\
        pretrained=/models/clip-vit-base-patch32 mnist=tanganke/clip-vit-base-patch32_mnist ...

Each source is a folder a transformers ``CLIPModel``/``CLIPVisionModel`` was saved to (config.json +
model.safetensors) or a Hub id already in the local Hugging Face cache; ``NAME=`` sets the output name
(default: the folder's name). Writes ``<out>/<NAME>.safetensors`` (open_clip ``visual`` state dicts) that
``pool=native`` reads. Towers without an image projection (FusionBench's CLIPVisionModels) take it from
``--projection-from`` (a transformers CLIPModel, or a native vision-tower file), or from a source named
``pretrained``. Only safetensors are read; nothing is unpickled or downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import adamerge  # noqa: F401
from adamerge.models.checkpoints import load_state_dict
from adamerge.models.hf_clip import (convert_hf_vision, hf_vision_to_open_clip, read_hf_state_dict,
                                     resolve_hf_source)


def parse_source(text: str) -> tuple[str, str]:
    """``NAME=SOURCE`` or ``SOURCE`` (named after its last path part)."""
    name, sep, source = text.partition("=")
    if not sep:
        source, name = text, Path(text.rstrip("/")).name
    return name, source


def projection_from(source: str, hub_cache_dir: str | None):
    """``proj`` of a native vision-tower file or of a transformers CLIPModel."""
    if source.endswith(".safetensors") and Path(source).is_file() and "proj" in (state := load_state_dict(source)):
        return state["proj"]
    folder = resolve_hf_source(source, hub_cache_dir)
    return hf_vision_to_open_clip(read_hf_state_dict(folder), source=source)["proj"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="[NAME=]folder or Hub id of a transformers CLIP model")
    parser.add_argument("--out", type=Path, required=True, help="folder for the native .safetensors files")
    parser.add_argument("--projection-from", help="where towers without visual_projection take 'proj' from")
    parser.add_argument("--hub-cache-dir", help="Hugging Face cache (default: HF_HOME/hub)")
    args = parser.parse_args(argv)
    sources = [parse_source(s) for s in args.sources]
    names = [n for n, _ in sources]
    if len(set(names)) != len(names):
        raise SystemExit(f"two sources would write the same file; name them: NAME=SOURCE ({', '.join(names)})")
    given = args.projection_from or dict(sources).get("pretrained")
    projection = projection_from(given, args.hub_cache_dir) if given else None
    for name, source in sources:
        folder = resolve_hf_source(source, args.hub_cache_dir)
        written = convert_hf_vision(folder, args.out / f"{name}.safetensors", projection=projection)
        print(f"{source} -> {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
