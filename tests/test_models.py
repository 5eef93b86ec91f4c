"""Model loading: the GGUF conversion cache, dtypes, chat template."""

from __future__ import annotations

import pytest
import torch

from cold.decoding.engine import Engine
from cold.load import gguf, models


def test_default_model_is_converted_once_and_reused(smollm2, monkeypatch):
    """The session fixture converted (or found) the cached copy; a second load must not dequantise."""
    path = models.resolve_model_dir("smollm2")
    assert (path / "complete").is_file() and (path / "model.safetensors").is_file()

    import transformers

    def no_dequantisation(*args, **kwargs):
        if "gguf_file" in kwargs:
            pytest.fail("the GGUF was dequantised again")
        return original(*args, **kwargs)

    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_dequantisation)
    again = models.load_base("smollm2")
    assert again.path == path
    name = "model.layers.0.self_attn.q_proj"  # (an Engine may have wrapped the shared model's layer)
    assert torch.equal(again.model.get_submodule(name).weight, smollm2.model.get_submodule(name).weight)


def test_a_copy_of_the_gguf_elsewhere_reuses_the_conversion(smollm2, tmp_path):
    """The cache is keyed by the file's content, not its path or mtime: a reinstalled package (new
    venv, new mtime) must not dequantise again and leave another 0.5 GB copy in the cache."""
    import os
    import shutil

    original = models.builtin_gguf("smollm2")
    copy = tmp_path / "elsewhere" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    os.utime(copy, (0, 0))
    assert models.resolve_model_dir(str(copy)) == models.resolve_model_dir("smollm2")

    changed = tmp_path / "changed.gguf"
    changed.write_bytes(b"GGUF" + bytes(64))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(63) + b"\x01")
    assert gguf._gguf_cache_key(changed) != gguf._gguf_cache_key(other)


def test_bfloat16_runs_the_same_code_path(tiny_dir):
    base = models.load_base(str(tiny_dir), dtype="bfloat16")
    assert base.model.dtype == torch.bfloat16
    got = Engine(base).generate([[5, 6, 7]], decoder="base", max_new_tokens=3)[0]
    assert len(got.token_ids) == 3


def test_chat_template_is_applied(smollm2):
    engine = Engine(smollm2)
    _, ids = engine.encode("hi", chat=True)
    text = smollm2.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("<|im_start|>assistant")
    _, plain = engine.encode("hi", chat=False)
    assert len(plain) < len(ids)
