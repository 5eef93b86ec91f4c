"""lm-evaluation-harness with the model `cold` (cold.lm_eval), on tiny YAML tasks written here.

The oracle is lm-eval's own `hf` model with `peft=`: `decoder=expert` must give the same metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local files; nothing is fetched (set before datasets loads)
lm_eval = pytest.importorskip("lm_eval", reason="the [lm-eval] extra is not installed")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from cold.decoding.engine import Engine  # noqa: E402
from cold.errors import ColdError  # noqa: E402
from cold.lm_eval import ColdLM  # noqa: E402
from conftest import make_lora  # noqa: E402

QUESTIONS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a cat have?", ["two", "four", "six"], 1),
    ("What do bees make?", ["milk", "silk", "honey"], 2),
    ("Which is a fruit?", ["apple", "carrot", "onion"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand"], 1),
    ("Which animal barks?", ["dog", "fish", "bird"], 0),
    ("Where do fish live?", ["trees", "water", "clouds"], 1),
    ("What is the opposite of hot?", ["cold", "loud", "tall"], 0),
]

TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/questions.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/questions.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/questions.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
""",
}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm-eval-tasks")
    with (path / "questions.jsonl").open("w") as handle:
        for question, choices, answer in QUESTIONS:
            handle.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    for name, text in TASKS.items():
        (path / f"{name}.yaml").write_text(text.format(dir=path))
    return path


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm-eval-lora")
    make_lora(tiny.model, path, r=4, alpha=8, seed=3)
    return path


def _metrics(results: dict) -> dict[str, float]:
    return {f"{task}/{key.split(',')[0]}": value for task, scores in results["results"].items()
            for key, value in scores.items() if "," in key and "stderr" not in key}


def _evaluate(model, tasks_dir, tasks=("tiny_mc", "tiny_gen", "tiny_ppl"), **kwargs) -> dict[str, float]:
    results = simple_evaluate(model=model, tasks=list(tasks), task_manager=TaskManager(include_path=str(tasks_dir)),
                              batch_size=4, log_samples=False, **kwargs)
    return _metrics(results)


def test_the_expert_through_lm_eval_equals_lm_evals_hf_model_with_peft(tiny_dir, lora, tasks_dir):
    ours = _evaluate(ColdLM(model=str(tiny_dir), adapter=str(lora), decoder="expert"), tasks_dir)
    theirs = _evaluate("hf", tasks_dir, model_args=f"pretrained={tiny_dir},peft={lora},dtype=float32,device=cpu")
    assert set(ours) == set(theirs) and {"tiny_mc/acc", "tiny_gen/exact_match", "tiny_ppl/word_perplexity"} <= set(ours)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=1e-4), name


def test_cold_generation_through_lm_eval_is_the_engines(tiny_dir, lora, tasks_dir):
    model = ColdLM(model=str(tiny_dir), adapter=str(lora), decoder="cold", alpha=0.1, beta=1.0)
    results = simple_evaluate(model=model, tasks=["tiny_gen"], task_manager=TaskManager(include_path=str(tasks_dir)),
                              log_samples=True)
    samples = results["samples"]["tiny_gen"]
    engine = Engine.load(str(tiny_dir), {"expert": str(lora)})
    contexts = [s["arguments"][0][0] for s in samples]
    expected = engine.generate(contexts, decoder="cold", alpha=0.1, beta=1.0, max_new_tokens=6, stop=("\n", "."))
    assert [s["resps"][0][0] for s in samples] == [g.text for g in expected]


def test_cold_scores_with_a_mask_that_keeps_everything_and_no_contrast_are_the_experts(tiny_dir, lora, tasks_dir):
    expert = _evaluate(ColdLM(model=str(tiny_dir), adapter=str(lora), decoder="expert"), tasks_dir, tasks=("tiny_mc", "tiny_ppl"))
    cold = _evaluate(ColdLM(model=str(tiny_dir), adapter=str(lora), score="cold", alpha=1e-30, beta=0.0), tasks_dir,
                     tasks=("tiny_mc", "tiny_ppl"))
    for name, value in expert.items():
        assert cold[name] == pytest.approx(value, rel=1e-4), name
    contrasted = _evaluate(ColdLM(model=str(tiny_dir), adapter=str(lora), score="cold", alpha=0.1, beta=1.0), tasks_dir,
                           tasks=("tiny_ppl",))
    assert contrasted["tiny_ppl/word_perplexity"] != pytest.approx(expert["tiny_ppl/word_perplexity"], rel=1e-3)


@pytest.mark.parametrize("args,message", [
    (dict(adapter=None, decoder="cold"), "needs adapter=DIR"),
    (dict(score="best"), "score must be one of"),
    (dict(decoder="greedy"), "decoder must be one of"),
    (dict(beta=-1), "beta must be"),
    (dict(penalty=float("inf")), "penalty"),
    (dict(temperature=0.5), "unknown model_args for --model cold: temperature"),
])
def test_bad_model_args(tiny_dir, lora, args, message):
    with pytest.raises(ColdError, match=message):
        ColdLM(**{"model": str(tiny_dir), "adapter": str(lora), **args})


def test_the_command_line(tiny_dir, lora, tasks_dir, tmp_path):
    common = [sys.executable, "-m", "cold.lm_eval", "--model", "cold", "--tasks", "tiny_mc",
              "--include_path", str(tasks_dir), "--limit", "4"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([*common, "--model_args", f"model={tiny_dir},adapter={lora},decoder=expert"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny_mc" in done.stdout and "acc" in done.stdout
    bad = subprocess.run([*common, "--model_args", f"model={tiny_dir},adapter={lora},colour=blue"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("error: unknown model_args for --model cold: colour; known: model, "
                                                   "adapter, decoder, alpha, beta, scoring, beta_schedule, expert_scale, amateur_adapter, "
                                                   "amateur_scale, score, penalty, dtype, device, batch_size, max_length")


# ---- lm-eval's local-completions against `cold serve` -------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_dir, lora):
    from cold.serve.app import ServerConfig, create_app
    from conftest import ServerThread

    engine = Engine.load(str(tiny_dir), {"lora": str(lora)})
    aliases = {"lora-cold": ("lora", {"decoder": "cold", "alpha": 0.1, "beta": 1.0, "score": "cold"})}
    server = ServerThread(create_app(engine, ServerConfig(model_name="tiny", aliases=aliases)))
    server.engine = engine
    yield server
    server.stop()


def test_a_scored_prompt_is_the_engines_log_probabilities(served):
    import httpx

    ids = served.engine.encode("Question: Which animal barks?\nAnswer: dog")[1]
    for score, decoder in (("expert", "expert"), ("cold", "cold")):
        body = {"model": "lora", "prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0,
                "score": score}
        choice = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        expected = served.engine.logprobs([ids], decoder=decoder, top=2)[0]
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][: len(ids)] == pytest.approx(expected.token_logprobs, abs=1e-6)
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        next_id, next_lp = expected.top_logprobs[-1][0]
        assert logprobs["token_logprobs"][-1] == pytest.approx(next_lp, abs=1e-6) and len(logprobs["tokens"]) == len(ids) + 1
        assert choice["text"] == served.engine.tokenizer.decode([*ids, next_id])
        assert logprobs["text_offset"][1] == len(logprobs["tokens"][0]) and len(logprobs["top_logprobs"][1]) >= 2
    only_prompt = httpx.post(served.url + "/v1/completions", timeout=60,
                             json={"model": "lora", "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}).json()
    assert len(only_prompt["choices"][0]["logprobs"]["tokens"]) == len(ids) and only_prompt["usage"]["completion_tokens"] == 0


def test_the_tokenizer_endpoints(served):
    import httpx

    tokenizer = served.engine.tokenizer
    tokens = httpx.post(served.url + "/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()
    assert tokens["tokens"] == tokenizer("Hello there", add_special_tokens=False).input_ids and tokens["count"] == len(tokens["tokens"])
    assert httpx.post(served.url + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello there"}
    chat = httpx.post(served.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    assert chat == tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                           add_generation_prompt=True), add_special_tokens=False).input_ids
    info = httpx.get(served.url + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template


def test_local_completions_against_the_server_gives_the_cold_models_numbers(tiny_dir, lora, tasks_dir, served):
    """lm-eval's own API client, remote tokenizer and all: the same metrics as --model cold with the server's
    defaults for an adapter's id (generation: CoLD alpha 0.1 beta 0.5; log-likelihoods: the expert's)."""
    over_http = _evaluate("local-completions", tasks_dir, tasks=("tiny_mc", "tiny_gen"),
                          model_args=f"model=lora,base_url={served.url}/v1/completions,tokenizer_backend=remote,"
                                     "num_concurrent=1,max_retries=1")
    direct = _evaluate(ColdLM(model=str(tiny_dir), adapter=str(lora), decoder="cold", alpha=0.1, beta=0.5), tasks_dir,
                       tasks=("tiny_mc", "tiny_gen"))
    assert over_http == pytest.approx(direct, rel=1e-6) and set(over_http) >= {"tiny_mc/acc", "tiny_gen/exact_match"}
    # an alias carries settings that lm-eval's requests cannot: CoLD scores as well as CoLD decoding
    aliased = _evaluate("local-completions", tasks_dir, tasks=("tiny_mc", "tiny_gen"),
                        model_args=f"model=lora-cold,base_url={served.url}/v1/completions,tokenizer_backend=remote,"
                                   "num_concurrent=1,max_retries=1")
    cold = _evaluate(ColdLM(model=str(tiny_dir), adapter=str(lora), decoder="cold", alpha=0.1, beta=1.0, score="cold"),
                     tasks_dir, tasks=("tiny_mc", "tiny_gen"))
    assert aliased == pytest.approx(cold, rel=1e-6)
