"""The lean decode step (`cold.runner.llama_step`) against the reference path (transformers' forward)."""

from __future__ import annotations

import pytest
import torch

from cold.decoding.engine import Engine
from cold.load.adapters import read_adapter
from cold.load.demo import demo_adapter_dir
from cold.load.models import BaseModel, load_base
from cold.runner import model_runner
from cold.runner.llama_step import LeanDecoder
from cold.runner.rows import layout_of
from conftest import make_lora, prefill

DECODERS = ("base", "expert", "cold")


def _both(base: BaseModel, adapters, run) -> list:
    """run(engine) with the lean step and with the reference path. Each engine is built right
    before it runs: engines on one model share its layers, the last one built owns them."""
    return [run(Engine(base, adapters, lean=lean)) for lean in (True, False)]


def _prompts(vocab: int, lengths=(5, 12, 9), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _tokens(engine: Engine, prompts, **params) -> list[list[int]]:
    return [g.token_ids for g in engine.generate(prompts, ignore_eos=True, **params)]


@pytest.fixture(scope="module")
def tiny_adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("lean-adapters")
    make_lora(tiny.model, root / "all", std=0.2, seed=1)
    make_lora(tiny.model, root / "qv", targets=("q_proj", "v_proj"), r=4, std=0.3, seed=2)
    return [read_adapter(root / "all", "all"), read_adapter(root / "qv", "qv")]


def test_lean_step_is_used_for_llama_and_shares_the_weights(tiny, tiny_adapters):
    assert Engine(tiny, tiny_adapters[:1], lean=False).lean is None
    lean = Engine(tiny, tiny_adapters[:1])
    assert lean.lean is not None
    attn = tiny.model.model.layers[0].self_attn
    qkv = lean.lean.layers[0].qkv.weight  # q, k, v back to back, and the layers' own weights are views of it
    q_rows = attn.q_proj.base.weight.shape[0]
    assert qkv.data_ptr() == attn.q_proj.base.weight.data_ptr()  # no copy of the base
    assert qkv[q_rows:].data_ptr() == attn.k_proj.base.weight.data_ptr()
    assert Engine(tiny, tiny_adapters[:1]).lean.layers[0].qkv.weight.data_ptr() == qkv.data_ptr()  # fused once


def test_reordered_weights_compute_what_the_plain_ones_do_and_are_shared(tiny, tiny_adapters, monkeypatch):
    """The lean step's matmuls run on oneDNN-reordered copies of the base weights (float32 on the
    CPU), made once per model however many engines run over it; COLD_PACK_WEIGHTS=0 turns them off."""
    from cold.runner.llama_step import Dense

    gen = torch.Generator().manual_seed(0)
    weight, x, residual = (torch.randn(shape, generator=gen) for shape in ((96, 64), (3, 64), (3, 96)))
    dense, plain = Dense(weight, {}), Dense(weight, None)
    assert dense.packed is not None and dense.packed.is_mkldnn and plain.packed is None
    torch.testing.assert_close(dense(x), torch.nn.functional.linear(x, weight))
    torch.testing.assert_close(dense.add_to(residual, x), residual + x @ weight.T)
    torch.testing.assert_close(dense(x[1:]), plain(x[1:]))  # any row count, and views

    first, second = Engine(tiny, tiny_adapters[:1]).lean, Engine(tiny, tiny_adapters[:1]).lean
    assert first.layers[0].qkv.packed is not None and first.head.packed is not None
    assert second.layers[0].qkv.packed is first.layers[0].qkv.packed  # one copy per model
    monkeypatch.setenv("COLD_PACK_WEIGHTS", "0")
    assert Engine(tiny, tiny_adapters[:1]).lean.layers[0].qkv.packed is None


def _one_step(engine: Engine, prompts) -> torch.Tensor:
    """Hidden states [R, H] (float32) after a CoLD prefill of `prompts` and one decode step."""
    params = dict(decoder="cold", alpha=0.1, beta=0.5, expert_scale=1.5, max_new_tokens=8)
    requests = engine.make_requests(prompts, None, False, params)
    with torch.inference_mode():
        layout, state = prefill(engine, requests)
        cache, mask, positions = state.cache, state.attention_mask, state.positions
        tokens = torch.tensor([[7]] * len(layout.rows))
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return engine.runner.forward(layout, tokens, mask, positions[:, None], cache).float()


def test_one_lean_step_matches_the_reference_forward(tiny, tiny_adapters):
    prompts = _prompts(len(tiny.tokenizer))
    lean, reference = _both(tiny, tiny_adapters[:1], lambda engine: _one_step(engine, prompts))
    # float32, the prefill and the step each summed in another order (fused q/k/v, LoRA, residuals)
    assert torch.allclose(lean, reference, atol=1e-4, rtol=1e-4)


def _prefilled(engine: Engine, prompts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(hidden states [R, H], every layer's keys [R, Hkv, L, D] with masked-out columns zeroed)
    after a CoLD prefill of `prompts` whose amateurs are prefilled too."""
    params = dict(decoder="cold", alpha=0.1, beta=0.5, max_new_tokens=4)
    requests = engine.make_requests(prompts, None, False, params)
    with torch.inference_mode():
        layout = layout_of(requests, engine.device)
        state = engine.runner.prefill([r.prompt_ids for r in requests], layout, 4, amateur_prompts=True)
        real = state.attention_mask[:, None, :, None].bool()  # [R, 1, L, 1]
        return state.hidden.float(), [torch.where(real, layer.keys, 0).float() for layer in state.cache.layers]


@pytest.mark.parametrize("positions", [2048, 24])  # one chunk; chunks of 24 // 6 rows = 4 columns, each attending to the cache
def test_lean_prefill_matches_the_reference_forward(tiny, tiny_adapters, monkeypatch, positions):
    """The prefill (left-padded rows, expert and amateur rows, many new tokens per row) runs
    through the lean forward too: the same hidden states and cached keys as transformers' forward."""
    monkeypatch.setattr(model_runner, "PREFILL_POSITIONS", positions)
    monkeypatch.setattr(model_runner, "LEAN_CHUNK_TOKENS", 256)
    prompts = _prompts(len(tiny.tokenizer), lengths=(5, 17, 9))
    calls = []
    monkeypatch.setattr(LeanDecoder, "forward", _counting(LeanDecoder.forward, calls))
    (lean_hidden, lean_keys), (hidden, keys) = _both(tiny, tiny_adapters[:1], lambda engine: _prefilled(engine, prompts))
    assert any(ids.shape[1] > 1 for ids in calls)  # the lean forward ran the prefill's chunks
    torch.testing.assert_close(lean_hidden, hidden, atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(lean_keys, keys):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_a_large_prefill_chunk_runs_the_reference_forward(tiny, tiny_adapters, monkeypatch):
    """Chunks of more than LEAN_CHUNK_TOKENS new tokens go through transformers' forward; decode steps stay lean."""
    monkeypatch.setattr(model_runner, "LEAN_CHUNK_TOKENS", 8)
    calls = []
    monkeypatch.setattr(LeanDecoder, "forward", _counting(LeanDecoder.forward, calls))
    engine = Engine(tiny, tiny_adapters[:1])
    engine.generate(_prompts(len(tiny.tokenizer), lengths=(5, 17, 9)), decoder="cold", alpha=0.1, beta=0.5,
                    max_new_tokens=3, ignore_eos=True)
    assert calls and all(ids.numel() <= 8 or ids.shape[1] == 1 for ids in calls)
    assert any(ids.shape[1] == 1 for ids in calls)


def _counting(forward, calls: list):
    """`forward` that records each call's input_ids."""
    def wrapper(self, input_ids, *args, **kwargs):
        calls.append(input_ids)
        return forward(self, input_ids, *args, **kwargs)
    return wrapper


def test_bfloat16_lean_step_multiplies_its_lora_in_float32(tiny, tiny_dir, tiny_adapters):
    """On the CPU a bfloat16 model's lean step keeps its LoRA in float32 (oneDNN's bfloat16
    products of thin matrices cost a fixed ~20 us each); its hidden states are no further from the
    float32 model's than the bfloat16 reference path's are (the prefill included)."""
    prompts = _prompts(len(tiny.tokenizer))
    narrow = load_base(str(tiny_dir), dtype="bfloat16")
    group = Engine(narrow, tiny_adapters[:1]).lean.layers[0].lora_qkv
    assert group.a[0].dtype == group.b_t[0].dtype == torch.float32
    lean, reference = _both(narrow, tiny_adapters[:1], lambda engine: _one_step(engine, prompts))
    exact = _one_step(Engine(tiny, tiny_adapters[:1], lean=False), prompts)
    # rounded in another order (prefill and step), not further: within 10% of the reference's error
    assert (lean - exact).norm() <= 1.1 * (reference - exact).norm()


@pytest.mark.parametrize("decoder", DECODERS)
def test_lean_greedy_tokens_equal_reference_tiny(tiny, tiny_adapters, decoder):
    prompts = _prompts(len(tiny.tokenizer))
    params = dict(decoder=decoder, alpha=0.1, beta=1.0, max_new_tokens=20)
    if decoder != "base":
        params["adapter"] = "qv"  # an adapter that leaves k, o and the MLP unadapted
    lean, reference = _both(tiny, tiny_adapters, lambda engine: _tokens(engine, prompts, **params))
    assert lean == reference


def test_lean_falls_back_when_rows_use_different_adapters(tiny, tiny_adapters):
    prompts = _prompts(len(tiny.tokenizer))
    params = dict(decoder="cold", alpha=0.1, beta=0.5, max_new_tokens=12, adapter="all", amateur_adapter="qv", amateur_scale=1.0)
    lean, reference = _both(tiny, tiny_adapters, lambda engine: _tokens(engine, prompts, **params))
    assert lean == reference


def test_lean_beam_search_equals_reference(tiny, tiny_adapters):
    prompts = _prompts(len(tiny.tokenizer), lengths=(6, 10))
    params = dict(decoder="cold", alpha=0.1, beta=0.5, num_beams=3, max_new_tokens=10)
    lean, reference = _both(tiny, tiny_adapters[:1], lambda engine: _tokens(engine, prompts, **params))
    assert lean == reference


def test_other_architectures_use_the_reference_path(tiny, tiny_adapters):
    config = tiny.model.config
    try:
        config.attention_bias = True  # a model the lean step does not reproduce
        assert Engine(tiny, tiny_adapters[:1]).lean is None
    finally:
        config.attention_bias = False


@pytest.mark.parametrize("decoder", DECODERS)
def test_lean_greedy_tokens_equal_reference_on_the_default_model(smollm2, decoder):
    adapter = read_adapter(demo_adapter_dir("smollm2"))
    prompts = ["Natalia sold clips to 48 of her friends in April.", "What is 12 * 7?", "The capital of France"]
    params = dict(decoder=decoder, alpha=0.1, beta=0.5, max_new_tokens=24)
    lean, reference = _both(smollm2, [adapter], lambda engine: _tokens(engine, prompts, chat=True, **params))
    assert lean == reference


