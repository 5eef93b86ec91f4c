"""The static KV cache (`cold.runner.kvcache`): room reserved at prefill, one block for every layer,
prefill in chunks of columns; all of it invisible in the tokens."""

from __future__ import annotations

import pytest
import torch

from cold.decoding.engine import Engine
from cold.decoding.running import RunningBatch
from cold.load.adapters import read_adapter
from cold.runner import model_runner as runner_module
from cold.runner.kvcache import GrowingLayer
from cold.sampling.amateur import ALWAYS
from conftest import make_lora, prefill


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("kvcache-lora")
    make_lora(tiny.model, path, std=0.2, seed=4)
    return read_adapter(path, "all")


PROMPTS = [[5, 9, 13, 40, 41, 42, 43], [7, 8, 9], [11, 12, 13, 14, 15]]


def _tokens(engine: Engine, **params) -> list[list[int]]:
    return [g.token_ids for g in engine.generate(PROMPTS, ignore_eos=True, **params)]


def test_decoding_never_reallocates_and_every_layer_shares_one_block(tiny, adapter):
    engine = Engine(tiny, [adapter])
    requests = engine.make_requests(PROMPTS, None, False, dict(decoder="cold", max_new_tokens=12))
    batch = RunningBatch(engine.runner)
    batch.join(requests, [0, 1, 2])
    layers = batch.cache.layers
    assert all(isinstance(layer, GrowingLayer) for layer in layers)
    buffers = [(layer._k.data_ptr(), layer._v.data_ptr()) for layer in layers]
    assert layers[0]._k.shape[2] == 7 + 12  # the longest prompt + max_new_tokens
    block = layers[0]._k.untyped_storage().data_ptr()
    assert all(layer._k.untyped_storage().data_ptr() == block for layer in layers)  # one allocation
    for _ in range(11):
        batch.step()
    assert [(layer._k.data_ptr(), layer._v.data_ptr()) for layer in layers] == buffers  # written in place


def test_rows_leaving_keep_the_room_and_the_rest_decodes_as_before(tiny, adapter):
    params = dict(decoder="cold", alpha=0.1, beta=0.5, max_new_tokens=10)
    alone = _tokens(Engine(tiny, [adapter]), **params)
    engine = Engine(tiny, [adapter])
    batch = RunningBatch(engine.runner)
    batch.join(engine.make_requests(PROMPTS, None, False, {**params, "ignore_eos": True}), [0, 1, 2])
    out = {0: [], 1: [], 2: []}
    for step in range(10):
        for key, event in batch.step():
            out[key] += event.token_ids
        if step == 3:
            capacity = batch.cache.layers[0]._k.shape[2]
            batch.drop([1])
            assert batch.cache.layers[0]._k.shape[2] == capacity and batch.cache.layers[0].keys.shape[0] == 2 * 2
    assert out[0] == alone[0] and out[2] == alone[2]


def test_a_join_and_the_trim_after_a_leave_keep_room_for_the_rest_of_the_run(tiny, adapter, monkeypatch):
    """Merging a joining batch copies each row once into buffers with room for the rest of the
    generation, and dropping leading padding columns is a view: no layer regrows afterwards, and
    every sequence's tokens equal decoding it alone."""
    params = dict(decoder="cold", alpha=0.1, beta=0.5, max_new_tokens=10)
    alone = _tokens(Engine(tiny, [adapter]), **params)
    engine = Engine(tiny, [adapter])
    regrown = []
    grown = GrowingLayer._grown
    monkeypatch.setattr(GrowingLayer, "_grown", lambda self, *a: regrown.append(1) or grown(self, *a))
    requests = engine.make_requests(PROMPTS, None, False, {**params, "ignore_eos": True})
    batch = RunningBatch(engine.runner)
    batch.join(requests[:1], [0])  # the longest prompt, alone: the later rows are left-padded
    out = {0: [], 1: [], 2: []}
    for step in range(10 + 3):
        if step == 3:
            batch.join(requests[1:], [1, 2])
            layer = batch.cache.layers[0]
            assert layer.spare >= 10 and batch.state.mask.spare >= 10  # the joiners' whole generation
        for key, event in batch.step():
            out[key] += event.token_ids
        if step == 9:  # sequence 0 has finished: its prompt's leading columns are padding in the rest
            assert 0 not in batch.keys and batch.cache.layers[0].keys.shape[2] < 7 + 10
    assert regrown == []
    assert [out[k] for k in range(3)] == alone


def test_continuous_batching_keeps_the_cache_bounded(tiny, adapter):
    """Sequences joining as others finish, many times over: the buffers never hold more rows than
    the batch has had at once, nor more columns than a history plus two generations."""
    engine = Engine(tiny, [adapter])
    new = 6
    requests = engine.make_requests(PROMPTS * 7, None, False, dict(decoder="cold", max_new_tokens=new, ignore_eos=True))
    batch, joined, size = RunningBatch(engine.runner), 0, 3
    while joined < len(requests) or batch:
        free = min(size - len(batch), len(requests) - joined)
        if free:
            batch.join(requests[joined : joined + free], list(range(joined, joined + free)))
            joined += free
        layer = batch.cache.layers[0]
        assert layer.row_capacity <= 2 * size and layer._k.shape[2] <= max(map(len, PROMPTS)) + new + 2 * new
        batch.step()


def test_prefill_in_chunks_of_columns_gives_the_same_tokens(tiny, adapter, monkeypatch):
    for params in (dict(decoder="cold", alpha=0.1, beta=0.5), dict(decoder="expert"), dict(decoder="cold", num_beams=2)):
        whole = _tokens(Engine(tiny, [adapter]), max_new_tokens=10, **params)
        monkeypatch.setattr(runner_module, "PREFILL_POSITIONS", 8)  # 6 rows of 7 columns: chunks of 1 column
        chunked = _tokens(Engine(tiny, [adapter]), max_new_tokens=10, **params)
        monkeypatch.undo()
        assert chunked == whole, params


def test_chunked_prefill_hidden_states_match_one_pass(tiny, adapter, monkeypatch):
    def prefill_once(engine: Engine) -> torch.Tensor:
        requests = engine.make_requests(PROMPTS, None, False, dict(decoder="cold", max_new_tokens=4))
        with torch.inference_mode():
            _, state = prefill(engine, requests)
        return state.hidden, state.cache.layers[-1].keys

    # every amateur prefilled with its expert (a lazy amateur's prompt would be left pending)
    whole = prefill_once(Engine(tiny, [adapter], cobatch_steps=ALWAYS))
    monkeypatch.setattr(runner_module, "PREFILL_POSITIONS", 12)  # chunks of 2 columns
    chunked = prefill_once(Engine(tiny, [adapter], cobatch_steps=ALWAYS))
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
