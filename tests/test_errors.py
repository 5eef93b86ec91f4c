"""Bad input gets a ColdError that names the problem, and leaves the engine as it was."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from cold.decoding.engine import Engine
from cold.errors import ColdError
from cold.load.adapters import read_adapter
from cold.load.models import load_base
from cold.lora.layer import RowLoRALinear
from conftest import make_lora


@pytest.fixture(scope="module")
def good(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_lora(tiny.model, path, r=4, alpha=8)
    return path


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "bias"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"r": 0}, "r must be"),
    ],
)
def test_unsupported_adapter_features_are_refused(good, tmp_path, changes, message):
    with pytest.raises(ColdError, match=message):
        read_adapter(_edit_config(good, tmp_path / "bad", **changes))


def test_missing_and_corrupt_files(good, tmp_path):
    with pytest.raises(ColdError, match="directory not found"):
        read_adapter(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ColdError, match="missing adapter_config.json"):
        read_adapter(empty)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(good, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(ColdError, match="missing adapter_model.safetensors"):
        read_adapter(no_weights)
    bad_json = tmp_path / "bad-json"
    shutil.copytree(good, bad_json)
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(ColdError, match="not valid JSON"):
        read_adapter(bad_json)
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ColdError, match="corrupt"):
        read_adapter(truncated)


def test_adapter_for_a_different_base_is_refused(tiny, tmp_path):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny.tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    make_lora(other, tmp_path / "shape", r=4, alpha=8)
    with pytest.raises(ColdError, match="different base model"):
        Engine(tiny, [read_adapter(tmp_path / "shape")])
    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    make_lora(deeper, tmp_path / "modules", r=4, alpha=8)
    with pytest.raises(ColdError, match="layers.2.* does not exist"):
        Engine(tiny, [read_adapter(tmp_path / "modules")])


def test_a_bad_adapter_changes_nothing(tiny, good, tmp_path):
    engine = Engine(tiny, [read_adapter(good, "good")])
    before = engine.generate([[5, 6, 7]], decoder="cold", max_new_tokens=6)[0].token_ids
    layers_before = {n: id(m) for n, m in engine.model.named_modules() if isinstance(m, RowLoRALinear)}
    bad = _edit_config(good, tmp_path / "dora", use_dora=True)
    with pytest.raises(ColdError):
        engine.add_adapter(bad)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny.tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    make_lora(other, tmp_path / "shape", r=4, alpha=8)
    with pytest.raises(ColdError):
        engine.add_adapter(tmp_path / "shape")
    assert engine.adapter_names == ["good"]
    assert {n: id(m) for n, m in engine.model.named_modules() if isinstance(m, RowLoRALinear)} == layers_before
    assert engine.generate([[5, 6, 7]], decoder="cold", max_new_tokens=6)[0].token_ids == before


def test_engine_load_checks_adapters_before_loading_the_model(tmp_path, monkeypatch):
    import cold.decoding.engine

    monkeypatch.setattr(cold.decoding.engine, "load_base", lambda *a, **k: pytest.fail("model loaded before adapter check"))
    with pytest.raises(ColdError, match="directory not found"):
        Engine.load("smollm2", {"x": tmp_path / "missing"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha": 0.0}, "alpha must be in"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"alpha": float("nan")}, "alpha must be in"),
        ({"beta": -0.1}, "beta must be in"),
        ({"beta": 1e300}, "beta must be in"),
        ({"expert_scale": 1e30}, "expert_scale must be in"),
        ({"seed": 2**70}, "seed must be an integer in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be an integer"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"do_sample": True, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens must be"),
        ({"num_beams": 0}, "num_beams"),
        ({"do_sample": True, "num_beams": 2}, "beam search"),
        ({"decoder": "nope"}, "decoder must be one of"),
        ({"scoring": "nope"}, "scoring must be one of"),
        ({"adapter": "unknown"}, "unknown adapter"),
        ({"colour": "red"}, "unknown decoding parameter"),
    ],
)
def test_out_of_range_parameters(tiny, good, kwargs, message):
    engine = Engine(tiny, [read_adapter(good)])
    with pytest.raises(ColdError, match=message):
        engine.generate([[5, 6]], **{"max_new_tokens": 4, **kwargs})


def test_cold_without_an_adapter(tiny):
    engine = Engine(tiny)
    with pytest.raises(ColdError, match="needs a LoRA adapter"):
        engine.generate([[5, 6]], decoder="cold", max_new_tokens=2)
    assert engine.generate([[5, 6]], decoder="base", max_new_tokens=2)[0].token_ids


def test_prompt_beyond_the_context(tiny, good):
    engine = Engine(tiny, [read_adapter(good)])  # tiny context: 96 positions
    with pytest.raises(ColdError, match="exceeds the model's context of 96"):
        engine.generate([list(range(10, 100))], max_new_tokens=10)
    with pytest.raises(ColdError, match="exceeds the model's context"):
        engine.generate([list(range(10, 200))], max_new_tokens=1)
    with pytest.raises(ColdError, match="empty"):
        engine.generate([""], decoder="base")


def test_bad_model_sources(tmp_path):
    with pytest.raises(ColdError, match="not a built-in name"):
        load_base(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ColdError, match="no config.json"):
        load_base(str(tmp_path / "empty"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ColdError, match="cannot read GGUF"):
        load_base(str(fake))
    with pytest.raises(ColdError, match="dtype"):
        load_base("smollm2", dtype="int3")
