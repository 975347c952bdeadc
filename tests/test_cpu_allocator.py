"""CPU_ALLOCATOR retain: freed tensor memory is reused without page faults; system leaves glibc as it is."""
import platform
import subprocess
import sys

import pytest

from deqlab.utils.dist import init_distributed

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Twenty MDEQ-sized activations (15.7 MB) allocated, written and freed in turn, as an eager cell does.
FAULTS = """
import resource, sys, torch
from deqlab.utils.dist import init_distributed
init_distributed("cpu", sys.argv[1])
x = torch.randn(32, 120, 32, 32)
for _ in range(3):
    y = torch.relu(x) * 2
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    y = torch.relu(x) * 2
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_retained_memory_is_reused_without_page_faults():
    pages = 32 * 120 * 32 * 32 * 4 // 4096  # one activation
    assert minor_faults("system") > 10 * pages  # each new activation page-faulted in afresh
    assert minor_faults("retain") < pages // 10


def test_the_setting_is_checked():
    with pytest.raises(ValueError, match="CPU_ALLOCATOR must be 'retain' or 'system', got 'tcmalloc'"):
        init_distributed("cpu", "tcmalloc")
