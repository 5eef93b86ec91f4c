"""`cold` on the command line: one Typer app and its commands, one module each.

    generate.py  `cold generate`: complete prompts (CoLD, the adapted model alone, the base model alone)
    serve.py     `cold serve`: the OpenAI-compatible HTTP server
    bench.py     `cold bench`: decode speed of CoLD and its baselines (the machinery: cold.bench)
    train.py     `cold train`: train a LoRA adapter (cold.training)
    lm_eval.py   `cold lm-eval`: lm-evaluation-harness with the model `cold` (cold.lm_eval)
    eval.py      `cold eval`: several decoders on a task's problems, accuracy side by side (cold.evaluation)
    tune.py      `cold tune`: choose alpha, beta and the LoRA scale on a tuning split
    anti_expert.py  `cold anti-expert`: train, tune and write the anti-expert that repairs an expert adapter
    eval_run.py  what eval and tune share: their options, the problems, the run directory, the records
    common.py    what every command shares: the consoles, the ColdError -> exit 2 wrapper, shared options

Commands import `common` (and eval/tune/anti-expert `eval_run`), never each other; nothing outside `cold.cli` imports it.
Each command imports torch, transformers or vLLM only when it runs, so that `cold --help` stays fast.
"""

from __future__ import annotations

import typer

from cold.cli.anti_expert import anti_expert_command
from cold.cli.bench import bench_command
from cold.cli.common import exit_on_sigterm
from cold.cli.eval import eval_command
from cold.cli.generate import generate
from cold.cli.lm_eval import lm_eval_command
from cold.cli.serve import serve
from cold.cli.train import train
from cold.cli.tune import tune_command

app = typer.Typer(
    help="Contrastive LoRA Decoding (CoLD): decode with a LoRA adapter contrasted against its base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _commands() -> None:
    """Contrastive LoRA Decoding (CoLD): decode with a LoRA adapter contrasted against its base model."""
    exit_on_sigterm()  # `finally` blocks run on SIGTERM: engines shut their processes down


app.command("generate")(generate)
app.command("serve")(serve)
app.command("bench")(bench_command)
app.command("train")(train)
app.command("eval")(eval_command)
app.command("tune")(tune_command)
app.command("anti-expert")(anti_expert_command)
app.command("lm-eval", add_help_option=False,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(lm_eval_command)
