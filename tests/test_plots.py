"""Coefficient heatmaps: a PNG with one row per task and one column per merged tensor."""

import pytest
import torch

from adamerge.plots.coefficients import coefficient_heatmap


def test_heatmap_png_is_written(tmp_path):
    lam = torch.rand(3, 40)
    path = coefficient_heatmap(lam, ["a", "b", "c"], [f"transformer.resblocks.{i}.w" for i in range(40)],
                               tmp_path / "lam.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    from PIL import Image

    width, height = Image.open(path).size
    assert width > height  # tasks are rows, tensors are columns


def test_heatmap_refuses_mismatched_shape(tmp_path):
    with pytest.raises(ValueError, match="2 tasks × 5 tensors"):
        coefficient_heatmap(torch.rand(3, 5), ["a", "b"], list("vwxyz"), tmp_path / "x.png")
