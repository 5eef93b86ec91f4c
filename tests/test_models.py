"""Model loading: the GGUF conversion (against transformers' own GGUF loading) and its cache, dtypes,
chat template."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cold.decoding.engine import Engine
from cold.errors import ColdError
from cold.load import gguf, gguf_weights, models


def test_default_model_is_converted_once_and_reused(smollm2, monkeypatch):
    """The session fixture converted (or found) the cached copy; a second load must not dequantise."""
    path = models.resolve_model_dir("smollm2")
    assert path.name.endswith("-float32")  # the cache key includes the dtype (COLD_DTYPE pins float32 here)
    assert (path / "complete").is_file() and (path / "model.safetensors").is_file()

    import transformers

    def no_dequantisation(*args, **kwargs):
        if "gguf_file" in kwargs:
            pytest.fail("the GGUF was dequantised again")
        return original(*args, **kwargs)

    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_dequantisation)
    monkeypatch.setattr(gguf, "write_gguf_weights", lambda *a, **k: pytest.fail("the GGUF was converted again"))
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


# ---- the tensor-by-tensor conversion against transformers' from_pretrained(gguf_file=...) --------


@pytest.fixture(scope="module")
def smollm2_gguf():
    return models.builtin_gguf("smollm2")


@pytest.fixture(scope="module")
def transformers_gguf_model(smollm2_gguf):
    """transformers' own GGUF loading, in float32: the oracle."""
    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """A cache of this module's own, so the conversions below really run (the shared one may hold copies)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cold-cache")
        patch.setenv("COLD_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def converted_float32(smollm2_gguf, fresh_cache):
    return gguf.convert_gguf(smollm2_gguf, torch.float32)


def _shards(directory):
    """Every tensor of a converted directory, through its index when it has several files."""
    index = directory / gguf_weights.INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(directory / name))
    return tensors


def test_float32_conversion_equals_transformers_gguf_loading(converted_float32, transformers_gguf_model):
    ours = _shards(converted_float32)
    theirs = transformers_gguf_model.state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied to the embeddings, stored once
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == theirs[name].shape, name
        assert (tensor - theirs[name]).abs().max().item() <= 1e-6, name
    config = json.loads((converted_float32 / "config.json").read_text())
    assert config["dtype"] == "float32" and config["model_type"] == "llama"
    assert (converted_float32 / "complete").is_file() and not list(converted_float32.parent.glob("*.partial*"))

    ids = AutoTokenizer.from_pretrained(converted_float32)("The capital of France is", return_tensors="pt").input_ids
    ours_model = AutoModelForCausalLM.from_pretrained(converted_float32, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = transformers_gguf_model(ids).logits, ours_model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_bfloat16_copy_is_the_float32_copy_cast_and_sharded(smollm2_gguf, converted_float32, tmp_path):
    config = AutoConfig.from_pretrained(converted_float32)
    gguf_weights.write_gguf_weights(smollm2_gguf, config, tmp_path, torch.bfloat16, max_shard_bytes=64 << 20)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all(p.stat().st_size <= (64 << 20) + (1 << 20) for p in tmp_path.glob("*.safetensors"))
    float32, bfloat16 = _shards(converted_float32), _shards(tmp_path)
    assert set(bfloat16) == set(float32)
    for name, tensor in bfloat16.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, float32[name].to(torch.bfloat16)), name
    # and transformers reads the sharded layout
    config.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, bfloat16["model.layers.3.mlp.up_proj.weight"])


def test_load_base_converts_in_the_dtype_it_computes_in(monkeypatch, tmp_path):
    asked = []

    def record(path, dtype):
        asked.append(dtype)
        raise RuntimeError("recorded")

    monkeypatch.setattr(models, "convert_gguf", record)
    for dtype, expected in [("bfloat16", torch.bfloat16), ("auto", torch.float32), (None, torch.float32),
                            (torch.float16, torch.float16)]:
        with pytest.raises(RuntimeError, match="recorded"):
            models.load_base("smollm2", dtype=dtype)
        assert asked.pop() == expected
    with pytest.raises(RuntimeError, match="recorded"):
        models.resolve_model_dir("smollm2")  # the old signature: the default dtype
    assert asked.pop() == torch.float32


def test_a_bad_dtype_for_conversion_is_refused(smollm2_gguf):
    with pytest.raises(ColdError, match="float32, bfloat16 or float16"):
        gguf.convert_gguf(smollm2_gguf, torch.int8)


_BUILDER = """
import os, sys, time
from pathlib import Path
from cold.load import gguf

def write(directory):
    (Path(sys.argv[2]) / f"writer-{os.getpid()}").touch()
    time.sleep(1.0)
    (directory / "weights").write_text("x")

gguf._build_once(Path(sys.argv[1]), Path("model.gguf"), write)
"""


def test_two_processes_building_one_cache_entry(tmp_path):
    """The second process waits for the first one's build, finds the entry complete and writes nothing."""
    target, marks = tmp_path / "entry", tmp_path / "marks"
    marks.mkdir()
    builders = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(target), str(marks)], stderr=subprocess.PIPE)
                for _ in range(2)]
    errors = [b.communicate(timeout=120)[1].decode() for b in builders]
    assert [b.returncode for b in builders] == [0, 0], errors
    assert len(list(marks.iterdir())) == 1
    assert (target / "complete").is_file() and (target / "weights").read_text() == "x"
    assert not list(tmp_path.glob("*.partial*"))
