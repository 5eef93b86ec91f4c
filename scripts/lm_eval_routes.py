#!/usr/bin/env python
"""lm-evaluation-harness through both of cold's routes, expert against CoLD, on two public tasks.

    python scripts/lm_eval_routes.py --limit 100 --out results/lm_eval

Route 1 is lm-eval's model `cold` (cold.lm_eval) in this process; route 2 is lm-eval's own
`local-completions` model against `cold serve` started on a free port, whose `--alias` ids carry
the decoder settings (lm-eval's log-likelihood requests carry no extra fields). Tasks, written
as lm-eval YAML into OUT/tasks from ../shared/data:

    cold_coin_flip   generate_until, the chat template, the coin-flip step-50 demo adapter,
                     exact match of "yes"/"no" after "The answer is"
    cold_csqa        multiple_choice (log-likelihood of each choice's text), CommonsenseQA dev,
                     the commonsenseqa-text demo adapter

Decoders: expert (decoder=expert, score=expert) and CoLD (decoder=cold, score=cold, alpha 0.1,
beta 0.5, the base model as the amateur). float32 in both routes, so batches of different shapes
give the same tokens. Writes OUT/routes.json and OUT/routes.md (the table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import free_port, stop_server, wait_healthy  # noqa: E402

from cold.load.demo import DEMO_DIR  # noqa: E402
from cold.load.models import resolve_model_dir  # noqa: E402
from cold.load.paths import data_root  # noqa: E402

COIN_FLIP = """task: cold_coin_flip
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/coin_flip/coin_flip.json
  field: examples
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 96
  do_sample: false
filter_list:
  - name: answer
    filter:
      - function: regex
        regex_pattern: "The answer is (yes|no)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CSQA = """task: cold_csqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/commonsenseqa/dev_rand_split.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D', 'E'].index(answerKey)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TASKS = {"cold_coin_flip": ("coin_flip-step-50", COIN_FLIP, True),
         "cold_csqa": ("commonsenseqa-text", CSQA, False)}  # task: (adapter id, its yaml, chat template)
DECODERS = {"expert": "decoder=expert,score=expert", "CoLD": "decoder=cold,score=cold,alpha=0.1,beta=0.5"}


def adapter_path(adapter_id: str) -> Path:
    path = DEMO_DIR / f"smollm2-{adapter_id}"
    if not (path / "adapter_config.json").is_file():
        raise SystemExit(f"the demo adapter {path} is missing")
    return path


def run(model: str, model_args: str, task: str, tasks_dir: Path, limit: int, chat: bool) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import cold.lm_eval  # noqa: F401  registers the model `cold`

    results = simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit, batch_size=8,
                              apply_chat_template=chat, task_manager=TaskManager(include_path=str(tasks_dir)))
    scores = results["results"][task]
    return {k.split(",")[0]: v for k, v in scores.items() if "," in k and "stderr" not in k}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100, help="problems per task (the first N)")
    parser.add_argument("--out", type=Path, default=Path("results/lm_eval"))
    args = parser.parse_args()
    tasks_dir = args.out / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name, (_, text, _) in TASKS.items():
        (tasks_dir / f"{name}.yaml").write_text(text.format(data=data_root()))

    adapters = {adapter_id: adapter_path(adapter_id) for adapter_id, _, _ in TASKS.values()}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "cold.cli.serve", "--port", str(port), "--dtype", "float32", "--log-level", "warning"]
    for adapter_id, path in adapters.items():
        serve += ["--adapter", f"{adapter_id}={path}"]
        for label, settings in DECODERS.items():
            serve += ["--alias", f"{adapter_id}-{label.lower()}={adapter_id}:{settings}"]
    server = subprocess.Popen(serve, stdout=(args.out / "server.log").open("w"), stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_healthy(url, server, timeout=600)
        for task, (adapter_id, _, chat) in TASKS.items():
            for label, settings in DECODERS.items():
                direct = run("cold", f"adapter={adapters[adapter_id]},dtype=float32,{settings}", task, tasks_dir,
                             args.limit, chat)
                # lm-eval 0.4.13's remote tokenizer cannot apply a chat template (it sends the messages to
                # /tokenize as they are): chat tasks tokenise on the client, with the served model's tokenizer
                tokenizer = f"tokenizer_backend=huggingface,tokenizer={resolve_model_dir('smollm2')}" if chat else \
                    "tokenizer_backend=remote"
                remote = run("local-completions", f"model={adapter_id}-{label.lower()},base_url={url}/v1/completions,"
                             f"{tokenizer},num_concurrent=8,max_retries=1", task, tasks_dir, args.limit, chat)
                rows.append({"task": task, "adapter": f"smollm2-{adapter_id}", "decoder": label,
                             "model cold": direct, "local-completions + cold serve": remote})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_server(server)
    (args.out / "routes.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = ["| task | adapter | decoder | metric | --model cold | local-completions + cold serve |", "|---|---|---|---|---|---|"]
    for row in rows:
        for metric, value in row["model cold"].items():
            table.append(f"| {row['task']} | {row['adapter']} | {row['decoder']} | {metric} | {value:.4f} | "
                         f"{row['local-completions + cold serve'].get(metric, float('nan')):.4f} |")
    (args.out / "routes.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
