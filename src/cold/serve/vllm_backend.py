"""`cold serve --engine vllm`: an OpenAI-compatible HTTP API whose CoLD runs inside vLLM.

Batch-synchronous, on purpose: one worker thread owns the `vllm.LLM`. It takes every request
that has arrived (up to `max_batch` prompts), groups them by decoding settings and decodes each
group with `cold.vllm.generate` (pairs added while vLLM's scheduler is paused, so they are
admitted together); requests arriving meanwhile wait for the next round. That keeps every pair in
step by construction; the price is that a new request does not join a running batch mid-way (the
default engine's `cold serve` does; see docs/vllm.md for what continuous batching would need).

Request bodies are parsed by `cold.serve.protocol` (the same fields and errors as `cold serve`).
Not offered here: streaming, n > 1, expert_scale, amateur / amateur_scale; they are refused with a 400 that names them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cold.errors import ColdError
from cold.serve.protocol import (ApiError, ChatRequest, CompletionRequest, chat_messages, decode_params, parse,
                                  refuse_unsupported)

log = logging.getLogger("cold.serve.vllm_backend")
BASE_ALIAS = "base"


@dataclass
class _Job:
    ids: list[int]
    params: object  # cold.params.DecodeParams
    max_tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    group: tuple = field(init=False)

    def __post_init__(self):
        p = self.params
        self.group = (p.decoder, p.alpha, p.beta, p.scoring, p.stop, p.do_sample, p.temperature, p.top_k, p.top_p,
                      p.seed, self.max_tokens)

    def resolve(self, result) -> None:
        method = self.future.set_exception if isinstance(result, BaseException) else self.future.set_result
        self.loop.call_soon_threadsafe(lambda: None if self.future.done() else method(result))


class Worker(threading.Thread):
    """Owns the LLM: drains the queue, decodes each settings group with `cold.vllm.generate`."""

    def __init__(self, llm, lora, max_batch: int):
        super().__init__(name="cold-vllm-worker", daemon=True)
        self.llm, self.lora, self.max_batch = llm, lora, max_batch
        self.jobs: queue.Queue = queue.Queue()
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                batch = [self.jobs.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.group, []).append(job)
            for jobs in groups.values():
                self._decode(jobs)

    def _decode(self, jobs: list[_Job]) -> None:
        from cold.vllm.generate import generate

        p = jobs[0].params
        try:
            out = generate(self.llm, [j.ids for j in jobs], self.lora, decoder=p.decoder, alpha=p.alpha, beta=p.beta,
                           scoring=p.scoring, max_tokens=jobs[0].max_tokens, stop=p.stop, do_sample=p.do_sample,
                           temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
        except ColdError as exc:
            log.error("vLLM decoding failed: %s", exc)
            out = [ApiError(500, str(exc), code="cold_pair_failed")] * len(jobs)
        except Exception as exc:  # noqa: BLE001 - the thread must keep serving
            log.exception("vLLM decoding failed")
            out = [ApiError(500, f"vLLM failed: {type(exc).__name__}: {exc}")] * len(jobs)
        for job, result in zip(jobs, out):
            job.resolve(result)


def create_app(llm, lora, model_name: str, max_batch: int = 64, default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app; `lora` is the LoRARequest served under its name (CoLD by default)."""
    worker = Worker(llm, lora, max_batch)
    tokenizer = llm.get_tokenizer()
    context = llm.llm_engine.vllm_config.model_config.max_model_len
    adapters = [lora.lora_name] if lora is not None else []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.running = False

    app = FastAPI(title="cold (vLLM engine)", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    def resolve_model(model: str) -> str | None:
        if model in (model_name, BASE_ALIAS):
            return None
        if model in adapters:
            return model
        raise ApiError(404, f"the model {model!r} does not exist on this server; served models: "
                       f"{', '.join([model_name, *adapters])}", param="model", code="model_not_found")

    def checked(body) -> tuple[object, int]:
        refuse_unsupported(body, max_n=1)
        if body.stream:
            raise ApiError(400, "stream is not supported by `cold serve --engine vllm`", param="stream", code="unsupported_parameter")
        if body.expert_scale not in (None, 1, 1.0):
            raise ApiError(400, "expert_scale is not supported by the vLLM engine", param="expert_scale", code="unsupported_parameter")
        for field in ("amateur", "amateur_scale"):
            if getattr(body, field) is not None:
                raise ApiError(400, f"{field} is not supported by the vLLM engine", param=field, code="unsupported_parameter")
        params = decode_params(body, resolve_model(body.model))
        try:
            params.validate()
        except ColdError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None
        return params, getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max_tokens

    async def run(ids: list[int], params, max_tokens: int):
        if not ids:
            raise ApiError(400, "a prompt is empty (no tokens)", param="prompt", code="invalid_value")
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {len(ids)} tokens and "
                           f"max_tokens asks for {max_tokens} more", param="max_tokens", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        job = _Job(ids, params, max_tokens, loop.create_future(), loop)
        worker.jobs.put(job)
        result = await job.future
        return result

    def usage(ids, g) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": len(g.token_ids), "total_tokens": len(ids) + len(g.token_ids)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await request.body())
        params, max_tokens = checked(body)
        prompt = body.prompt
        if not isinstance(prompt, str) and not (prompt and isinstance(prompt[0], int)):
            raise ApiError(400, "send one prompt per request to the vLLM engine", param="prompt", code="invalid_value")
        ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        g = await run(ids, params, max_tokens)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason,
                                                  "logprobs": None, "token_ids": g.token_ids}],
                "usage": usage(ids, g)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse(ChatRequest, await request.body())
        params, max_tokens = checked(body)
        text = tokenizer.apply_chat_template(chat_messages(body), add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        g = await run(ids, params, max_tokens)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                                                  "finish_reason": g.finish_reason, "token_ids": g.token_ids}],
                "usage": usage(ids, g)}

    @app.get("/v1/models")
    async def models():
        ids = [model_name, *adapters]
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "cold"} for m in ids]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": "vllm", "queued": worker.jobs.qsize()}

    return app


def serve_vllm(model: str, adapters: dict[str, str], *, host: str, port: int, model_name: str, dtype: str,
               max_batch: int, max_tokens: int, log_level: str, api_key: str | None) -> None:
    """Start vLLM with the (single) adapter and serve the app with uvicorn until interrupted."""
    import uvicorn

    from cold.vllm.generator import VllmGenerator

    if api_key:
        raise ColdError("--api-key is not supported with --engine vllm yet; put the server behind a proxy that checks keys")
    generator = VllmGenerator(model, adapters, dtype)
    try:
        app = create_app(generator.llm, generator.lora, model_name, max_batch=max_batch, default_max_tokens=max_tokens)
        ids = ", ".join([model_name, *([generator.lora.lora_name] if generator.lora else [])])
        log.warning("serving model ids %s on http://%s:%s/v1 (vLLM engine)", ids, host, port)
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    finally:
        generator.close()
