"""A KV cache stored in a narrower dtype than the weights (`Engine(kv_dtype="bfloat16")`)."""

from __future__ import annotations

import pytest
import torch

from cold.decoding.engine import Engine
from cold.errors import ColdError
from cold.load.adapters import read_adapter
from cold.load.demo import demo_adapter_dir
from conftest import make_lora, prefill


@pytest.fixture(scope="module")
def tiny_adapter(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-lora")
    make_lora(tiny.model, path, std=0.2, seed=3)
    return read_adapter(path, "all")


def _prefill_and_step(engine: Engine, prompts):
    """(cache after one decode step, hidden states [R, H] of that step) of a CoLD batch."""
    requests = engine.make_requests(prompts, None, False, dict(decoder="cold", alpha=0.1, beta=0.5, max_new_tokens=8))
    with torch.inference_mode():
        layout, state = prefill(engine, requests)
        cache, mask, positions = state.cache, state.attention_mask, state.positions
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        hidden = engine.runner.forward(layout, torch.tensor([[7]] * len(layout.rows)), mask, positions[:, None], cache)
    return cache, hidden


def test_bfloat16_cache_halves_the_bytes_and_lean_matches_the_reference(tiny, tiny_adapter):
    prompts = [[5, 9, 13, 40, 41], [7, 8, 9]]  # unequal lengths: left padding in the cache
    narrow = {lean: _prefill_and_step(Engine(tiny, [tiny_adapter], lean=lean, kv_dtype="bfloat16"), prompts) for lean in (True, False)}
    wide_cache, wide_hidden = _prefill_and_step(Engine(tiny, [tiny_adapter]), prompts)
    cache = narrow[True][0]
    assert {layer.keys.dtype for layer in cache.layers} == {torch.bfloat16}
    assert {layer.values.dtype for layer in cache.layers} == {torch.bfloat16}
    nbytes = lambda c: sum(layer.keys.nbytes + layer.values.nbytes for layer in c.layers)  # noqa: E731
    assert nbytes(cache) * 2 == nbytes(wide_cache)
    # the lean step and transformers' forward attend to the same rounded cache
    assert narrow[True][1].dtype == torch.float32
    assert torch.allclose(narrow[True][1], narrow[False][1], atol=2e-2, rtol=1e-2)
    # and both stay close to the float32 cache: rounding, not garbage
    assert torch.allclose(narrow[True][1], wide_hidden, atol=5e-2, rtol=5e-2)
    assert not torch.equal(narrow[True][1], wide_hidden)  # the option does something


@pytest.mark.parametrize("decoder", ["expert", "cold"])
def test_bfloat16_cache_keeps_the_default_models_greedy_tokens(smollm2, decoder):
    adapter = read_adapter(demo_adapter_dir("smollm2"))
    prompts = ["Natalia sold clips to 48 of her friends in April.", "What is 12 * 7?", "The capital of France"]
    params = dict(decoder=decoder, alpha=0.1, beta=0.5, max_new_tokens=16, ignore_eos=True, chat=True)
    wide = [g.token_ids for g in Engine(smollm2, [adapter]).generate(prompts, **params)]
    narrow = [g.token_ids for g in Engine(smollm2, [adapter], kv_dtype="bfloat16").generate(prompts, **params)]
    # on real prompts the rounding moves no argmax in the first tokens (near-ties can split later)
    assert [n[:8] for n in narrow] == [w[:8] for w in wide]


def test_the_model_dtype_spelled_out_is_the_default(tiny):
    assert Engine(tiny, kv_dtype="float32").kv_dtype is None


@pytest.mark.parametrize("bad", ["int8", "bf16", "float64"])
def test_a_bad_kv_dtype_is_refused_before_loading(bad):
    with pytest.raises(ColdError, match="is not one of"):
        Engine.load("/nonexistent-model-dir", kv_dtype=bad)  # the model path is never reached
