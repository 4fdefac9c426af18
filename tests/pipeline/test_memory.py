"""The allocator policy: freed blocks are served again without faulting their pages in anew."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_freed_memory_stops_faulting_in_freed_blocks_again() -> None:
    # In a fresh process: the setting is process-wide. 40 MiB blocks are above the largest mmap threshold glibc
    # allows, so by default each is mapped afresh and its pages fault in again at every step's allocation (raising
    # the threshold, as MALLOC_MMAP_THRESHOLD_ does, cannot cover them).
    code = """
import resource, torch
from xkd.pipeline.memory import keep_freed_memory
def step():
    blocks = [torch.ones(10 << 20) for _ in range(3)]
    del blocks
def faults():
    for _ in range(4):  # the first steps after the setting grow the heap to its working size
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
keep_freed_memory()
print(default, faults())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    default, kept = map(int, out.stdout.split())
    if default < 50_000:  # 5 x 3 x 10,240 4-KiB pages when every block faults in again
        pytest.skip(f"{default} page faults without the setting: huge pages, or a malloc that keeps blocks")
    assert kept < default / 10  # measured: 153,615 and 0
