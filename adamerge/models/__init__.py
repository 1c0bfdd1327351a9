"""Backbones (open_clip CLIP models), zero-shot heads and checkpoint files."""
