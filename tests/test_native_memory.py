"""`bound_native_memory`: oneDNN's kernel caches capped and malloc's mmap threshold fixed, so that
a process meeting ever new matrix shapes (a server) keeps its resident memory flat."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cold.runner.native_memory import KERNEL_CACHE, bound_native_memory

BOUNDS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY", "MALLOC_MMAP_THRESHOLD_")
# bfloat16 matrix products go through oneDNN, which builds a kernel for each new row count.
SHAPES = """
import json, sys, torch
if sys.argv[1] == "bounded":
    from cold.runner.native_memory import bound_native_memory
    bound_native_memory()
torch.set_num_threads(2)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
weight, x = torch.randn(1536, 576, dtype=torch.bfloat16), torch.randn(1200, 576, dtype=torch.bfloat16)
for rows in range(1, 1201):
    torch.nn.functional.linear(x[:rows], weight)
    if rows == 400:
        warm = rss_mb()
print(json.dumps({"warm": warm, "end": rss_mb()}))
"""


def _growth_after_warmup(mode: str) -> float:
    """MB the resident memory grew over 800 new shapes after 400 had been met."""
    env = {k: v for k, v in os.environ.items() if k not in BOUNDS}
    run = subprocess.run([sys.executable, "-c", SHAPES, mode], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    rss = json.loads(run.stdout)
    return rss["end"] - rss["warm"]


def test_the_users_environment_wins(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    bound_native_memory()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
    assert os.environ["LRU_CACHE_CAPACITY"] == str(KERNEL_CACHE)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="needs /proc and oneDNN's bfloat16 kernels (AVX512-BF16 or AMX)")
def test_new_shapes_stop_growing_memory_once_bounded():
    unbounded, bounded = _growth_after_warmup("default"), _growth_after_warmup("bounded")
    print(f"over 800 new shapes after warm-up: default +{unbounded:.0f} MB, bounded +{bounded:.0f} MB")
    assert bounded < unbounded / 3
