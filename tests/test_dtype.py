"""The compute dtype: COLD_DTYPE, "auto", the CPU-flag rule, and the error for a bad name."""

from __future__ import annotations

import pytest
import torch

from cold.errors import ColdError
from cold.load import models


@pytest.fixture
def flags(monkeypatch):
    """Set the CPU flags `default_dtype` sees, with COLD_DTYPE unset."""
    monkeypatch.delenv(models.DTYPE_ENV, raising=False)

    def set_flags(*names):
        monkeypatch.setattr(models, "cpu_flags", lambda: frozenset(names))

    return set_flags


def test_the_suite_runs_pinned_to_float32():
    # tests/conftest.py pins it, so that results do not depend on the CPU
    assert models.default_dtype("cpu") == torch.float32
    assert models.pick_dtype(None) == models.pick_dtype("auto") == torch.float32


@pytest.mark.parametrize("cpu, expected", [
    (("fpu", "avx2", "avx512f"), torch.float32),  # AVX-512 without its BF16 extension: emulated, slow
    (("avx512f", "avx512_bf16"), torch.bfloat16),
    (("amx_tile", "amx_bf16"), torch.bfloat16),
    ((), torch.float32),  # no /proc/cpuinfo
])
def test_cpu_default_follows_the_bf16_flags(flags, cpu, expected):
    flags(*cpu)
    assert models.default_dtype("cpu") == expected
    assert models.pick_dtype("auto", "cpu") == models.pick_dtype(None, torch.device("cpu")) == expected


def test_cuda_defaults_to_bfloat16(flags, monkeypatch):
    flags()
    monkeypatch.setattr(models, "pick_device", lambda device: torch.device("cuda"))
    assert models.default_dtype("cuda") == torch.bfloat16


def test_cold_dtype_overrides_the_automatic_choice(flags, monkeypatch):
    flags("avx512_bf16")
    monkeypatch.setenv(models.DTYPE_ENV, "float32")
    assert models.pick_dtype("auto") == torch.float32
    monkeypatch.setenv(models.DTYPE_ENV, "float16")
    assert models.pick_dtype(None, "cpu") == torch.float16
    assert models.pick_dtype("bfloat16") == torch.bfloat16  # an explicit name beats the variable
    monkeypatch.setenv(models.DTYPE_ENV, "auto")
    assert models.pick_dtype("auto") == torch.bfloat16
    monkeypatch.setenv(models.DTYPE_ENV, "fp8")
    with pytest.raises(ColdError, match="COLD_DTYPE='fp8' is not one of auto, float32"):
        models.pick_dtype("auto")


def test_names_and_torch_dtypes():
    assert models.pick_dtype("float16") == torch.float16
    assert models.pick_dtype(torch.bfloat16) == torch.bfloat16
    assert models.dtype_name(models.pick_dtype("bfloat16")) == "bfloat16"
    with pytest.raises(ColdError, match="dtype 'int3' is not one of auto, float32, bfloat16, float16"):
        models.pick_dtype("int3")


def test_cpu_flags_are_the_first_flags_line_of_proc_cpuinfo():
    models.cpu_flags.cache_clear()
    try:
        lines = [line for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("flags")]
    except OSError:
        lines = []
    expected = set(lines[0].split(":", 1)[1].split()) if lines else set()
    assert models.cpu_flags() == expected
