"""What every `cold` command shares: the consoles, the one ColdError -> exit 2 wrapper, shared options.

Nothing here imports torch: `cold --help` stays fast.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from cold.errors import ColdError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # messages are never hard-wrapped (logs, pipes)

EXIT_BAD_INPUT = 2  # the exit status of a command refused for bad input (a ColdError)
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: the status of a command stopped by SIGTERM, as the shell reports it


def exit_on_sigterm() -> None:
    """From now on SIGTERM (a service manager's stop, `kill`) raises SystemExit(143) in the main
    thread, as Ctrl-C raises KeyboardInterrupt, so `finally` blocks run: `cold serve --engine vllm`
    then shuts vLLM's engine-core and worker processes down rather than leaving them running. (uvicorn
    re-raises a SIGTERM it handled once it has shut down; under the default handler that ended the
    process before the backend was closed.) A second SIGTERM ends the process at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(EXIT_TERMINATED)


def table_console(columns: int, **options) -> Console:
    """stdout for wide tables: the terminal's width, or `columns` when stdout is a file (whole tables in files)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else columns, **options)


def exits_on(kind: type[BaseException], message, status: int):
    """A decorator: when the command raises `kind`, print `message(exc)` on stderr and exit with `status`, no traceback."""

    def decorate(command):
        @functools.wraps(command)  # typer reads the options from the command's own signature
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except kind as exc:
                err.print(message(exc))
                raise typer.Exit(status) from None

        return wrapper

    return decorate


def reports_errors(command):
    """Run a command so that a ColdError prints one red `error:` line and exits with status 2, no traceback."""
    return exits_on(ColdError, lambda exc: f"[bold red]error:[/] {escape(str(exc))}", EXIT_BAD_INPUT)(command)


# ---- options that several commands share (typer reads the help from the type) -------------------

Model = Annotated[str, typer.Option(help="Base model: 'smollm2' or 'gemma3' (built in), a Hugging Face directory, or a .gguf file.")]
EvalModel = Annotated[str, typer.Option(help="Base model: 'smollm2' (built in), a Hugging Face directory, or a .gguf file.")]  # eval, tune, bench
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
Dtype = Annotated[str, typer.Option(help="auto (default: bfloat16 where the CPU multiplies it natively (AVX512-BF16/AMX), else float32; CUDA: bfloat16), float32, bfloat16 or float16. $COLD_DTYPE sets what auto means.")]
KvDtype = Annotated[Optional[str], typer.Option(help="dtype the KV cache stores (default: --dtype). bfloat16 under float32 weights halves the cache's memory; tokens can change where scores nearly tie.")]


# ---- checks of option values -------------------------------------------------------------------


def check_positive(**values) -> None:
    """Each given option (None = not given) is >= 1; the error names the option as typed: --max-new-tokens."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ColdError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` or `DIR` (named after the directory; a GGUF LoRA file after its stem) -> {name: dir}.
    A DIR that does not exist but names a shipped adapter (`smollm2-coin_flip-step-50`) is that adapter."""
    from cold.load.demo import shipped_adapter_dir

    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = (Path(spec).stem if spec.endswith(".gguf") else Path(spec).name), spec
        if not name or not path:
            raise ColdError(f"--adapter {spec!r}: expected NAME=DIR or DIR")
        if name in adapters:
            raise ColdError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = str(shipped_adapter_dir(path) or path) if not Path(path).exists() else path
    return adapters


BASE_AMATEUR = "base"  # --amateur base: contrast with the bare base model even where a tuned anti-expert exists


def choose_amateur(adapters: dict[str, str], use: str | None, amateur: str | None, model: str):
    """CoLD's amateur for a command: (adapters to load, the expert's adapter name, the amateur's adapter
    name or None for the base model, the pair whose tuned setting applies or None).

    `amateur` is a loaded adapter's name, an adapter directory (loaded too), `base`, or None: then a
    shipped expert that has a tuned anti-expert (`cold.load.pairs.shipped_pair`) gets it.
    """
    from cold.load.pairs import check_base_model, read_pair, shipped_pair

    expert = use if use is not None else (next(iter(adapters)) if len(adapters) == 1 else None)
    if amateur == BASE_AMATEUR:
        return adapters, expert, None, None
    if amateur in adapters:
        name, pair = amateur, read_pair(adapters[amateur])
    elif amateur is not None:
        if not Path(amateur).is_dir():
            raise ColdError(f"--amateur {amateur!r}: neither a loaded adapter ({', '.join(adapters) or 'none'}) nor an "
                            f"adapter directory; '{BASE_AMATEUR}' contrasts with the base model")
        name, pair = _free_name(Path(amateur).name, adapters), read_pair(amateur)
        adapters = {**adapters, name: amateur}
    else:
        pair = shipped_pair(adapters.get(expert)) if expert is not None else None
        if pair is None:
            return adapters, expert, None, None
        name = _free_name(pair.amateur_dir.name, adapters)
        adapters = {**adapters, name: str(pair.amateur_dir)}
    if pair is not None:
        check_base_model(pair, model)
    return adapters, expert, name, pair


def _free_name(name: str, taken: dict) -> str:
    while name in taken:
        name += "-amateur"
    return name


LLAMACPP_HELP = ("llamacpp: the GGUF on llama.cpp, an expert context with the LoRA and an amateur context without "
                 "(pip install 'cold-decoding[llamacpp]'; docs/llamacpp.md)")


def check_llamacpp_options(device: str, dtype: str, kv_dtype: str | None) -> None:
    """--engine llamacpp runs the GGUF on the CPU in its own quantisation: --device, --dtype and --kv-dtype do not apply."""
    if device not in ("cpu", "auto"):
        raise ColdError(f"--device {device}: --engine llamacpp runs on the CPU (llama-cpp-python's CPU build); leave --device out")
    if dtype != "auto":
        raise ColdError(f"--dtype {dtype}: --engine llamacpp computes in the GGUF's own quantisation; leave --dtype out")
    if kv_dtype is not None:
        raise ColdError("--kv-dtype applies to --engine cold; llama.cpp keeps its KV cache in float16")


def load_engine(engine_name, model: str, adapters: dict[str, str], device: str, dtype: str, kv_dtype: str | None,
                what: str | None = None):
    """Our `Engine` or, for --engine llamacpp, `LlamaCppEngine`, loaded under a status line."""
    what = escape(what or (f"Loading {model}" + (f" with adapter {', '.join(adapters)}" if adapters else "")))
    if engine_name == "llamacpp":
        check_llamacpp_options(device, dtype, kv_dtype)
        from cold.llamacpp import LlamaCppEngine

        with err.status(f"{what} on llama.cpp …"):
            return LlamaCppEngine.load(model, adapters)
    from cold.decoding.engine import Engine

    with err.status(f"{what} …"):
        return Engine.load(model, adapters, device=device, dtype=dtype, kv_dtype=kv_dtype)


def refuse_kv_dtype_on_vllm(kv_dtype: str | None) -> None:
    if kv_dtype is not None:
        raise ColdError("--kv-dtype applies to --engine cold; vLLM sizes and types its own KV cache")
