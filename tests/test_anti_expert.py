"""`cold anti-expert` on tiny inputs (its stages, resuming, its errors), and the pairs it writes as
CoLD's default amateur: `cold generate` (with --compare), `cold eval`, `cold serve`."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cold.cli import app
from cold.load.demo import DEMO_DIR
from cold.load.pairs import PAIR_FILE, read_pair, shipped_pair
from cold.load.paths import fingerprint

runner = CliRunner()
EXPERT = DEMO_DIR / "smollm2-coin_flip-step-50"
ANTI_EXPERT = DEMO_DIR / "smollm2-coin_flip-step-50-selfneg"
QUESTION = ('A coin is heads up. Ann flips the coin. Bo does not flip the coin. Cy flips the coin. Di flips the coin. '
            'Is the coin still heads up? Note that "flip" here means "reverse".')
TINY = {"--limit": 24, "--tune-limit": 4, "--test-limit": 4, "--max-steps": 2, "--alphas": 0.3, "--betas": 1,
        "--min-mistakes": 1, "--max-new-tokens": 48, "--bootstrap": 200, "--threads": 2}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny(**changes) -> list:
    """The small run's options, with `changes` (min_mistakes=1000 -> --min-mistakes 1000)."""
    options = {**TINY, **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
    return [item for pair in options.items() for item in pair]


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """One small run of every stage from the shipped step-50 coin-flip expert (and its output)."""
    out = tmp_path_factory.mktemp("anti-expert") / "cf50"
    result = cli("anti-expert", "--adapter", "smollm2-coin_flip-step-50", "--task", "coin_flip", "--out", out, *tiny())
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


def test_every_stage_leaves_its_output_and_the_pair_names_its_expert(pair_run):
    out, result = pair_run
    for stage in range(1, 7):
        assert f"[{stage}/6]" in result.stderr
    mistakes = [json.loads(line) for line in (out / "mistakes" / "records" / "expert.jsonl").read_text().splitlines()]
    wrong = [r for r in mistakes if not r["correct"]["flexible"] and r["finish_reason"] == "stop"]
    assert len(mistakes) == 24 and wrong
    negatives = json.loads((out / "negatives.json").read_text())["examples"]
    assert [n["worked"] for n in negatives] == [r["output"].strip() for r in wrong]
    amateur = out / "anti-expert"
    log = json.loads((amateur / "training_log.json").read_text())["hyperparameters"]
    assert (log["task"], log["max_steps"], log["learning_rate"], log["rank"]) == ("self-negatives", 2, 5e-4, 8)
    pair = read_pair(amateur)
    assert pair.is_for(EXPERT) and pair.expert_sha1 == fingerprint(EXPERT) and not pair.is_for(DEMO_DIR / "smollm2-coin_flip")
    assert pair.setting == {"alpha": 0.3, "beta": 1.0, "scoring": "logit", "beta_schedule": "constant"}
    assert pair.info["tuning"]["n"] == 4 and pair.info["test"]["n"] == 4 and pair.info["negatives"] == len(negatives)
    assert "smollm2-coin_flip-step-50" in (amateur / "README.md").read_text().split("## CoLD pair")[1]
    assert (out / "tune" / "tune.json").is_file() and (out / "test" / "records").is_dir()
    # the three problem sets are disjoint
    ids = {stage: {json.loads(line)["prompt"] for line in (out / stage / "records" / "expert.jsonl").read_text().splitlines()}
           for stage in ("mistakes", "tune", "test")}
    assert not (ids["mistakes"] & ids["tune"] or ids["mistakes"] & ids["test"] or ids["tune"] & ids["test"])


def test_a_rerun_skips_every_finished_stage(pair_run):
    out, _ = pair_run
    weights = out / "anti-expert" / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    result = cli("anti-expert", "--adapter", "smollm2-coin_flip-step-50", "--task", "coin_flip", "--out", out, *tiny())
    assert result.exit_code == 0, result.output + result.stderr
    assert "already trained: skipped" in result.stderr
    assert result.stderr.count("nothing to generate") == 3
    assert weights.stat().st_mtime_ns == before


def test_too_few_mistakes_is_one_clear_error_that_counts_them(pair_run):
    out, _ = pair_run
    result = cli("anti-expert", "--adapter", "smollm2-coin_flip-step-50", "--task", "coin_flip", "--out", out,
                 *tiny(min_mistakes=1000))
    assert result.exit_code == 2, result.output
    assert "too few mistakes to learn from" in result.stderr and "wrong, finished answers in 24" in result.stderr
    assert "Traceback" not in result.output + result.stderr


MC_EXPERT = "smollm2-commonsenseqa-text"
MC_TINY = dict(limit=12, max_new_tokens=16)


@pytest.fixture(scope="module")
def choice_run(tmp_path_factory):
    """One small run of every stage for multiple choice, from the shipped CommonsenseQA expert."""
    out = tmp_path_factory.mktemp("anti-expert") / "csqa"
    result = cli("anti-expert", "--adapter", MC_EXPERT, "--task", "commonsenseqa", "--out", out, *tiny(**MC_TINY))
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


def test_multiple_choice_learns_the_experts_most_tempting_wrong_choices(choice_run):
    from cold.load.paths import data_root
    from cold.tasks.readers import read_commonsenseqa

    out, result = choice_run
    for stage in range(1, 7):
        assert f"[{stage}/6]" in result.stderr
    problems = {p.id: p for p in read_commonsenseqa(data_root() / "commonsenseqa/train_rand_split.jsonl")}
    ranked = [json.loads(line) for line in (out / "mistakes" / "choices.jsonl").read_text().splitlines()]
    assert len(ranked) == 12
    negatives = json.loads((out / "negatives.json").read_text())["examples"]
    assert len(negatives) == 12
    mistakes = 0
    for record, negative in zip(ranked, negatives):
        problem = problems[record["id"]]
        choices = dict(problem.choices)
        assert sorted(record["ranked"]) == sorted(choices) and record["gold"] == problem.gold
        wrong = next(label for label in record["ranked"] if label != problem.gold)  # the expert's favourite wrong choice
        assert negative["worked"] == f"The answer is {choices[wrong]}." and negative["answer"] == choices[problem.gold]
        assert "Answer Choices:" in negative["question"]  # worded as cold eval words it
        mistakes += record["ranked"][0] != problem.gold
    assert f"ranks a wrong choice first on {mistakes} of 12" in result.stderr
    amateur = out / "anti-expert"
    assert json.loads((amateur / "training_log.json").read_text())["hyperparameters"]["task"] == "hard-negatives"
    assert read_pair(amateur).is_for(DEMO_DIR / MC_EXPERT)
    rerun = cli("anti-expert", "--adapter", MC_EXPERT, "--task", "commonsenseqa", "--out", out, *tiny(**MC_TINY))
    assert rerun.exit_code == 0 and "nothing to score" in rerun.stderr and "already trained: skipped" in rerun.stderr
    refused = cli("anti-expert", "--adapter", MC_EXPERT, "--task", "commonsenseqa", "--out", out,
                  *tiny(**MC_TINY, min_mistakes=13))
    assert refused.exit_code == 2 and f"on {mistakes} of 12 training problems: too few mistakes" in refused.stderr
    assert "Traceback" not in refused.output + refused.stderr


def _rows(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in questions))
    return path


@pytest.mark.parametrize("case", ["test overlaps training", "tune overlaps test", "base model", "no files"])
def test_bad_inputs_are_refused_before_any_work(tmp_path, case):
    train = _rows(tmp_path / "train.jsonl", [f"What is {i} + 1?" for i in range(10)])
    tune = _rows(tmp_path / "tune.jsonl", ["What is 200 + 1?"])
    test = _rows(tmp_path / "test.jsonl", ["What is 300 + 1?", "What is 400 + 1?"])
    leaky = _rows(tmp_path / "leaky.jsonl", ["What is 3 + 1?", "What is 300 + 1?"])  # one training question
    jsonl = ["--task", "jsonl", "--data", train]
    args, message = {
        "test overlaps training": ([*jsonl, "--tune-data", tune, "--test-data", leaky], "training problems"),
        "tune overlaps test": ([*jsonl, "--tune-data", test, "--test-data", test], "share 2 question(s)"),
        "base model": ([*jsonl, "--tune-data", tune, "--test-data", test, "--model", "gemma3"],
                       "trained on base model 'smollm2', not 'gemma3'"),
        "no files": (jsonl, "--task jsonl needs --data"),
    }[case]
    out = tmp_path / "out"
    result = cli("anti-expert", "--adapter", EXPERT, "--out", out, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert case != "test overlaps training" or "share 1 question(s)" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not out.exists()


def test_shipped_experts_know_their_tuned_anti_experts():
    assert shipped_pair(EXPERT).amateur_dir == ANTI_EXPERT
    assert shipped_pair(DEMO_DIR / "smollm2-last_letters").amateur_dir.name == "smollm2-last_letters-selfneg"
    assert shipped_pair(DEMO_DIR / "smollm2-coin_flip") is None  # the converged expert has none
    assert shipped_pair(ANTI_EXPERT) is None


def test_a_shipped_expert_decodes_against_its_anti_expert_at_its_tuned_setting(smollm2):
    """`cold generate --adapter smollm2-coin_flip-step-50` is CoLD against the shipped anti-expert at its
    tuned setting (0.3/1) unless told otherwise; `--amateur base` is the base-model contrast."""
    from cold.decoding.engine import Engine
    from cold.load.adapters import read_adapter

    def tokens(*args):
        result = cli("generate", "--adapter", "smollm2-coin_flip-step-50", "--chat", "--json", "-n", "24", *args, QUESTION)
        assert result.exit_code == 0, result.output + result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])["token_ids"], result.stderr

    engine = Engine(smollm2, [read_adapter(EXPERT, "expert"), read_adapter(ANTI_EXPERT, "anti")])
    kwargs = dict(chat=True, max_new_tokens=24, adapter="expert")
    paired, note = tokens()
    assert "anti-expert smollm2-coin_flip-step-50-selfneg at alpha 0.3, beta 1" in note
    assert paired == engine.generate(QUESTION, alpha=0.3, beta=1.0, amateur_adapter="anti", amateur_scale=1.0, **kwargs)[0].token_ids
    assert tokens("--amateur", "base")[0] == engine.generate(QUESTION, **kwargs)[0].token_ids
    assert tokens("--beta", "2")[0] == engine.generate(QUESTION, alpha=0.3, beta=2.0, amateur_adapter="anti",
                                                       amateur_scale=1.0, **kwargs)[0].token_ids


def test_compare_highlights_the_tokens_cold_chose_against_the_expert(smollm2):
    from rich.text import Text

    from cold.cli.generate import highlighted

    result = cli("generate", "--adapter", "smollm2-coin_flip-step-50", "--compare", "--chat", "-n", "24", QUESTION)
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("expert: ") for line in lines) and any(line.startswith("CoLD:   ") for line in lines)
    assert "CoLD chose otherwise than the expert at" in result.stderr
    tokenizer = smollm2.tokenizer
    ids = tokenizer(" heads up. The answer is yes.", add_special_tokens=False).input_ids
    text = highlighted(tokenizer, ids, [i == 2 for i in range(len(ids))], 100)
    assert isinstance(text, Text) and text.plain == tokenizer.decode(ids)
    marked = [text.plain[span.start : span.end] for span in text.spans if "reverse" in str(span.style)]
    assert marked == [tokenizer.decode(ids[:3])[len(tokenizer.decode(ids[:2])):]]


def test_serve_presets_an_experts_requests_with_its_pair(tmp_path):
    from cold.cli.serve import _paired
    from cold.serve.app import ServerConfig, _with_presets
    from cold.serve.protocol import CompletionRequest

    served, pairs = _paired({"cf50": str(EXPERT)}, "smollm2")  # the shipped anti-expert is served too
    assert served == {"cf50": str(EXPERT), ANTI_EXPERT.name: str(ANTI_EXPERT)}
    assert pairs == {"cf50": {"amateur": ANTI_EXPERT.name, "alpha": 0.3, "beta": 1.0, "scoring": "logit", "beta_schedule": "constant"}}
    own = tmp_path / "mine"
    shutil.copytree(ANTI_EXPERT, own)
    served, pairs = _paired({"cf50": str(EXPERT), "mine": str(own)}, "smollm2")  # a pair among the adapters
    assert list(served) == ["cf50", "mine"] and pairs["cf50"]["amateur"] == "mine"
    config = ServerConfig(pairs=pairs)
    request = lambda **f: _with_presets(CompletionRequest(model="cf50", prompt="x", **f), config)  # noqa: E731
    assert (request().amateur, request().alpha, request().beta) == ("mine", 0.3, 1.0)
    assert (request(beta=2.0).beta, request(amateur_scale=0.0).amateur_scale) == (2.0, 0.0)  # the request's own fields win
    assert request(decoder="expert").amateur is None
    (own / PAIR_FILE).write_text("{not json")
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = cli("serve", "--adapter", f"cf50={EXPERT}", "--adapter", f"mine={own}", "--port", port)
    assert result.exit_code == 2 and "not a valid CoLD pair file" in result.stderr
