"""CoLD decoding against straightforward references, on the real default model with a random LoRA."""

from __future__ import annotations

import math

import pytest
import torch

from cold.decoding.engine import Engine
from cold.load.adapters import read_adapter
from conftest import make_lora, peft_greedy, reference_cold_greedy

PROMPTS = [
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def fibonacci(n):",
    "Once upon a time",
]
NEW = 12


@pytest.fixture(scope="module")
def lora(smollm2, tmp_path_factory):
    """A random LoRA on every linear layer of the real model, and its PEFT oracle."""
    path = tmp_path_factory.mktemp("lora")
    return path, make_lora(smollm2.model, path, r=8, alpha=16, std=0.03, seed=7)


@pytest.fixture
def engine(smollm2, lora):
    return Engine(smollm2, [read_adapter(lora[0])])


def test_two_engines_over_one_base_model_each_keep_their_adapters(smollm2, lora, tmp_path):
    """Adapters live in the base model's modules: an engine that runs after another one reinstalls its own."""
    other = tmp_path / "other"
    make_lora(smollm2.model, other, r=4, alpha=8, std=0.05, seed=11)
    first = Engine(smollm2, [read_adapter(lora[0])])
    alone = [g.token_ids for g in first.generate(PROMPTS[:2], decoder="expert", max_new_tokens=NEW)]
    second = Engine(smollm2, [read_adapter(other)])
    theirs = [g.token_ids for g in second.generate(PROMPTS[:2], decoder="expert", max_new_tokens=NEW)]
    assert theirs != alone
    assert [g.token_ids for g in first.generate(PROMPTS[:2], decoder="expert", max_new_tokens=NEW)] == alone
    assert [g.token_ids for g in second.generate(PROMPTS[:2], decoder="expert", max_new_tokens=NEW)] == theirs


def ids_of(engine, prompt):
    return engine.tokenizer(prompt).input_ids


def test_cold_greedy_equals_two_pass_reference(engine, lora):
    for prompt in PROMPTS[:3]:
        for alpha, beta in [(0.1, 0.5), (0.3, 1.0)]:
            expected = reference_cold_greedy(lora[1], ids_of(engine, prompt), alpha, beta, NEW, engine.eos_ids)
            got = engine.generate(prompt, decoder="cold", alpha=alpha, beta=beta, max_new_tokens=NEW)[0]
            assert got.token_ids == expected, (prompt, alpha, beta)


def test_cold_differs_from_expert(engine):
    cold = engine.generate(PROMPTS, decoder="cold", beta=1.0, max_new_tokens=NEW)
    expert = engine.generate(PROMPTS, decoder="expert", max_new_tokens=NEW)
    assert any(c.token_ids != e.token_ids for c, e in zip(cold, expert))


def test_batch_of_different_lengths_equals_each_alone(engine):
    for decoder in ("cold", "expert", "base"):
        together = engine.generate(PROMPTS, decoder=decoder, max_new_tokens=NEW)
        for prompt, got in zip(PROMPTS, together):
            alone = engine.generate([prompt], decoder=decoder, max_new_tokens=NEW)[0]
            assert got.token_ids == alone.token_ids, (decoder, prompt)
            assert got.text == alone.text


def test_beta_zero_equals_expert_greedy_and_transformers(engine, lora):
    for prompt in PROMPTS:
        cold0 = engine.generate(prompt, decoder="cold", beta=0.0, max_new_tokens=NEW)[0]
        expert = engine.generate(prompt, decoder="expert", max_new_tokens=NEW)[0]
        assert cold0.token_ids == expert.token_ids
        assert expert.token_ids == peft_greedy(lora[1], ids_of(engine, prompt), NEW, engine.eos_ids)


def test_base_decoder_equals_transformers_greedy(engine, lora):
    for prompt in PROMPTS[:2]:
        base = engine.generate(prompt, decoder="base", max_new_tokens=NEW)[0]
        assert base.token_ids == peft_greedy(lora[1], ids_of(engine, prompt), NEW, engine.eos_ids, adapter=False)


def test_every_cold_token_satisfies_the_alpha_mask(engine, lora):
    alpha = 0.2
    for prompt in PROMPTS:
        prompt_ids = ids_of(engine, prompt)
        got = engine.generate(prompt, decoder="cold", alpha=alpha, beta=2.0, max_new_tokens=NEW)[0]
        with torch.no_grad():
            logits = lora[1](input_ids=torch.tensor([prompt_ids + got.token_ids])).logits[0]
        for step, token in enumerate(got.token_ids):
            expert = logits[len(prompt_ids) - 1 + step]
            assert expert[token] >= math.log(alpha) + expert.max() - 1e-4


def test_logprob_form_matches_logit_form_greedy(engine):
    for prompt in PROMPTS[:2]:
        a = engine.generate(prompt, decoder="cold", scoring="logit", beta=0.5, max_new_tokens=NEW)[0]
        b = engine.generate(prompt, decoder="cold", scoring="logprob", beta=0.5, max_new_tokens=NEW)[0]
        assert a.token_ids == b.token_ids


def test_sampling_is_reproducible_with_a_seed(engine):
    kwargs = dict(decoder="cold", do_sample=True, temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=NEW)
    first = engine.generate(PROMPTS[:2], seed=123, **kwargs)
    again = engine.generate(PROMPTS[:2], seed=123, **kwargs)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    others = [engine.generate(PROMPTS[:2], seed=s, **kwargs) for s in range(1, 4)]
    assert any([g.token_ids for g in o] != [g.token_ids for g in first] for o in others)


def test_beam_search_with_one_beam_equals_greedy(engine):
    for decoder in ("cold", "expert"):
        greedy = engine.generate(PROMPTS, decoder=decoder, max_new_tokens=NEW)
        beam = engine.generate(PROMPTS, decoder=decoder, num_beams=1, max_new_tokens=NEW)
        assert [g.token_ids for g in beam] == [g.token_ids for g in greedy]


def test_beam_search_expert_equals_transformers(engine, lora):
    """Expert beam search agrees with transformers' own beam search on the PEFT model."""
    for prompt in PROMPTS[:2]:
        prompt_ids = ids_of(engine, prompt)
        got = engine.generate(prompt, decoder="expert", num_beams=3, max_new_tokens=NEW)[0]
        with torch.no_grad():
            out = lora[1].generate(
                input_ids=torch.tensor([prompt_ids]), num_beams=3, do_sample=False, max_new_tokens=NEW,
                early_stopping=True, length_penalty=1.0, eos_token_id=sorted(engine.eos_ids), pad_token_id=2,
            )
        assert got.token_ids == out[0, len(prompt_ids):].tolist()


def test_cold_beam_search_keeps_the_mask(engine, lora):
    prompt = PROMPTS[0]
    prompt_ids = ids_of(engine, prompt)
    got = engine.generate(prompt, decoder="cold", alpha=0.2, num_beams=3, max_new_tokens=NEW)[0]
    assert got.token_ids and got.finish_reason in ("stop", "length")
    with torch.no_grad():
        logits = lora[1](input_ids=torch.tensor([prompt_ids + got.token_ids])).logits[0]
    for step, token in enumerate(got.token_ids):
        expert = logits[len(prompt_ids) - 1 + step]
        assert expert[token] >= math.log(0.2) + expert.max() - 1e-4


def test_max_new_tokens_gives_length_and_exact_count(engine):
    got = engine.generate(PROMPTS[3], decoder="base", max_new_tokens=5)[0]
    assert got.finish_reason == "length" and len(got.token_ids) == 5


def test_stop_strings_end_the_text(engine):
    full = engine.generate(PROMPTS[0], decoder="base", max_new_tokens=NEW)[0]
    words = full.text.split()
    assert len(words) >= 3
    stop = " " + words[2]
    got = engine.generate(PROMPTS[0], decoder="base", max_new_tokens=NEW, stop=[stop, "never-appears"])[0]
    assert got.finish_reason == "stop"
    assert stop not in got.text and full.text.startswith(got.text)
    assert len(got.token_ids) < len(full.token_ids)


def test_eos_ends_a_chat_answer_with_stop(smollm2):
    engine = Engine(smollm2)
    got = engine.generate("What is the capital of France?", decoder="base", chat=True, max_new_tokens=40)[0]
    assert got.finish_reason == "stop" and got.token_ids[-1] in engine.eos_ids
    assert "Paris" in got.text
    # ignore_eos decodes past EOS to max_new_tokens (greedy or beam); the first tokens are the same
    for beams in (1, 2):
        longer = engine.generate("What is the capital of France?", decoder="base", chat=True, max_new_tokens=len(got.token_ids) + 3,
                                 ignore_eos=True, num_beams=beams)[0]
        assert longer.finish_reason == "length" and len(longer.token_ids) == len(got.token_ids) + 3
        if beams == 1:
            assert longer.token_ids[: len(got.token_ids)] == got.token_ids


def test_streaming_yields_the_same_text_and_ids(engine):
    generated = engine.generate(PROMPTS[:2], decoder="cold", max_new_tokens=NEW, stop=["."])
    texts, ids, reasons = ["", ""], [[], []], [None, None]
    for event in engine.stream(PROMPTS[:2], decoder="cold", max_new_tokens=NEW, stop=["."]):
        assert reasons[event.index] is None, "no events after a prompt finished"
        texts[event.index] += event.text
        ids[event.index] += event.token_ids
        reasons[event.index] = event.finish_reason
    assert texts == [g.text for g in generated]
    assert ids == [g.token_ids for g in generated]
    assert reasons == [g.finish_reason for g in generated]


def test_amateur_can_be_the_adapter_at_a_lower_scale(engine):
    """amateur_scale=1 with beta makes score == expert logits: output equals expert greedy."""
    same = engine.generate(PROMPTS[0], decoder="cold", amateur_scale=1.0, beta=0.7, max_new_tokens=NEW)[0]
    expert = engine.generate(PROMPTS[0], decoder="expert", max_new_tokens=NEW)[0]
    assert same.token_ids == expert.token_ids


def test_sequences_joining_and_leaving_a_running_batch_decode_as_alone(engine):
    """Continuous batching: rows that join mid-run, or leave early, do not change anyone's tokens."""
    from cold.decoding.running import RunningBatch
    from cold.params import DecodeParams

    plan = [(PROMPTS[0], "cold"), (PROMPTS[1], "expert"), (PROMPTS[2], "cold"), (PROMPTS[3], "base")]
    requests = [engine.make_request(p, DecodeParams(decoder=d, max_new_tokens=NEW)) for p, d in plan]
    batch = RunningBatch(engine.runner)
    ids = {k: [] for k in range(4)}
    batch.join(requests[:2], [0, 1])
    for _ in range(3):
        for key, event in batch.step():
            ids[key] += event.token_ids
    batch.join(requests[2:], [2, 3])
    for key, event in batch.step():
        ids[key] += event.token_ids
    batch.drop([1])  # a client that went away
    assert sorted(batch.keys) == [0, 2, 3]
    while batch:
        for key, event in batch.step():
            assert key != 1
            ids[key] += event.token_ids
    assert len(ids[1]) == 4
    for key, (prompt, decoder) in enumerate(plan):
        alone = engine.generate(prompt, decoder=decoder, max_new_tokens=NEW)[0].token_ids
        assert ids[key] == (alone[:4] if key == 1 else alone), (prompt, decoder)


def test_late_joiners_decode_as_alone(engine):
    from cold.decoding.running import RunningBatch
    from cold.params import DecodeParams

    requests = [engine.make_request(p, DecodeParams(decoder="cold", max_new_tokens=NEW)) for p in PROMPTS]
    batch = RunningBatch(engine.runner)
    ids = {k: [] for k in range(len(PROMPTS))}
    batch.join(requests[:1], [0])
    for step in range(NEW):
        if step == 2:
            batch.join(requests[1:3], [1, 2])
        if step == 5:
            batch.join(requests[3:], [3])
        for key, event in batch.step():
            ids[key] += event.token_ids
    while batch:
        for key, event in batch.step():
            ids[key] += event.token_ids
    for key, prompt in enumerate(PROMPTS):
        assert ids[key] == engine.generate(prompt, decoder="cold", max_new_tokens=NEW)[0].token_ids, prompt


@pytest.mark.parametrize("decoder,score", [("expert", "expert"), ("cold", "expert"), ("cold", "cold")])
def test_logprobs_of_generated_tokens_equal_scoring_the_text(engine, decoder, score):
    """Each generated token's reported log-probability equals what `Engine.logprobs` gives it when
    the prompt and the generation are scored as one text (the expert's, or CoLD's by its rule),
    for a batch of prompts; greedy picks the best alternative wherever it decodes from that score."""
    gens = engine.generate(PROMPTS, decoder=decoder, max_new_tokens=NEW, logprobs=3, logprob_score=score, ignore_eos=True)
    for prompt, gen in zip(PROMPTS, gens):
        assert [e.token_id for e in gen.logprobs] == gen.token_ids
        scored = engine.logprobs([ids_of(engine, prompt) + gen.token_ids], decoder=score)[0]
        assert [e.logprob for e in gen.logprobs] == pytest.approx(scored.token_logprobs[-NEW:], abs=1e-4)
        for e in gen.logprobs:
            assert len(e.top) == 3 and [v for _, v in e.top] == sorted((v for _, v in e.top), reverse=True)
            if decoder == score:
                assert e.top[0] == (e.token_id, pytest.approx(e.logprob))
    sampled = engine.generate(PROMPTS[0], decoder=decoder, max_new_tokens=NEW, logprobs=0, logprob_score=score,
                              do_sample=True, temperature=3.0, seed=1)[0]
    scored = engine.logprobs([ids_of(engine, PROMPTS[0]) + sampled.token_ids], decoder=score)[0]  # before temperature
    assert [e.logprob for e in sampled.logprobs] == pytest.approx(scored.token_logprobs[-len(sampled.token_ids):], abs=1e-4)
    assert engine.generate(PROMPTS[0], max_new_tokens=2)[0].logprobs is None


def test_an_adaptive_beta_schedule_decodes_and_scores_by_one_rule(engine):
    """With beta_schedule=jsd, the CoLD log-probabilities reported with each generated token equal
    what `Engine.logprobs` gives the text under the same schedule; greedy takes their best token."""
    kwargs = dict(decoder="cold", alpha=0.05, beta=8.0, beta_schedule="jsd")
    gens = engine.generate(PROMPTS, max_new_tokens=NEW, logprobs=2, logprob_score="cold", ignore_eos=True, **kwargs)
    for prompt, gen in zip(PROMPTS, gens):
        scored = engine.logprobs([ids_of(engine, prompt) + gen.token_ids], **kwargs)[0]
        assert [e.logprob for e in gen.logprobs] == pytest.approx(scored.token_logprobs[-NEW:], abs=1e-4)
        assert all(e.top[0][0] == e.token_id for e in gen.logprobs)
    constant = engine.generate(PROMPTS, max_new_tokens=NEW, decoder="cold", beta_schedule="constant")
    assert [g.token_ids for g in constant] == [g.token_ids for g in engine.generate(PROMPTS, max_new_tokens=NEW)]


@pytest.mark.parametrize("forms", [("logit", "logit"), ("logit", "logprob")])
@pytest.mark.parametrize("schedules", [("constant", "constant"), ("entropy", "jsd"), ("jsd", "entropy")])
def test_scores_of_a_mixed_batch_equal_the_full_vocabulary_definition(engine, forms, schedules):
    """Logit-form CoLD computes the amateur (and the score) on the plausible columns only; every
    entry must still equal the score rule applied to both rows' full logits, with each sequence's
    beta scaled by its schedule's weight from those full logits. (A mask that holds one token
    scores it without the amateur, whose logits cannot change the choice: only which entry is
    finite is checked there. The amateurs that are needed were caught up by `scores`.)"""
    from cold.params import DecodeParams
    from cold.sampling import scoring
    from cold.sampling.sampler import Sampler
    from conftest import prefill

    settings = [("cold", 0.1, 0.5, "logit", "constant"), ("expert", 0.1, 0.5, "logit", "constant"),
                ("cold", 0.01, 4.0, forms[0], schedules[0]), ("base", 0.1, 0.5, "logit", "constant"),
                ("cold", 0.3, 8.0, forms[1], schedules[1])]
    requests = [engine.make_request(PROMPTS[i % len(PROMPTS)], DecodeParams(decoder=d, alpha=a, beta=b, scoring=f, beta_schedule=sch))
                for i, (d, a, b, f, sch) in enumerate(settings)]
    with torch.inference_mode():
        layout, state = prefill(engine, requests)
        got = engine.runner.scores(state, Sampler.build([r.params for r in requests], engine.device),
                                   engine.runner.expert_logits(state))
        full = engine.runner.logits(state.hidden, layout)  # [R, V] every row's full logits
    for s, (decoder, alpha, beta, form, schedule) in enumerate(settings):
        expert = full[layout.expert_row[s]][None]
        if decoder != "cold":
            torch.testing.assert_close(got[s], expert[0], rtol=1e-5, atol=1e-4)  # plain logits
            continue
        amateur = full[layout.amateur_row[s]][None]
        beta = {"constant": 1.0, "entropy": float(scoring.entropy_weight(expert)),
                "jsd": float(scoring.jsd_weight(expert, amateur))}[schedule] * beta
        expected = scoring.contrastive_scores(expert, amateur, torch.tensor([alpha]), torch.tensor([beta]), form)[0]
        assert torch.equal(torch.isinf(got[s]), torch.isinf(expected)), (alpha, beta, form)
        if int(torch.isfinite(expected).sum()) > 1:
            torch.testing.assert_close(got[s], expected, rtol=1e-5, atol=1e-4)
