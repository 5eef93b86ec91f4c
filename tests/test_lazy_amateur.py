"""The lazy amateur is exact: CoLD with lagging amateurs decodes the same tokens as CoLD whose
amateurs run at every step (float32, the real default model and its demo adapter), for greedy,
seeded sampling and beam search, with sequences joining and leaving mid-run; and its bookkeeping
(`cold.sampling.amateur`) follows the policy."""

from __future__ import annotations

import pytest
import torch

from cold.decoding.engine import Engine
from cold.decoding.running import RunningBatch
from cold.load.adapters import read_adapter
from cold.load.demo import demo_adapter_dir
from cold.params import DecodeParams
from cold.runner import model_runner
from cold.sampling.amateur import ALWAYS, AmateurLag

PROMPTS = [
    "A coin is heads up. Ka flips the coin. Sherrie does not flip the coin. Is the coin still heads up?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many in all?",
    "Write one sentence about the sea.",
]
NEW = 24
POLICIES = (0, 2)  # fully lazy, and co-batched for 2 steps after a need


@pytest.fixture(scope="module")
def adapter():
    return read_adapter(demo_adapter_dir("smollm2", "gsm8k"))


class Engines:
    """engines[k]: an Engine with policy k over the one loaded model, made when asked for (an
    Engine installs its own LoRA layers into the shared model, so only the newest one may run)."""

    def __init__(self, base, adapter):
        self.base, self.adapter = base, adapter

    def __getitem__(self, cobatch_steps: int) -> Engine:
        return Engine(self.base, [self.adapter], cobatch_steps=cobatch_steps)


@pytest.fixture(scope="module")
def engines(smollm2, adapter):
    return Engines(smollm2, adapter)


@pytest.fixture
def catch_ups(monkeypatch):
    """Counts the runner's catch-up passes (so that a test can tell lagging really happened)."""
    calls = []
    original = model_runner.ModelRunner._catch_up

    def counted(self, state, seqs):
        calls.append(len(seqs))
        return original(self, state, seqs)

    monkeypatch.setattr(model_runner.ModelRunner, "_catch_up", counted)
    return calls


def _generate(engine, **params):
    return engine.generate(PROMPTS, chat=True, max_new_tokens=NEW, **params)


@pytest.mark.parametrize("params", [
    dict(decoder="cold", alpha=0.1, beta=0.5),
    dict(decoder="cold", alpha=0.3, beta=1.0, do_sample=True, temperature=0.9, top_k=20, seed=11),
    dict(decoder="cold", alpha=0.1, beta=0.5, num_beams=2),
    dict(decoder="cold", alpha=0.1, beta=0.5, amateur_scale=0.5),  # the adapter at half scale as the amateur
], ids=["greedy", "sampling", "beam", "adapter-amateur"])
def test_lazy_policies_decode_the_same_tokens(engines, catch_ups, params):
    reference = _generate(engines[ALWAYS], **params)
    assert not catch_ups  # every amateur current: nothing to catch up
    for k in POLICIES:
        lazy = _generate(engines[k], **params)
        assert [g.token_ids for g in lazy] == [g.token_ids for g in reference], (k, params)
        assert [g.text for g in lazy] == [g.text for g in reference]
        if params.get("num_beams", 1) == 1:  # the counts are per sequence, whatever the policy
            assert [g.amateur_steps for g in lazy] == [g.amateur_steps for g in reference]
    assert catch_ups, "no amateur ever lagged: the test would prove nothing"


def test_needed_steps_are_counted(engines):
    engine = engines[0]
    for g in _generate(engine, decoder="cold"):
        assert 0 < g.amateur_steps < len(g.token_ids)  # some steps needed the amateur, not all
    assert all(g.amateur_steps is None for g in _generate(engine, decoder="expert"))


def test_an_amateur_never_needed_is_never_run(engines, catch_ups, monkeypatch):
    """alpha = 1 keeps only the top token: no step needs the amateur, so it is not even prefilled
    and no step computes amateur logits or contrastive scores; the tokens are the expert's own."""
    engine = engines[0]
    scored = []
    monkeypatch.setattr(model_runner.ModelRunner, "_contrastive_scores", lambda *args: scored.append(args))
    lazy = _generate(engine, decoder="cold", alpha=1.0)
    assert not catch_ups and not scored
    assert all(g.amateur_steps == 0 for g in lazy)
    assert [g.token_ids for g in lazy] == [g.token_ids for g in _generate(engine, decoder="expert")]


@pytest.mark.parametrize("k", POLICIES)
def test_joining_and_leaving_mid_run_with_lagging_amateurs(engines, catch_ups, k):
    """Sequences join a running batch (mixed decoders and settings), one leaves; every survivor
    decodes what it decodes alone with every amateur current."""
    plan = [("cold", 0.1), ("expert", 0.1), ("cold", 0.05), ("cold", 0.2), ("cold", 0.1)]
    engine = engines[k]
    requests = [engine.make_request(PROMPTS[i % len(PROMPTS)], DecodeParams(decoder=d, alpha=a, max_new_tokens=NEW), chat=True)
                for i, (d, a) in enumerate(plan)]
    batch = RunningBatch(engine.runner)
    ids = {key: [] for key in range(len(plan))}
    batch.join(requests[:2], [0, 1])
    _decode_with(batch, ids, {3: lambda: batch.join(requests[2:4], [2, 3]), 7: lambda: batch.join(requests[4:], [4]),
                              9: lambda: batch.drop([2])})
    assert catch_ups
    reference = engines[ALWAYS]
    for key, (decoder, alpha) in enumerate(plan):
        alone = reference.generate(PROMPTS[key % len(PROMPTS)], decoder=decoder, alpha=alpha, max_new_tokens=NEW, chat=True)[0]
        expected = alone.token_ids[: len(ids[2])] if key == 2 else alone.token_ids
        assert ids[key] == expected, (k, key, decoder, alpha)


@pytest.mark.parametrize("k", POLICIES)
def test_joiners_take_the_rows_that_leavers_vacated(engines, k):
    """A join that needs more rows than are spare reallocates the cache, with room to spare; a
    sequence that joins after others left is then written into their vacated rows, moving as few
    rows as possible (the buffers stay the same). Every sequence decodes what it decodes alone."""
    plan = [(PROMPTS[0], "cold"), (PROMPTS[1], "expert"), (PROMPTS[1], "cold"), (PROMPTS[2], "cold"),
            (PROMPTS[2], "cold"), (PROMPTS[2], "cold")]
    engine = engines[k]
    requests = [engine.make_request(p, DecodeParams(decoder=d, max_new_tokens=NEW), chat=True) for p, d in plan]
    batch = RunningBatch(engine.runner)
    ids = {key: [] for key in range(len(plan))}

    def storage():
        return batch.cache.layers[0]._k.untyped_storage().data_ptr()

    def join(first: int, last: int, reallocates: bool):
        before = storage()
        batch.join(requests[first:last], list(range(first, last)))
        assert (storage() != before) == reallocates

    def drop(key: int):
        before = storage()
        batch.drop([key])
        assert storage() == before

    batch.join(requests[:3], [0, 1, 2])  # 3 expert rows + 2 amateur rows
    _decode_with(batch, ids, {
        1: lambda: join(3, 4, True),  # no spare rows: reallocated
        3: lambda: drop(0),  # a CoLD sequence leaves two rows spare
        4: lambda: join(4, 5, False),  # a CoLD sequence with a shorter prompt takes them
        5: lambda: drop(1),  # one row spare
        6: lambda: join(5, 6, True),  # needs two: reallocated
    })
    reference = engines[ALWAYS]
    for key, (prompt, decoder) in enumerate(plan):
        alone = reference.generate(prompt, decoder=decoder, max_new_tokens=NEW, chat=True)[0].token_ids
        assert ids[key] == (alone[: len(ids[key])] if key in (0, 1) else alone), (k, key, decoder)


def _decode_with(batch: RunningBatch, ids: dict, actions: dict) -> None:
    """Step `batch` until it is empty and every action has run, adding each sequence's tokens to
    ids[key]; actions[i]() runs before step i (a join, a drop)."""
    step = 0
    while batch or step <= max(actions):
        if step in actions:
            actions[step]()
        if batch:
            for key, event in batch.step():
                ids[key] += event.token_ids
        step += 1


# ---- the bookkeeping alone -----------------------------------------------------------------------


def test_policy_co_batches_for_k_steps_after_a_need():
    lag = AmateurLag.start([[1, 2, 3], [4]], contrastive=[True, False], cobatch_steps=2)
    assert lag.pending == [[1, 2, 3], []] and lag.cobatched == [False, False]  # the prompt waits
    lag.fed([7, 8])
    assert lag.pending[0] == [1, 2, 3, 7] and lag.pending[1] == []
    assert lag.catch_up_seqs({0: False}) == []
    assert lag.catch_up_seqs({0: True}) == [0]
    lag.caught_up([0])
    lag.observe({0: True})
    assert lag.cobatched[0] and lag.needed[0] == 1  # needed now: current for the next 2 steps
    for expected in (True, False):
        lag.fed([9, 9])
        assert lag.pending[0] == []  # a co-batched amateur collects nothing
        lag.observe({0: False})
        assert lag.cobatched[0] is expected
    lag.fed([5, 5])
    assert lag.pending[0] == [5] and lag.steps[0] == 3 and lag.needed[0] == 1


def test_always_prefills_and_never_lags():
    lag = AmateurLag.start([[1, 2]], contrastive=[True], cobatch_steps=ALWAYS)
    assert not lag.lazy and lag.pending == [[]] and lag.cobatched == [True]
    for _ in range(3):
        lag.observe({0: False})
        lag.fed([1])
    assert lag.pending == [[]] and lag.cobatched == [True]


def test_repeated_sequences_lag_apart():
    lag = AmateurLag.start([[1]], contrastive=[True], cobatch_steps=0).repeated(2)
    lag.pending[0].append(5)
    assert lag.pending == [[1, 5], [1]]
    swapped = lag.reordered([1, 1])
    assert swapped.pending == [[1], [1]] and swapped.pending[0] is not swapped.pending[1]


def test_bad_policy_is_refused(smollm2):
    from cold.errors import ColdError

    with pytest.raises(ColdError, match="cobatch_steps must be an integer >= 0"):
        Engine(smollm2, cobatch_steps=-1)


def test_lagging_rows_skip_the_forward(engines):
    """With K = 0 a decode step forwards the expert rows only (the amateur rows are not computed)."""
    engine = engines[0]
    runner = engine.runner
    requests = [engine.make_request(p, DecodeParams(decoder="cold", alpha=1.0, max_new_tokens=4), chat=True) for p in PROMPTS]
    batch = RunningBatch(runner)
    with torch.inference_mode():
        batch.join(requests, [0, 1, 2])
        assert batch.state.active == len(PROMPTS) and batch.state.mask.rows == 2 * len(PROMPTS)
        batch.step()
        assert batch.state.active == len(PROMPTS)


def test_joining_amateurs_are_prefilled_while_most_sequences_need_theirs():
    from cold.sampling.amateur import NeedShare

    share = NeedShare()
    assert share.prefill(16) and share.prefill(ALWAYS) and not share.prefill(0)  # K = 0: never prefilled
    share.record([0] * 9)  # nine sequences that never needed their amateur
    assert not share.prefill(16) and share.prefill(ALWAYS)
    share.record([3] * 9)
    assert share.prefill(16)


def test_the_runner_learns_to_defer_the_amateur_prompt(engines):
    """alpha = 1: no sequence needs its amateur, so after a few the joining amateurs stop being prefilled."""
    engine = engines[16]
    assert engine.runner.need_share.prefill(16)
    for _ in range(4):
        engine.generate(PROMPTS, chat=True, decoder="cold", alpha=1.0, max_new_tokens=2)
    assert not engine.runner.need_share.prefill(16)
