"""scripts/self_negatives.py: the expert's wrong outputs on training problems as anti-expert data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cold.training.data import load_worked_examples
from conftest import SCRIPTS, load_script

SCRIPT = SCRIPTS / "self_negatives.py"


def write_run(run_dir: Path, data: Path) -> None:
    """A `cold eval` run's files as the runner writes them: its settings, one decoder's records."""
    rows = [{"question": f"Take the last letters of each words in \"{n}\" and concatenate them.", "answer": a}
            for n, a in [("Ann Bob", "nb"), ("Cy Dee", "ye"), ("Eve Flo", "eo"), ("Gus Hal", "sl")]]
    data.write_text(json.dumps({"examples": rows}), encoding="utf-8")
    (run_dir / "records").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"task": "last_letters", "data": str(data), "split": "gen-train"}), encoding="utf-8")
    records = [  # id, output, right, finish reason
        ("0", "The answer is nb.", True, "stop"),
        ("1", "The last letters are \"y\", \"e\". Concatenated they give y. The answer is y.", False, "stop"),
        ("2", "The last letters are \"e\", \"o\", \"e\", \"o\", \"e\"", False, "length"),
        ("3", " The answer is ls. ", False, "stop"),
    ]
    with open(run_dir / "records" / "expert.jsonl", "w", encoding="utf-8") as handle:
        for id_, output, right, finish in records:
            handle.write(json.dumps({"id": id_, "decoder": "expert", "output": output, "finish_reason": finish,
                                     "correct": {"strict": right, "flexible": right}}) + "\n")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_keeps_wrong_finished_outputs_as_worked_answers(tmp_path):
    write_run(tmp_path / "run", tmp_path / "gen-train.json")
    out = tmp_path / "negatives.json"
    done = run_script(str(tmp_path / "run"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "2 negatives from 4 outputs (1 right, 1 cut off" in done.stdout
    rows = json.loads(out.read_text(encoding="utf-8"))["examples"]
    assert [r["answer"] for r in rows] == ["ye", "sl"]  # the right answer is kept beside the wrong output
    pairs = load_worked_examples(out)  # what `cold train --task last_letters --data FILE` reads
    assert pairs == [
        ("Take the last letters of each words in \"Cy Dee\" and concatenate them.",
         "The last letters are \"y\", \"e\". Concatenated they give y. The answer is y."),
        ("Take the last letters of each words in \"Gus Hal\" and concatenate them.", "The answer is ls."),
    ]


def test_missing_or_held_out_run_is_one_clear_line(tmp_path):
    done = run_script(str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json"))
    assert done.returncode != 0 and not (tmp_path / "x.json").exists()
    assert "run.json not found" in done.stderr and "Traceback" not in done.stderr
    write_run(tmp_path / "run", tmp_path / "gen-test.json")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"task": "last_letters", "data": str(tmp_path / "gen-test.json"), "split": "gen-test"}))
    done = run_script(str(tmp_path / "run"), "--out", str(tmp_path / "x.json"))
    assert done.returncode != 0 and not (tmp_path / "x.json").exists()
    assert "held out for tuning or testing" in done.stderr and "Traceback" not in done.stderr


def test_shipped_last_letters_anti_expert_sharpens_the_join(smollm2):
    """The shipped anti-expert learnt the expert's typical mistake, joining the right letters
    wrongly: at the token that starts the joined letters (after `Concatenated they give`), CoLD's
    choice (alpha 0.1, beta 1, expert vs anti-expert log-probabilities, PEFT as the oracle) is right
    on more of 60 held-out problems than the expert's own top token."""
    import copy

    import torch
    from peft import PeftModel

    from cold.load.demo import DEMO_DIR, demo_adapter_dir
    from cold.lora.layer import uninstall_adapters
    from cold.tasks.generators import generate
    from cold.training.encoding import prompt_ids

    anti_dir = DEMO_DIR / "smollm2-last_letters-selfneg"
    assert (anti_dir / "adapter_model.safetensors").stat().st_size < 10 * 2**20
    assert "scripts/self_negatives.py" in (anti_dir / "README.md").read_text()
    plain = copy.deepcopy(smollm2.model)
    uninstall_adapters(plain)
    peft_model = PeftModel.from_pretrained(plain, str(demo_adapter_dir("smollm2", "last_letters")), adapter_name="expert")
    peft_model.load_adapter(str(anti_dir), adapter_name="anti")
    tok = smollm2.tokenizer
    expert_right = cold_right = 0
    for problem in generate("last_letters", "gen-tune")[:60]:  # the tuning split: neither adapter trained on it
        shown = problem.worked.split(" Concatenated they give")[0] + " Concatenated they give"
        ids = torch.tensor([prompt_ids(tok, problem.question, "chat") + tok(shown, add_special_tokens=False).input_ids])
        logprobs = {}
        for adapter in ("expert", "anti"):
            peft_model.set_adapter(adapter)
            with torch.inference_mode():
                logprobs[adapter] = torch.log_softmax(peft_model(input_ids=ids).logits[0, -1].float(), dim=-1)  # [V]
        expert = logprobs["expert"]
        plausible = expert >= expert.max() + torch.log(torch.tensor(0.1))
        cold = torch.where(plausible, 2 * expert - logprobs["anti"], torch.tensor(float("-inf")))
        gold = tok(" " + problem.answer, add_special_tokens=False).input_ids[0]
        expert_right += int(expert.argmax()) == gold
        cold_right += int(cold.argmax()) == gold
    assert cold_right > expert_right, (cold_right, expert_right)


def test_shipped_coin_flip_anti_expert_corrects_its_expert(tmp_path):
    """`cold eval` with the shipped step-50 coin-flip expert and the anti-expert trained on its own
    wrong answers: on 100 generated test problems (never trained or tuned on) CoLD against the
    anti-expert answers right more often than the expert's greedy decoding."""
    from typer.testing import CliRunner

    from cold.cli import app
    from cold.load.demo import DEMO_DIR

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "eval", "--task", "coin_flip", "--split", "gen-test", "--limit", "100", "--max-new-tokens", "64",
        "--decoders", "expert,cold@0.3/1:amateur", "--adapter", str(DEMO_DIR / "smollm2-coin_flip-step-50"),
        "--amateur-adapter", str(DEMO_DIR / "smollm2-coin_flip-step-50-selfneg"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    expert, cold = json.loads((out / "summary.json").read_text())["decoders"]
    assert (expert["decoder"], cold["decoder"]) == ("expert", "cold@0.3/1:amateur") and expert["n"] == cold["n"] == 100
    assert cold["accuracy"]["flexible"]["value"] > expert["accuracy"]["flexible"]["value"], (cold["accuracy"], expert["accuracy"])


def test_mistake_kinds_tells_joins_from_letters_and_counts_flips(tmp_path):
    from cold.tasks.readers import Problem

    kinds = load_script("mistake_kinds")
    write_run(tmp_path / "run", tmp_path / "gen-train.json")
    # "Cy Dee": letters y, e listed right, joined as "y" -> join; "Gus Hal": no letter list -> letter
    assert kinds.mistake_kinds(tmp_path / "run") == {"expert": {"join": 1, "letter": 2}}
    coin = Problem("0", "A coin is heads up. Ann flips the coin. Bob does not flip the coin. Cy flips the coin. Is the coin still heads up?", "yes")
    assert kinds.coin_flip_kind(coin, "Ann flips the coin, so it is flipped 1 time. The answer is no.") == "2 -> 1"
    assert "| join | 1 |" in kinds.table(kinds.mistake_kinds(tmp_path / "run"))
