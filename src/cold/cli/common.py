"""What every `cold` command shares: the consoles, the one ColdError -> exit 2 wrapper, adapter options.

Nothing here imports torch: `cold --help` stays fast.
"""

from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.console import Console

from cold.errors import ColdError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

EXIT_BAD_INPUT = 2  # the exit status of a command refused for bad input (a ColdError)


def reports_errors(command):
    """Run a command so that a ColdError prints one red `error:` line and exits with status 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ColdError as exc:
            err.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` or `DIR` (named after the directory) -> {name: dir}."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise ColdError(f"--adapter {spec!r}: expected NAME=DIR or DIR")
        if name in adapters:
            raise ColdError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def refuse_kv_dtype_on_vllm(kv_dtype: str | None) -> None:
    if kv_dtype is not None:
        raise ColdError("--kv-dtype applies to --engine cold; vLLM sizes and types its own KV cache")
