"""`cold serve`: a real uvicorn server on a free local port, driven by the official openai client."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from typer.testing import CliRunner

from cold.cli import app as cli_app
from cold.cli.serve import _model_id
from cold.decoding.engine import Engine
from cold.load.adapters import read_adapter
from cold.load.models import load_base
from cold.lora.layer import uninstall_adapters
from cold.params import DecodeParams
from cold.serve.app import ServerConfig, create_app
from conftest import ServerThread, make_lora

KEY = "test-key"
PROMPT = "The quick brown fox"


# ---- a tiny random model with two random adapters, API key required ---------------------------


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    paths = []
    for name, seed in [("lora-a", 1), ("lora-b", 2)]:
        path = tmp_path_factory.mktemp(name)
        make_lora(tiny.model, path, r=4, alpha=8, seed=seed, std=0.1)
        paths.append(read_adapter(path, name))
    yield Engine(tiny, paths)
    uninstall_adapters(tiny.model)  # leave the shared model as other modules expect it


@pytest.fixture(scope="module")
def server(engine):
    config = ServerConfig(model_name="tiny", api_key=KEY, max_batch=8, max_queue=64, default_max_tokens=16,
                          max_prompt_tokens=64, max_body_bytes=20_000, max_n=4)
    running = ServerThread(create_app(engine, config), key=KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def offline(engine, prompt, chat=False, **params):
    """The engine's own answer, decoded alone (the server is idle between tests)."""
    return engine.generate([prompt], DecodeParams(**params), chat=chat)[0]


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["tiny", "lora-a", "lora-b"]
    health = server.health()
    assert health["status"] == "ok" and health["adapters"] == ["lora-a", "lora-b"]
    client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("cold_requests_total", "cold_prompt_tokens_total", "cold_completion_tokens_total",
                 "cold_queue_length", "cold_running_sequences", "cold_step_seconds_bucket",
                 "cold_request_seconds_count", "cold_time_to_first_token_seconds_count"):
        assert name in text, name
    assert 'cold_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert server.metric("cold_completion_tokens_total") >= 3


def test_completion_equals_offline_engine(engine, client):
    got = client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=10)
    want = offline(engine, PROMPT, adapter="lora-a", max_new_tokens=10)
    assert got.object == "text_completion" and got.model == "lora-a"
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == 10 and got.usage.total_tokens == want.prompt_tokens + 10


def test_completion_with_token_ids_batch_and_echo(engine, client):
    ids = engine.tokenizer(PROMPT).input_ids
    got = client.completions.create(model="lora-b", prompt=[ids, "Hello"], max_tokens=6, echo=True)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].text == PROMPT + offline(engine, ids, adapter="lora-b", max_new_tokens=6).text
    assert got.choices[1].text == "Hello" + offline(engine, "Hello", adapter="lora-b", max_new_tokens=6).text
    streamed = ["", ""]
    for chunk in client.completions.create(model="lora-b", prompt=[ids, "Hello"], max_tokens=6, echo=True, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [c.text for c in got.choices]


def test_chat_applies_the_template(engine, client):
    got = client.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": "Hi there"}], max_tokens=8)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == offline(engine, "Hi there", chat=True, adapter="lora-a", max_new_tokens=8).text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sum 2 and 3"}]
    text = engine.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "Hi"}
                                                 for m in messages], add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    got = client.chat.completions.create(model="lora-a", messages=messages, max_completion_tokens=8)
    assert got.choices[0].message.content == offline(engine, ids, adapter="lora-a", max_new_tokens=8).text
    assert got.usage.prompt_tokens == len(ids)


def test_streaming_completion_and_chat(engine, server, client):
    whole = client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=12).choices[0].text
    chunks = list(client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model="lora-b", messages=messages, max_tokens=10).choices[0].message.content
    stream = client.chat.completions.create(model="lora-b", messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    # the raw wire format: server-sent events ending with [DONE]
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("score", [None, "cold"])
def test_logprobs_of_generated_tokens(engine, client, score):
    """Both endpoints, streamed or not, report each generated token's log-probability (the expert's,
    or CoLD's with `score: "cold"`) and its best alternatives, as the engine does."""
    extra = {"score": score} if score else {}
    want = offline(engine, PROMPT, adapter="lora-a", max_new_tokens=6, logprobs=2, logprob_score=score or "expert",
                   ignore_eos=True).logprobs
    pieces = [engine.tokenizer.decode([e.token_id]) for e in want]

    got = client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=6, logprobs=2, extra_body=extra)
    lp = got.choices[0].logprobs
    assert lp.tokens == pieces and lp.token_logprobs == pytest.approx([e.logprob for e in want], abs=1e-4)
    assert lp.text_offset == [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    for top, entry, piece in zip(lp.top_logprobs, want, pieces):
        assert top == pytest.approx({**{engine.tokenizer.decode([t]): v for t, v in entry.top}, piece: entry.logprob}, abs=1e-4)
    chunks = list(client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=6, logprobs=2, stream=True, extra_body=extra))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((c.tokens for c in streamed), []) == pieces
    assert sum((c.text_offset for c in streamed), []) == lp.text_offset

    messages = [{"role": "user", "content": PROMPT}]
    want = offline(engine, PROMPT, chat=True, adapter="lora-a", max_new_tokens=6, logprobs=3,
                   logprob_score=score or "expert", ignore_eos=True).logprobs
    got = client.chat.completions.create(model="lora-a", messages=messages, max_tokens=6, logprobs=True, top_logprobs=3,
                                         extra_body=extra)
    content = got.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in want], abs=1e-4)
    assert [[t.token for t in c.top_logprobs] for c in content] == [[engine.tokenizer.decode([t]) for t, _ in e.top] for e in want]
    assert all(bytes(c.bytes).decode("utf-8") == c.token for c in content)
    chunks = client.chat.completions.create(model="lora-a", messages=messages, max_tokens=6, logprobs=True, stream=True,
                                            extra_body=extra)
    streamed = sum((c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs), [])
    assert [c.token for c in streamed] == [c.token for c in content] and all(c.top_logprobs == [] for c in streamed)
    assert client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=2).choices[0].logprobs is None


def test_stop_strings(engine, client):
    full = offline(engine, PROMPT, adapter="lora-a", max_new_tokens=16).text
    middle = len(full) // 2
    stop = full[middle : middle + 2]
    expected = full[: full.find(stop)]
    got = client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=16, stop=[stop, "never-there"])
    assert got.choices[0].text == expected
    assert got.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_model_id_selects_the_adapter(engine, client):
    answers = {}
    for model, adapter, decoder in [("lora-a", "lora-a", "cold"), ("lora-b", "lora-b", "cold"),
                                    ("tiny", None, "base"), ("base", None, "base")]:
        got = client.completions.create(model=model, prompt=PROMPT, max_tokens=8).choices[0].text
        assert got == offline(engine, PROMPT, decoder=decoder, adapter=adapter, max_new_tokens=8).text, model
        answers[model] = got
    assert len({answers["lora-a"], answers["lora-b"], answers["tiny"]}) == 3
    assert answers["tiny"] == answers["base"]


@pytest.mark.parametrize("extra", [
    {"decoder": "expert"},
    {"decoder": "base"},
    {"alpha": 0.5, "beta": 2.0},
    {"beta": 1.0, "scoring": "logprob"},
    {"decoder": "cold", "alpha": 0.05, "beta": 0.25, "expert_scale": 0.5},
    {"amateur": "lora-a", "beta": 1.0},
    {"amateur_scale": 0.5, "beta": 2.0},
])
def test_cold_fields_in_extra_body(engine, client, extra):
    got = client.completions.create(model="lora-b", prompt=PROMPT, max_tokens=8, extra_body=extra)
    params = dict(extra)
    if "amateur" in params or "amateur_scale" in params:
        params = {"beta": params["beta"], "amateur_adapter": params.get("amateur"), "amateur_scale": params.get("amateur_scale", 1.0)}
    assert got.choices[0].text == offline(engine, PROMPT, adapter="lora-b", max_new_tokens=8, **params).text


def test_beta_zero_is_expert_and_cold_differs(client):
    ask = lambda **extra: client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=10,  # noqa: E731
                                                    extra_body=extra).choices[0].text
    assert ask(beta=0.0) == ask(decoder="expert")
    assert ask(beta=3.0) != ask(decoder="expert")


def test_sampling_is_seeded_and_n_gives_choices(engine, client):
    ask = lambda **kw: client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=8, temperature=0.9,  # noqa: E731
                                                 top_p=0.95, extra_body={"top_k": 50}, **kw)
    first, again = ask(seed=5), ask(seed=5)
    assert first.choices[0].text == again.choices[0].text
    want = offline(engine, PROMPT, adapter="lora-a", max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.95,
                   top_k=50, seed=5)
    assert first.choices[0].text == want.text
    three = ask(seed=5, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].text == want.text  # choice j samples with seed + j
    assert three.usage.completion_tokens == 24
    greedy = client.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": "x"}], max_tokens=4, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


# ---- errors ---------------------------------------------------------------------------------


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the client unwraps {"error": {...}}
    assert body["message"]
    return info.value


@pytest.mark.parametrize("fields, needle", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": 0.5, "top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n must be"),
    ({"n": 5}, "n must be"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": 21}, "logprobs must be in [0, 20]"),
    ({"extra_body": {"score": "cold"}}, "score chooses whose log-probabilities are reported: it needs logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"extra_body": {"alpha": 0}}, "alpha"),
    ({"extra_body": {"alpha": 1.5}}, "alpha"),
    ({"extra_body": {"beta": -1}}, "beta"),
    ({"extra_body": {"beta": 1e6}}, "beta"),
    ({"extra_body": {"expert_scale": 1e9}}, "expert_scale"),
    ({"extra_body": {"amateur": "lora-z"}}, "amateur 'lora-z' is not an adapter on this server; adapters: lora-a, lora-b"),
    ({"extra_body": {"amateur": "lora-b", "decoder": "expert"}}, "amateur applies to the cold decoder only"),
    ({"extra_body": {"amateur_scale": 1e9}}, "amateur_scale must be in"),
    ({"temperature": 500.0}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"extra_body": {"prompt": [[10**9]]}}, "outside the vocabulary"),
    ({"extra_body": {"prompt": {"text": "x"}}}, "prompt: expected a string"),
    ({"extra_body": {"stop": 5}}, "stop: expected a string"),
    ({"n": 4, "extra_body": {"prompt": ["a"] * 20}}, "more sequences than this server queues"),
    ({"extra_body": {"decoder": "bogus"}}, "decoder"),
    ({"extra_body": {"alpah": 0.2}}, "unrecognized request argument: alpah"),
    ({"extra_body": {"max_tokens": "ten"}}, "max_tokens"),
    ({"extra_body": {"top_k": -3}, "temperature": 1.0}, "top_k"),
])
def test_bad_parameters_are_400(client, fields, needle):
    extra = fields.pop("extra_body", {})
    err = error_of(lambda: client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=fields.pop("max_tokens", 4),
                                                     extra_body=extra, **fields))
    assert err.status_code == 400 and needle in err.message, err.message
    assert err.body["type"] == "invalid_request_error"


def test_bad_chat_requests_are_400(client):
    for messages, needle in [([], "at least one"), ([{"role": "tool", "content": "x"}], "role"),
                             ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text")]:
        err = error_of(lambda: client.chat.completions.create(model="lora-a", messages=messages, max_tokens=4))
        assert err.status_code == 400 and needle in err.message, err.message
    err = error_of(lambda: client.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": "x"}],
                                                          tools=[{"type": "function", "function": {"name": "f"}}]))
    assert err.status_code == 400 and "tools" in err.message


def test_cold_on_the_base_id_needs_one_adapter(client):
    err = error_of(lambda: client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, extra_body={"decoder": "cold"}))
    assert err.status_code == 400 and "several adapters" in err.message


def test_malformed_json_and_non_objects_are_400(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw, needle in [(b'{"model": "tiny", "prompt": ', "malformed JSON"), (b"[1, 2]", "JSON object"),
                        (b"", "empty"), (b'{"prompt": "x"}', "missing required argument: model")]:
        response = httpx.post(server.url + "/v1/completions", content=raw, headers=auth)
        assert response.status_code == 400, raw
        assert needle in response.json()["error"]["message"]


def test_api_key_is_required(server):
    for key in (None, "wrong"):
        anonymous = server.client(key=key)
        err = error_of(lambda: anonymous.completions.create(model="tiny", prompt=PROMPT, max_tokens=2))
        assert err.status_code == 401 and err.body["type"] == "authentication_error"
        assert error_of(lambda: anonymous.models.list()).status_code == 401
    assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def test_unknown_model_and_route_are_404(server, client):
    err = error_of(lambda: client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2))
    assert err.status_code == 404 and err.body["code"] == "model_not_found" and "lora-a" in err.message
    response = httpx.get(server.url + "/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()


def test_prompts_too_long(engine, server, client):
    long_prompt = " ".join(["word"] * 70)  # > max_prompt_tokens (64), < context (96)
    assert 64 < len(engine.tokenizer(long_prompt).input_ids) < 96
    err = error_of(lambda: client.completions.create(model="tiny", prompt=long_prompt, max_tokens=2))
    assert err.status_code == 413 and err.body["code"] == "prompt_too_long"
    fits = " ".join(["word"] * 50)
    err = error_of(lambda: client.completions.create(model="tiny", prompt=fits, max_tokens=60))
    assert err.status_code == 400 and err.body["code"] == "context_length_exceeded"
    assert client.completions.create(model="tiny", prompt=fits).usage.completion_tokens == 16  # default max_tokens
    response = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "prompt": "x" * 30_000})
    assert response.status_code == 413 and "bytes" in response.json()["error"]["message"]


# ---- a second server: no adapters, one sequence at a time, a one-place queue ----------------------


@pytest.fixture(scope="module")
def small(tiny_dir):
    engine = Engine(load_base(str(tiny_dir)))  # its own copy of the tiny model: no adapters
    config = ServerConfig(model_name="plain", max_batch=1, max_queue=1, default_max_tokens=8)
    running = ServerThread(create_app(engine, config))
    running.engine = engine
    yield running
    running.stop()


@pytest.fixture
def slow_steps(small):
    """Every forward pass of the small server's engine waits `delay` seconds, or for `gate` when closed."""
    original = small.engine.runner.forward
    control = {"delay": 0.0, "gate": threading.Event(), "entered": threading.Event()}
    control["gate"].set()

    def forward(*args, **kwargs):
        control["entered"].set()
        control["gate"].wait(30)
        time.sleep(control["delay"])
        return original(*args, **kwargs)

    small.engine.runner.forward = forward
    yield control
    control["gate"].set()
    del small.engine.runner.forward


def test_no_adapter_means_cold_is_a_clear_400(small):
    client = small.client(key=None)
    assert [m.id for m in client.models.list()] == ["plain"]
    assert client.completions.create(model="plain", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    err = error_of(lambda: client.completions.create(model="plain", prompt=PROMPT, max_tokens=3, extra_body={"decoder": "cold"}))
    assert err.status_code == 400 and "needs a LoRA adapter and none is loaded" in err.message


def test_queue_full_is_503(small, slow_steps):
    client = small.client(key=None)
    slow_steps["gate"].clear()
    slow_steps["entered"].clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.completions.create, model="plain", prompt=PROMPT, max_tokens=3)
        assert slow_steps["entered"].wait(10)  # the first request is prefilling; the queue is empty
        second = pool.submit(client.completions.create, model="plain", prompt=PROMPT, max_tokens=3)
        deadline = time.monotonic() + 10
        while small.health()["queued"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert small.metric("cold_queue_length") == 1
        err = error_of(lambda: client.completions.create(model="plain", prompt=PROMPT, max_tokens=3))
        assert err.status_code == 503 and err.body["code"] == "queue_full"
        assert err.response.headers["retry-after"] == "1"
        slow_steps["gate"].set()
        assert first.result().choices[0].text == second.result().choices[0].text


def test_client_disconnect_frees_its_rows(small, slow_steps):
    slow_steps["delay"] = 0.03  # 60 tokens would take about two seconds
    client = small.client(key=None)
    cancelled, tokens = small.metric("cold_cancelled_sequences_total"), small.metric("cold_completion_tokens_total")
    stream = client.completions.create(model="plain", prompt=PROMPT, max_tokens=60, stream=True)
    for _, chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 5
    while small.metric("cold_cancelled_sequences_total") < cancelled + 1:
        assert time.monotonic() < deadline, "the stream's sequence was not dropped"
        time.sleep(0.02)
    assert small.health()["running"] == 0
    assert small.metric("cold_completion_tokens_total") - tokens < 60

    # a non-streaming client that gives up is dropped too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(small.url + "/v1/completions", json={"model": "plain", "prompt": PROMPT, "max_tokens": 60}, timeout=0.3)
    deadline = time.monotonic() + 5
    while small.metric("cold_cancelled_sequences_total") < cancelled + 2:
        assert time.monotonic() < deadline, "the abandoned request's sequence was not dropped"
        time.sleep(0.02)
    slow_steps["delay"] = 0.0
    assert small.client(key=None).completions.create(model="plain", prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_engine_failure_is_500_and_the_server_keeps_serving(small):
    client = small.client(key=None)
    original = small.engine.runner.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device failure")
        return original(*args, **kwargs)

    small.engine.runner.forward = flaky
    try:
        err = error_of(lambda: client.completions.create(model="plain", prompt=PROMPT, max_tokens=5))
        assert err.status_code == 500 and "simulated device failure" in err.message
    finally:
        del small.engine.runner.forward
    assert small.health()["status"] == "ok"
    assert client.completions.create(model="plain", prompt=PROMPT, max_tokens=5).usage.completion_tokens == 5


# ---- the real default model: concurrent greedy requests equal the offline engine ------------------


def test_concurrent_greedy_requests_equal_offline_answers(smollm2, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2-lora")
    make_lora(smollm2.model, path, r=8, alpha=16, std=0.03, seed=7)
    engine = Engine(smollm2, [read_adapter(path, "rand")])
    questions = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "2 + 2 =",
                 "Natalia sold clips to 48 of her friends in April.", "The sun is", "Water boils at",
                 "My favourite colour is"]
    cases = []  # (endpoint, model id, prompt, extra fields, offline params)
    for i, q in enumerate(questions):
        cases.append(("completions", "rand", q, {}, dict(adapter="rand")))
        decoder = ["expert", "base"][i % 2]
        cases.append(("chat", "rand", q, {"decoder": decoder, "beta": 1.0}, dict(adapter="rand", decoder=decoder, beta=1.0)))
    new = 10
    expected = [offline(engine, q, chat=(kind == "chat"), max_new_tokens=new, **params).text
                for kind, _, q, _, params in cases]

    running = ServerThread(create_app(engine, ServerConfig(model_name="smollm2", max_batch=16)))
    try:
        client = running.client()

        def ask(case):
            kind, model, q, extra, _ = case
            if kind == "chat":
                return client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                      max_tokens=new, extra_body=extra).choices[0].message.content
            return client.completions.create(model=model, prompt=q, max_tokens=new, extra_body=extra).choices[0].text

        with ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(ask, cases))
        assert len(cases) == 16
        assert got == expected
        single = running.metric('cold_step_sequences_bucket{le="1.0"}')
        assert running.metric("cold_step_sequences_count") > single  # the requests shared decode steps
    finally:
        running.stop()
        uninstall_adapters(smollm2.model)


# ---- the command line ---------------------------------------------------------------------------


def test_serve_command_is_registered_and_checks_its_options():
    runner = CliRunner()
    assert "OpenAI-compatible" in runner.invoke(cli_app, ["serve", "--help"]).output
    result = runner.invoke(cli_app, ["serve", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch must be >= 1" in result.output
    assert _model_id("smollm2") == "smollm2"
    assert _model_id("/models/Foo-1B/") == "Foo-1B"
    assert _model_id("weights/bar.Q4.gguf") == "bar.Q4"
