"""A DDP job whose rank fails or hangs ends as a whole, with that rank's error, and leaves no process behind."""

import time
import uuid
from pathlib import Path

import pytest

from tests.cli_runner import adamerge

pytestmark = pytest.mark.slow

COMMON = ["experiment=smoke", "threads=1", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
          "trainer.max_steps=6", "print_config=false", "+callbacks.fail._target_=tests.faults.FailOnRank"]


def leftover_processes(token: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if token in text:
            found.append(text)
    return found


def run_failing(tmp_path, embedded_cache, *extra):
    token = f"ddpfail{uuid.uuid4().hex[:8]}"
    root = Path(__file__).resolve().parents[1]
    started = time.time()
    done = adamerge([*COMMON, f"name={token}", *extra], tmp_path, embedded_cache, timeout=300, check=False,
                    env={"PYTHONPATH": str(root)})
    return done, time.time() - started, token


@pytest.mark.parametrize("rank", [1, 0])
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, embedded_cache, rank):
    done, _, token = run_failing(tmp_path, embedded_cache, f"+callbacks.fail.rank={rank}")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"injected failure on rank {rank} at step 2" in output
    if rank == 1:  # rank 0 was blocked in the all-reduce: it names rank 1's error, not just a dead socket
        assert "RankFailedError" in output and f"rank {rank} (step 2): tests.faults.InjectedFailure" in output
    time.sleep(1)
    assert leftover_processes(token) == []


def test_a_hanging_rank_ends_the_job_after_the_timeout(tmp_path, embedded_cache):
    done, seconds, token = run_failing(tmp_path, embedded_cache, "+callbacks.fail.hang=true",
                                       "trainer.strategy.timeout_minutes=0.5")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "RankFailedError" in output and "no rank reported an error" in output
    assert "trainer.strategy.timeout_minutes" in output
    time.sleep(1)
    assert leftover_processes(token) == []  # the hung rank was killed, not orphaned
