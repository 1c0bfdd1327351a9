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


def test_adaptation_curves_from_a_lightning_csv_log(tmp_path):
    from adamerge.plots.curves import adaptation_curves, read_metric_series

    log = tmp_path / "metrics.csv"
    log.write_text("step,entropy/a,batch_acc/a,loss,test_acc/avg\n0,2.0,0.5,2.0,\n1,1.5,0.6,1.5,\n2,,,,0.7\n")
    series = read_metric_series(log, ("entropy/", "batch_acc/"))
    assert series == {"entropy/a": [(0, 2.0), (1, 1.5)], "batch_acc/a": [(0, 0.5), (1, 0.6)]}
    path = adaptation_curves(log, tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.csv"
    empty.write_text("step,loss\n0,1.0\n")
    assert adaptation_curves(empty, tmp_path / "none.png") is None
