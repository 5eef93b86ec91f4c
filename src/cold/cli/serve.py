"""`cold serve`: the OpenAI-compatible HTTP server on the command line."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from cold.cli.common import (
    LLAMACPP_HELP,
    Dtype,
    check_llamacpp_options,
    check_positive,
    err,
    exit_on_sigterm,
    parse_adapter_specs,
    refuse_kv_dtype_on_vllm,
    reports_errors,
)
from cold.errors import ColdError
from cold.params import EngineName

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@reports_errors
def serve(
    model: Annotated[str, typer.Option(help="Base model: 'smollm2' or 'gemma3' (built in), a Hugging Face directory, or a .gguf file.")] = "smollm2",
    adapter: Annotated[Optional[list[str]], typer.Option(help="PEFT LoRA adapter as NAME=DIR or DIR; repeat for several. Each is served as model id NAME. Default: the built-in demo adapter of a built-in model.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1 = this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="COLD_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $COLD_API_KEY).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Model id of the base model in the API (default: the model's name).")] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together; further requests wait in the queue.")] = 32,
    max_queue: Annotated[int, typer.Option(help="Sequences allowed to wait; beyond that requests get 503.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of requests that give none (capped by the context).")] = 256,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(help="Refuse longer prompts with 413 (default: only the model's context limits them).")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Refuse larger request bodies with 413.")] = 1 << 20,
    body_timeout: Annotated[float, typer.Option(help="Seconds a client has to send its whole request body; slower ones get 408.")] = 30.0,
    max_connections: Annotated[int, typer.Option(help="Open connections and requests at most; beyond that new requests get 503.")] = 1024,
    alias: Annotated[Optional[list[str]], typer.Option(help="Another model id for a served one with request fields preset, as ID=MODEL:FIELD=VALUE,...; e.g. gsm8k-cold=gsm8k:decoder=cold,alpha=0.1,beta=0.5,score=cold (for clients that send no extra fields, such as lm-eval's log-likelihoods). Repeat for several.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Dtype = "auto",
    kv_dtype: Annotated[Optional[str], typer.Option(help="dtype the KV cache stores (default: --dtype). bfloat16 under float32 weights halves the cache's memory; tokens can change where scores nearly tie.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    engine_name: Annotated[EngineName, typer.Option("--engine", help="cold: this package's engine (continuous batching, streaming); " + LLAMACPP_HELP + ", the same features; vllm: CoLD pairs inside vLLM's async engine (continuous batching, streaming; docs/vllm.md).")] = EngineName.cold,
) -> None:
    """Serve CoLD over an OpenAI-compatible HTTP API (completions, chat completions, streaming).

    Model ids: the base model's name (or 'base') decodes with the base model; an adapter's name decodes with CoLD using that adapter as the expert. Send 'decoder', 'alpha', 'beta' as extra JSON fields to change the method.

    Example:

      cold serve --adapter gsm8k=./my-gsm8k-lora --port 8000

      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "gsm8k", "prompt": "2+2=", "max_tokens": 8}'
    """
    import uvicorn

    from cold.load.demo import DEMO_ADAPTERS, default_adapters
    from cold.runner.native_memory import bound_native_memory
    from cold.serve.app import ServerConfig, create_app

    bound_native_memory()  # before any kernel is built: a server meets new matrix shapes for hours
    exit_on_sigterm()  # also when run as `python -m cold.cli.serve`: stopping it closes the backend
    if log_level.lower() not in LOG_LEVELS:
        raise ColdError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    check_positive(max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens, max_body_bytes=max_body_bytes,
                   max_prompt_tokens=max_prompt_tokens, max_connections=max_connections)
    if not (body_timeout > 0 and body_timeout != float("inf")):
        raise ColdError(f"--body-timeout must be a finite number of seconds > 0, got {body_timeout}")
    _check_address(host, port)  # before the model loads: a busy port or a typo in --host fails at once
    logging.basicConfig(level="DEBUG" if log_level.lower() == "trace" else log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if adapter:
        adapters = parse_adapter_specs(adapter)
    else:
        adapters = default_adapters(model)
        if not adapters and model in DEMO_ADAPTERS:
            err.print(f"[yellow]warning:[/] the built-in demo adapter {next(iter(DEMO_ADAPTERS[model].values()))!r} is not installed yet; "
                      "serving the base model only (decoder 'cold'/'expert' requests will get 400). "
                      "Give an adapter with --adapter NAME=DIR.")
    adapters, pairs = _paired(adapters, model)
    if engine_name is EngineName.vllm:
        from cold.serve.vllm_backend import VllmBackend

        refuse_kv_dtype_on_vllm(kv_dtype)
        amateurs = {pair["amateur"] for pair in pairs.values()}
        backend = VllmBackend.load(model, adapters, dtype=dtype, amateur=amateurs.pop() if len(amateurs) == 1 else None)
    elif engine_name is EngineName.llamacpp:
        from cold.llamacpp import LlamaCppEngine
        from cold.serve.engine_backend import EngineBackend

        check_llamacpp_options(device, dtype, kv_dtype)
        with err.status(f"Loading {model}" + (f" with adapter {', '.join(adapters)}" if adapters else "") + " on llama.cpp …"):
            # KV cells for max_batch sequences of max_tokens new tokens after a prompt of up to 512
            engine = LlamaCppEngine.load(model, adapters, context_tokens=max_batch * (max_tokens + 512))
        backend = EngineBackend(engine, name="llamacpp")
    else:
        from cold.decoding.engine import Engine
        from cold.serve.engine_backend import EngineBackend

        with err.status(f"Loading {model}" + (f" with adapter {', '.join(adapters)}" if adapters else "") + " …"):
            backend = EngineBackend(Engine.load(model, adapters, device=device, dtype=dtype, kv_dtype=kv_dtype))
    try:
        config = ServerConfig(
            model_name=model_name or _model_id(model), api_key=api_key or None, max_batch=max_batch,
            max_queue=max_queue, default_max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
            max_body_bytes=max_body_bytes, body_timeout_s=body_timeout, max_connections=max_connections,
            aliases=parse_alias_specs(alias or []), pairs=pairs,
        )
        app = create_app(backend, config)
        ids = ", ".join([config.model_name, *backend.adapter_names])
        err.print(f"Serving model ids {ids} on http://{host}:{port}/v1" + (" (API key required)" if api_key else "")
                  + {EngineName.vllm: " (vLLM engine)", EngineName.llamacpp: " (llama.cpp engine)"}.get(engine_name, ""))
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), limit_concurrency=config.max_connections)
    finally:
        backend.close()


def _paired(adapters: dict[str, str], model: str) -> tuple[dict[str, str], dict[str, dict]]:
    """(the adapters to serve, {expert id: the request fields of its tuned anti-expert}): an anti-expert
    among the adapters (`cold-pair.json`) presets CoLD requests to its expert's id; a shipped expert
    that has a shipped anti-expert gets it, served too. A request's own fields win."""
    from cold.load.pairs import check_base_model, read_pair, shipped_pair

    served, pairs = dict(adapters), {}
    for expert, path in adapters.items():
        found = [(name, read_pair(other)) for name, other in adapters.items() if name != expert]
        found = [(name, pair) for name, pair in found if pair is not None and pair.is_for(Path(path))]
        if not found and read_pair(path) is None and (pair := shipped_pair(path)) is not None:
            name = pair.amateur_dir.name
            while name in served:
                name += "-amateur"
            served[name] = str(pair.amateur_dir)
            found = [(name, pair)]
        for name, pair in found[:1]:
            check_base_model(pair, model)
            pairs[expert] = {"amateur": name, **pair.setting}
            err.print(f"CoLD requests to {expert} contrast with its tuned anti-expert {name} "
                      f"(alpha {pair.setting['alpha']:g}, beta {pair.setting['beta']:g}) unless they set their own", markup=False)
    return served, pairs


def parse_alias_specs(specs: list[str]) -> dict[str, tuple[str, dict]]:
    """`ID=MODEL:FIELD=VALUE,...` -> {ID: (MODEL, {FIELD: value})}; numbers become numbers, true/false booleans."""
    aliases: dict[str, tuple[str, dict]] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        target, _, fields = rest.partition(":")
        if not name or not target:
            raise ColdError(f"--alias {spec!r}: expected ID=MODEL:FIELD=VALUE,... (e.g. gsm8k-cold=gsm8k:decoder=cold,beta=1)")
        if name in aliases:
            raise ColdError(f"--alias {name!r} is given twice")
        settings = {}
        for item in filter(None, fields.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ColdError(f"--alias {spec!r}: {item!r} is not FIELD=VALUE")
            settings[key] = _value(value)
        aliases[name] = (target, settings)
    return aliases


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _check_address(host: str, port: int) -> None:
    """ColdError unless this process can listen on host:port now."""
    if not 0 <= port <= 65535:
        raise ColdError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ColdError(f"--host {host!r}: not an address of this machine ({exc})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ColdError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _model_id(model: str) -> str:
    """'smollm2' -> 'smollm2'; '/models/Foo-1B/' -> 'Foo-1B'; 'x/y.gguf' -> 'y'."""
    path = Path(model.split("::")[-1])
    return path.stem if path.suffix == ".gguf" else (path.name or model)


if __name__ == "__main__":  # python -m cold.cli.serve (used by scripts/load_test.py --start)
    typer.run(serve)
