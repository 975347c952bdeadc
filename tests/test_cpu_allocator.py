"""CPU_ALLOCATOR retain: blocks up to 32 MiB come from glibc's heap and are reused without page faults; system
leaves glibc's defaults (a fresh mmap for every large block until its dynamic thresholds adapt, if they do)."""
import platform
import subprocess
import sys

import pytest

from deqlab.utils.dist import init_distributed

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Where a fresh process puts a 30 MiB tensor: above glibc's initial mmap threshold (128 KiB), under the 32 MiB
# that retain sets, so "[heap]" with retain and its own anonymous mapping without.
MAPPING = """
import sys, torch
from deqlab.utils.dist import init_distributed
init_distributed("cpu", sys.argv[1])
block = torch.empty(30 * 2**20 // 4)  # kept alive while the maps are read
ptr = block.data_ptr()
for line in open("/proc/self/maps"):
    span, *rest = line.split()
    lo, hi = (int(x, 16) for x in span.split("-"))
    if lo <= ptr < hi:
        print(rest[4] if len(rest) > 4 else "anonymous")
"""

# Twenty MDEQ-sized activations (15.7 MB) allocated, written and freed in turn, as an eager cell does, counted
# after thirty such rounds: the heap's layout settles in the first few (glibc's memalign splits leave holes).
FAULTS = """
import resource, sys, torch
from deqlab.utils.dist import init_distributed
init_distributed("cpu", sys.argv[1])
x = torch.randn(32, 120, 32, 32)
for _ in range(30):
    y = torch.relu(x) * 2
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    y = torch.relu(x) * 2
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(code: str, mode: str) -> str:
    return subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                          check=True).stdout.split()[-1]


def test_large_blocks_come_from_the_heap_only_when_retained():
    assert run(MAPPING, "retain") == "[heap]"
    assert run(MAPPING, "system") == "anonymous"


def test_retained_memory_is_reused_without_page_faults():
    pages = 32 * 120 * 32 * 32 * 4 // 4096  # one activation
    # 0 in most runs; at most one of the twenty activations faulted in afresh (glibc as it is: up to all twenty)
    assert min(int(run(FAULTS, "retain")) for _ in range(2)) <= pages


def test_the_setting_is_checked():
    with pytest.raises(ValueError, match="CPU_ALLOCATOR must be 'retain' or 'system', got 'tcmalloc'"):
        init_distributed("cpu", "tcmalloc")
