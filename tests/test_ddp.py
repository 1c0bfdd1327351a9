"""DDP on 2 CPU processes (gloo) learns the same coefficients as one process on the same global batch."""

import pytest
import torch

from adamerge.models.checkpoints import load_state_dict
from tests.cli_runner import adamerge, records

pytestmark = pytest.mark.slow


def test_ddp_on_two_cpu_processes_equals_single_process(tmp_path, embedded_cache):
    cache = embedded_cache
    common = ["experiment=smoke", "threads=1", "method=adamerging_layerwise", "method.batch_size=8",
              "method.batches_per_task=1", "trainer.max_steps=4", "trainer.accelerator=cpu", "optimizer.lr=1e-2"]
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir(), ddp_dir.mkdir()
    adamerge(common, single_dir, cache)
    adamerge([*common, "trainer=ddp", "trainer.devices=2"], ddp_dir, cache)
    (single,) = records(single_dir, "smoke")
    (ddp,) = records(ddp_dir, "smoke")  # only rank 0 writes a record
    lam_single = load_state_dict(single["extra"]["coefficients_file"])["coefficients"]
    lam_ddp = load_state_dict(ddp["extra"]["coefficients_file"])["coefficients"]
    assert not torch.allclose(lam_single, torch.full_like(lam_single, 0.3))
    torch.testing.assert_close(lam_ddp, lam_single, atol=1e-5, rtol=0)
