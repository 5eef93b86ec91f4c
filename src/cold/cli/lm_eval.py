"""`cold lm-eval`: lm-evaluation-harness's own command line with the model `cold` registered (cold.lm_eval)."""

from __future__ import annotations

import typer

from cold.cli.common import reports_errors


@reports_errors
def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness with --model cold; every argument goes to lm-eval (see `cold lm-eval --help`).

    Example:

      cold lm-eval --model cold --model_args adapter=./my-lora,decoder=cold,alpha=0.1,beta=0.5 --tasks arc_easy
    """
    from cold.lm_eval import main  # ColdError naming the extra when lm-eval is missing

    main(list(ctx.args))
