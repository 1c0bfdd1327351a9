"""CPU steps reuse freed pages: the allocation pattern of a step stops page-faulting once memory is kept."""

import json
import platform
import subprocess
import sys

# A step's pattern: several blocks above glibc's mmap threshold (32 MB at most), all freed, then again.
_ROUNDS = """
import json, resource, sys, torch
from adamerge.runtime.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else False
def one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(10 * 2**20) for _ in range(8)]  # 8 x 40 MB
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": [one_round() for _ in range(8)]}))
"""


def _faults(mode: str) -> dict:
    # mallopt is process-wide: each setting in its own interpreter
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_stops_page_faults_of_repeated_large_blocks():
    plain, kept = _faults("plain"), _faults("keep")
    if platform.libc_ver()[0] != "glibc":  # mallopt is glibc's: elsewhere it says so and changes nothing
        assert kept["kept"] is False
        return
    assert kept["kept"] is True
    # Without it every round maps its blocks afresh and faults them in again (every 4 KB page; fewer
    # where the kernel backs them with huge pages) ...
    again = min(plain["faults"][1:])
    assert again > 0.5 * plain["faults"][0], plain
    # ... with it the heap settles and later rounds reuse its pages.
    assert max(kept["faults"][-3:]) <= 0.05 * again, (kept, plain)
