"""The OpenAI-compatible HTTP API (FastAPI; run it with `cold serve`) over a decoding backend.

    app = create_app(Engine.load("smollm2", {"gsm8k": "adapters/smollm2-gsm8k"}), ServerConfig())
    app = create_app(VllmBackend.load("smollm2", {...}), ServerConfig())     # CoLD inside vLLM
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/completions (also scoring a prompt: echo with logprobs), POST
/v1/chat/completions, GET /v1/models, GET /health, GET /metrics, and vLLM's POST /tokenize,
POST /detokenize and GET /tokenizer_info (lm-eval's remote tokenizer). The model id picks the network: an adapter's name decodes with that adapter as
the expert (decoder "cold" by default), the base model's name (or "base") decodes with the
base model alone (decoder "base" by default). CoLD fields `decoder`, `alpha`, `beta`,
`scoring`, `top_k`, `expert_scale`, `amateur` and `amateur_scale` ride along in the JSON body.

Everything HTTP happens here, once for every backend: the API key, JSON bodies only (a web page
cannot POST one without the browser asking first), body size and read-time limits, model ids,
prompt and context checks, response and stream shapes, usage, metrics and error responses. The
backend (`cold.serve.backend.Backend`: an `Engine` is wrapped in `EngineBackend`) builds the
requests and the thread that decodes them. Every request becomes one `Job` per choice; each HTTP
call waits on its own asyncio queue, which the decode thread feeds through
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cold.errors import ColdError
from cold.load.prompts import chat_ids, chat_text
from cold.serve.backend import Backend, DecodeThread, Job, JobFailed, QueueFull
from cold.serve.logprobs import chat_logprobs, completion_logprobs, generated_completion_logprobs
from cold.serve.metrics import Metrics
from cold.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_messages,
    decode_params,
    parse,
    refuse_unsupported,
)

log = logging.getLogger("cold.serve.app")

BASE_ALIAS = "base"
_DISCONNECTED = object()
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away: logged and counted apart from errors


class _ClientGone(Exception):
    """The client closed the connection before its request was read or answered."""


@dataclass
class ServerConfig:
    model_name: str = "smollm2"  # the base model's id in /v1/models ("base" is accepted too)
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_batch: int = 32  # sequences decoded together; more wait in the queue
    max_queue: int = 256  # sequences waiting to join the batch; beyond that: 503
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    max_prompt_tokens: int | None = None  # longer prompts: 413 (None: only the context limits)
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    max_n: int = 16  # choices per request
    body_timeout_s: float = 30.0  # a request body not received in full within this: 408
    # model ids that stand for a served adapter (or the base model's id) with request fields preset:
    # {"gsm8k-cold": ("gsm8k", {"decoder": "cold", "alpha": 0.1, "beta": 0.5, "score": "cold"})}. A
    # request's own fields win. For clients that send no extra fields (lm-eval's log-likelihoods).
    aliases: dict[str, tuple[str, dict]] = field(default_factory=dict)
    # a served adapter's id -> the fields its tuned anti-expert presets for CoLD requests that leave
    # them out: {"cf50": {"amateur": "cf50-selfneg", "alpha": 0.3, "beta": 1.0, ...}} (`cold serve` finds the pairs)
    pairs: dict[str, dict] = field(default_factory=dict)
    max_connections: int = 1024  # open connections and requests; beyond: 503 (uvicorn's limit_concurrency, set by `cold serve`)


@dataclass
class _Prompt:
    ids: list[int]
    text: str  # for echo


def create_app(backend, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving `backend` (a `Backend`, or an `Engine`); its decode thread runs while the app's lifespan does."""
    config = config or ServerConfig()
    if not isinstance(backend, Backend):
        from cold.serve.engine_backend import EngineBackend  # here, not at the top: the app itself needs no torch

        backend = EngineBackend(backend)
    clash = {config.model_name, BASE_ALIAS} & set(backend.adapter_names)
    if clash:
        raise ColdError(f"adapter name {clash.pop()!r} clashes with the base model's id; rename the adapter")
    _check_aliases(config, backend)
    metrics = Metrics()
    worker = backend.worker(max_batch=config.max_batch, max_queue=config.max_queue, metrics=metrics)
    server = _Server(backend, config, worker, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        log.info("serving %s with adapters: %s", config.model_name, ", ".join(backend.adapter_names) or "none")
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            server.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cold", description="OpenAI-compatible API over Contrastive LoRA Decoding",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cold = server
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", server.tokenizer_info, methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown route, wrong method
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(request, ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    app.add_middleware(_CountRequests, metrics=metrics, paths={"/v1/completions", "/v1/chat/completions",
                                                                 "/v1/models", "/health", "/metrics", "/tokenize",
                                                                 "/detokenize", "/tokenizer_info"})
    return app


def _guarded(handler):
    """Turn every failure of a handler into an OpenAI-style error response, logged once."""

    @functools.wraps(handler)
    async def wrapper(self, request: Request):
        try:
            return await handler(self, request)
        except _ClientGone:
            log.info("%s %s: the client went away before its request was read", request.method, request.url.path)
            self.metrics.disconnects.inc()
            return Response(status_code=CLIENT_CLOSED)
        except ApiError as exc:
            return _error_response(request, exc)
        except ColdError as exc:
            return _error_response(request, ApiError(400, str(exc), code="invalid_value"))
        except Exception as exc:  # a bug: answer 500, keep serving
            log.exception("%s %s failed", request.method, request.url.path)
            return _error_response(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"), logged=True)

    return wrapper


def _error_response(request: Request, exc: ApiError, logged: bool = False) -> JSONResponse:
    if not logged:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class _Server:
    def __init__(self, backend: Backend, config: ServerConfig, worker: DecodeThread, metrics: Metrics):
        self.backend = backend
        self.config = config
        self.worker = worker
        self.metrics = metrics
        self.created = int(time.time())
        self.max_n = min(config.max_n, backend.max_n or config.max_n)
        # one thread tokenises (and renders chat templates) for every request: off the event loop, so a
        # large prompt stalls no stream; one, because a tokenizer is not made to be used from several at once
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="cold-tokenize")

    async def _tokenizing(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, function, *args)

    # ---- endpoints ----------------------------------------------------------------------

    @_guarded
    async def completions(self, request: Request) -> Response:
        body, params = await self._accept(request, CompletionRequest)
        self._check_room(_prompt_count(body.prompt), body.n or 1)
        prompts = await self._tokenizing(self._completion_prompts, body.prompt)
        if body.scores_prompt:
            return await self._score(request, body, prompts, params)
        return await self._generate(request, "completion", body, prompts, params, body.max_tokens, bool(body.echo))

    @_guarded
    async def chat_completions(self, request: Request) -> Response:
        body, params = await self._accept(request, ChatRequest)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_completion_tokens must be >= 1, got {max_tokens}", param="max_completion_tokens",
                           code="invalid_value")
        self._check_room(1, body.n or 1)
        prompt = await self._tokenizing(self._chat_prompt, chat_messages(body))
        return await self._generate(request, "chat", body, [prompt], params, max_tokens, echo=False)

    @_guarded
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        card = lambda id_, parent: {"id": id_, "object": "model", "created": self.created,  # noqa: E731
                                    "owned_by": "cold", "root": id_, "parent": parent}
        data = [card(self.config.model_name, None)] + [card(a, self.config.model_name) for a in self.backend.adapter_names]
        data += [{**card(alias, target), "settings": settings} for alias, (target, settings) in self.config.aliases.items()]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        ok = self.worker.alive
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "engine": self.backend.name, "model": self.config.model_name,
             "adapters": self.backend.adapter_names, "running": self.worker.running,
             "queued": self.worker.queued, "max_batch": self.config.max_batch, "max_queue": self.config.max_queue},
            status_code=200 if ok else 503,
        )

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @_guarded
    async def tokenize(self, request: Request) -> Response:
        """POST /tokenize (vLLM's shape): {"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens"}."""
        body = await self._tokenizer_body(request, TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt", code="invalid_value")
        tokenizer = self.backend.tokenizer

        def tokens() -> list[int]:
            if body.prompt is not None:
                return tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
            messages = chat_messages(ChatRequest(model="", messages=body.messages))
            return self._chat_prompt(messages, body.add_generation_prompt).ids

        ids = await self._tokenizing(tokens)
        return JSONResponse({"count": len(ids), "max_model_len": self.backend.context_length, "tokens": ids,
                             "token_strs": None})

    @_guarded
    async def detokenize(self, request: Request) -> Response:
        """POST /detokenize (vLLM's shape): {"tokens"} -> {"prompt"}."""
        body = await self._tokenizer_body(request, DetokenizeRequest)
        self._check_vocabulary(body.tokens, "tokens")
        return JSONResponse({"prompt": await self._tokenizing(self.backend.tokenizer.decode, body.tokens)})

    async def _tokenizer_body(self, request: Request, kind: type):
        """The checked body of a /tokenize or /detokenize request (its optional model id must be served)."""
        self._authorize(request)
        body = parse(kind, await self._read_body(request))
        if body.model is not None:
            self._resolve_model(body.model)
        return body

    @_guarded
    async def tokenizer_info(self, request: Request) -> Response:
        """GET /tokenizer_info (vLLM's shape): the special tokens and chat template, for clients that tokenize remotely."""
        self._authorize(request)
        tokenizer = self.backend.tokenizer
        return JSONResponse({"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                             "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                             "chat_template": getattr(tokenizer, "chat_template", None),
                             "model_max_length": self.backend.context_length})

    # ---- request checks -----------------------------------------------------------------

    async def _accept(self, request: Request, kind: type) -> tuple:
        """The checked body of a generation request and its DecodeParams (ApiError when refused)."""
        self._authorize(request)
        body = _with_presets(parse(kind, await self._read_body(request)), self.config)
        adapter = self._resolve_model(body.model)
        self._refuse(body)
        return body, decode_params(body, adapter)

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def _check_room(self, prompts: int, n: int) -> None:
        """Before any tokenising: 400 for more sequences than the queue holds, 503 while it has no room for them."""
        sequences = prompts * n
        if sequences > self.config.max_queue:  # could never be queued: not worth a retry
            raise ApiError(400, f"{prompts} prompt(s) x n={n} is more sequences than this server queues "
                           f"({self.config.max_queue}); split the request", param="prompt", code="invalid_value")
        if self.worker.queued + sequences > self.config.max_queue:
            raise ApiError(503, f"the request queue is full ({self.worker.queued} waiting, at most "
                           f"{self.config.max_queue}); retry later", code="queue_full")

    async def _read_body(self, request: Request) -> bytes:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":  # a web page can POST text/plain or a form without asking: refused
            raise ApiError(415, "send the request body as JSON with the header 'Content-Type: application/json' "
                           f"(got {media_type or 'none'!r})", code="unsupported_media_type")
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length", "")
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large")
        if length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise _ClientGone() from None
        return b"".join(chunks)

    def _resolve_model(self, model: str) -> str | None:
        """The adapter a model id (or an alias's target) selects (None: the base model); 404 for ids not served."""
        model = self.config.aliases.get(model, (model, None))[0]
        if model in (self.config.model_name, BASE_ALIAS):
            return None
        if model in self.backend.adapter_names:
            return model
        served = ", ".join([self.config.model_name, *self.backend.adapter_names, *self.config.aliases])
        raise ApiError(404, f"the model {model!r} does not exist on this server; served models: {served}",
                       param="model", code="model_not_found")

    def _refuse(self, body) -> None:
        """400 for what this server or its backend does not offer, and for an `amateur` that is not a served adapter's id."""
        refuse_unsupported(body, self.max_n)
        self.backend.refuse(body)
        if body.amateur is not None and body.amateur not in self.backend.adapter_names:
            served = ", ".join(self.backend.adapter_names) or "none"
            raise ApiError(400, f"amateur {body.amateur!r} is not an adapter on this server; adapters: {served}",
                           param="amateur", code="invalid_value")

    def _completion_prompts(self, prompt) -> list[_Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(_Prompt(self.backend.encode(p), p))
            else:
                self._check_vocabulary(p, "prompt")
                out.append(_Prompt(list(p), self.backend.tokenizer.decode(p)))
        return out

    def _check_vocabulary(self, ids: list[int], param: str) -> None:
        vocab = self.backend.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"{param} token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                           param=param, code="invalid_value")

    def _chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> _Prompt:
        tokenizer = self.backend.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", code="invalid_value")
        try:
            text = chat_text(tokenizer, messages, add_generation_prompt)
        except Exception as exc:  # jinja raises for conversations the template refuses
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages",
                           code="invalid_value") from None
        return _Prompt(chat_ids(tokenizer, text), text)

    def _requests(self, prompts: list[_Prompt], params, max_tokens: int | None, n: int) -> list:
        """One backend request per choice (prompt-major, n per prompt), sized against the context."""
        context = self.backend.context_length
        limit = self.config.max_prompt_tokens
        requests = []
        for prompt in prompts:
            size = len(prompt.ids)
            if size == 0:
                raise ApiError(400, "a prompt is empty (no tokens)", param="prompt", code="invalid_value")
            if limit is not None and size > limit:
                raise ApiError(413, f"the prompt has {size} tokens; this server accepts at most {limit}",
                               param="prompt", code="prompt_too_long")
            if size >= context:
                raise ApiError(400, f"the prompt has {size} tokens; this model's context is {context} tokens, "
                               "which leaves no room for a completion", param="prompt", code="context_length_exceeded")
            new = max_tokens if max_tokens is not None else min(self.config.default_max_tokens, context - size)
            if size + new > context:
                raise ApiError(400, f"this model's context is {context} tokens; the prompt has {size} tokens and "
                               f"max_tokens asks for {new} more", param="max_tokens", code="context_length_exceeded")
            for j in range(n):
                seed = (params.seed + j) % 2**63 if params.seed is not None else None
                requests.append(self.backend.make_request(prompt.ids, params.with_(max_new_tokens=new, seed=seed)))
        return requests

    # ---- scoring (echo with logprobs) ---------------------------------------------------

    async def _score(self, request: Request, body, prompts: list[_Prompt], params) -> Response:
        """Each prompt echoed with its tokens' log-probabilities (and, with max_tokens 1, the best next
        token's): the expert's by default, CoLD's with `score: "cold"`, the base model's on its id."""
        if not self.backend.scores_prompts:
            raise ApiError(400, f"echo with logprobs is not offered by --engine {self.backend.name}", param="echo",
                           code="unsupported_parameter")
        if params.decoder != "base":
            params = params.with_(decoder=body.score or "expert")
        extra = body.max_tokens or 0
        top = max(body.logprobs or 0, extra)  # the best next token is the first alternative
        context = self.backend.context_length
        for prompt in prompts:
            if len(prompt.ids) + extra > context:
                raise ApiError(400, f"the prompt has {len(prompt.ids)} tokens; this model's context is {context} tokens",
                               param="prompt", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [Job(request=self.backend.make_score_request(p.ids, params, top), index=i,
                    deliver=lambda item, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, item)))
                for i, p in enumerate(prompts)]
        try:
            self.worker.submit(jobs)
        except QueueFull as exc:
            raise ApiError(503, str(exc), code="queue_full") from None
        scored: list = [None] * len(jobs)
        watcher = asyncio.create_task(_watch_disconnect(request, queue))
        try:
            for _ in jobs:
                index, item = await queue.get()
                if item is _DISCONNECTED:
                    self.metrics.disconnects.inc()
                    return Response(status_code=CLIENT_CLOSED)
                if isinstance(item, JobFailed):
                    return _error_response(request, _job_error(item), logged=True)
                scored[index] = item
        finally:
            watcher.cancel()
            self.worker.cancel(jobs)
        tokenizer = self.backend.tokenizer
        choices = [_scored_choice(i, s, body.logprobs or 0, extra, tokenizer) for i, s in enumerate(scored)]
        prompt_tokens = sum(len(p.ids) for p in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": extra * len(prompts),
                 "total_tokens": prompt_tokens + extra * len(prompts)}
        return JSONResponse({"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                             "model": body.model, "choices": choices, "usage": usage})

    # ---- generation ---------------------------------------------------------------------

    async def _generate(self, request: Request, kind: str, body, prompts: list[_Prompt], params,
                        max_tokens: int | None, echo: bool) -> Response:
        start = time.perf_counter()
        n = body.n or 1
        requests = self._requests(prompts, params, max_tokens, n)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(index: int):
            return lambda item: loop.call_soon_threadsafe(queue.put_nowait, (index, item))

        jobs = [Job(request=r, deliver=sink(i), index=i) for i, r in enumerate(requests)]
        try:
            self.worker.submit(jobs)
        except QueueFull as exc:
            raise ApiError(503, str(exc), code="queue_full") from None
        prompt_tokens = sum(len(r.prompt_ids) for r in requests)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        call = _Call(kind, body.model, jobs, queue, prompt_tokens, start, self.metrics,
                     [prompts[i // n].text if echo else "" for i in range(len(jobs))], self.backend.token_ids_in_choices,
                     self.backend.tokenizer if params.logprobs is not None else None, streamed=bool(body.stream))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _JobStream(self._stream(request, call, include_usage), lambda: self.worker.cancel(call.jobs),
                              media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request, call)

    async def _complete(self, request: Request, call: "_Call") -> Response:
        watcher = asyncio.create_task(_watch_disconnect(request, call.queue))
        try:
            while not call.finished:
                index, item = await call.queue.get()
                if item is _DISCONNECTED:
                    log.info("%s %s: client went away; dropping its %d sequence(s)",
                             request.method, request.url.path, len(call.jobs))
                    self.metrics.disconnects.inc()
                    return Response(status_code=CLIENT_CLOSED)
                if isinstance(item, JobFailed):  # the decode thread has logged it
                    return _error_response(request, _job_error(item), logged=True)
                call.add(index, item)
        finally:
            watcher.cancel()
            self.worker.cancel(call.jobs)
        return JSONResponse(call.response())

    async def _stream(self, request: Request, call: "_Call", include_usage: bool):
        """Server-sent events; ends with `data: [DONE]`. Leaving early (disconnect) cancels the jobs."""
        try:
            for chunk in call.opening_chunks():
                yield _sse(chunk)
            while not call.finished:
                index, item = await call.queue.get()
                if isinstance(item, JobFailed):  # the decode thread has logged it
                    yield _sse(_job_error(item).body())
                    break
                chunk = call.add(index, item)
                if chunk is not None:
                    if call.finished and not include_usage:
                        chunk["usage"] = call.usage()
                    yield _sse(chunk)
            else:
                if include_usage:
                    yield _sse(call.chunk([], usage=call.usage()))
            yield "data: [DONE]\n\n"
        finally:
            if not call.finished:
                log.info("%s %s: stream closed early; dropping its sequence(s)", request.method, request.url.path)
                self.metrics.disconnects.inc()
            self.worker.cancel(call.jobs)


class _JobStream(StreamingResponse):
    """A streaming response that cancels its jobs however it ends, even if it never started streaming."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Call:
    """The state of one generation request: its jobs, their texts so far, and the OpenAI shapes."""

    def __init__(self, kind, model, jobs, queue, prompt_tokens, start, metrics, echoes, token_ids_in_choices=False,
                 logprobs_tokenizer=None, streamed=True):
        """`logprobs_tokenizer`: where the choices report log-probabilities, the tokenizer that shows their tokens;
        `streamed`: whether `add` builds stream chunks (a non-streamed answer is built once, by `response`)."""
        self.kind, self.model, self.jobs, self.queue = kind, model, jobs, queue
        self.prompt_tokens, self.start, self.metrics = prompt_tokens, start, metrics
        self.token_ids_in_choices = token_ids_in_choices
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts = list(echoes)
        self.echoes = echoes  # streamed with the first chunk of each choice
        self.token_ids: list[list[int]] = [[] for _ in jobs]
        self.reasons: list[str | None] = [None] * len(jobs)
        self.remaining = len(jobs)
        self.first_seen = False
        self.tokenizer = logprobs_tokenizer
        self.streamed = streamed
        self.logprobs: list[list] = [[] for _ in jobs]  # each choice's TokenLogprobs so far
        self.logprobs_sent = [0] * len(jobs)  # of those, how many a stream chunk has carried
        self.logprobs_offset = [0] * len(jobs)  # characters of those tokens' texts (completions' text_offset)

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    def add(self, index: int, event) -> dict | None:
        """Account one delivery (a StreamEvent); return the stream chunk for it (None if it carries nothing)."""
        if not self.first_seen and event.text:
            self.first_seen = True
            self.metrics.first_token_seconds.observe(time.perf_counter() - self.start)
        self.texts[index] += event.text
        self.token_ids[index] += event.token_ids
        self.logprobs[index] += getattr(event, "logprobs", None) or []
        if event.finish_reason is not None:
            self.reasons[index] = event.finish_reason
            self.remaining -= 1
            if self.finished:
                self.metrics.request_seconds.observe(time.perf_counter() - self.start)
        if not self.streamed or (not event.text and event.finish_reason is None):
            return None
        if self.kind == "chat":
            delta = {"content": event.text} if event.text else {}
            choice = {"index": index, "delta": delta, "logprobs": self._unsent_logprobs(index), "finish_reason": event.finish_reason}
        else:
            choice = {"index": index, "text": event.text, "logprobs": self._unsent_logprobs(index),
                      "finish_reason": event.finish_reason}
        return self.chunk([choice])

    def _logprobs_of(self, entries: list, offset: int = 0) -> dict | None:
        """A choice's "logprobs" for these of its tokens, the first at character `offset` of its text
        (None where the request asked for none)."""
        if self.tokenizer is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, self.tokenizer)
        return generated_completion_logprobs(entries, self.tokenizer, offset)

    def _unsent_logprobs(self, index: int) -> dict | None:
        """The "logprobs" of a choice's tokens that no stream chunk has carried yet (text held back by
        the detokeniser, e.g. a partial stop string, comes with a later chunk: so do its tokens)."""
        entries = self.logprobs[index][self.logprobs_sent[index]:]
        self.logprobs_sent[index] = len(self.logprobs[index])
        out = self._logprobs_of(entries, self.logprobs_offset[index])
        if out is not None and "tokens" in out:
            self.logprobs_offset[index] += sum(map(len, out["tokens"]))
        return out

    def opening_chunks(self) -> list[dict]:
        if self.kind == "chat":
            return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]) for i in range(len(self.jobs))]
        return [self.chunk([{"index": i, "text": e, "logprobs": None, "finish_reason": None}])
                for i, e in enumerate(self.echoes) if e]

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def usage(self) -> dict:
        completion = sum(map(len, self.token_ids))
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def response(self) -> dict:
        logprobs = [self._logprobs_of(entries) for entries in self.logprobs]
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp, "finish_reason": r}
                       for i, (t, r, lp) in enumerate(zip(self.texts, self.reasons, logprobs))]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": r}
                       for i, (t, r, lp) in enumerate(zip(self.texts, self.reasons, logprobs))]
            obj = "text_completion"
        if self.token_ids_in_choices:
            for choice, ids in zip(choices, self.token_ids):
                choice["token_ids"] = ids
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


def _with_presets(body, config: ServerConfig):
    """The body with its model id's preset fields filled in where the request leaves them out: an
    alias's, or, for a CoLD request to an adapter that has a tuned anti-expert, the pair's."""
    if body.model in config.aliases:
        settings = {k: v for k, v in config.aliases[body.model][1].items()
                    if k != "score" or body.reported_logprobs() is not None or getattr(body, "scores_prompt", False)}
    elif body.model in config.pairs and body.decoder in (None, "cold"):
        settings = config.pairs[body.model]
    else:
        return body
    return body.model_copy(update={k: v for k, v in settings.items() if k in type(body).model_fields and getattr(body, k) is None})


def _check_aliases(config: ServerConfig, backend) -> None:
    """ColdError for an alias that clashes with a served id, points at no served model, or presets a bad field."""
    served = {config.model_name, BASE_ALIAS, *backend.adapter_names}
    for alias, (target, settings) in config.aliases.items():
        if alias in served:
            raise ColdError(f"alias {alias!r} clashes with a served model id; choose another name")
        if target not in served:
            raise ColdError(f"alias {alias!r}: {target!r} is not a served model id ({', '.join(sorted(served))})")
        try:
            body = parse(CompletionRequest, json.dumps({**settings, "model": target, "prompt": "x"}).encode())
            decode_params(body, None if target in (config.model_name, BASE_ALIAS) else target)
        except ApiError as exc:
            raise ColdError(f"alias {alias!r}: {exc.message}") from None


def _scored_choice(index: int, scored, alternatives: int, extra: int, tokenizer) -> dict:
    """One choice of a scored prompt in the OpenAI shape: the prompt's tokens (and `extra` = 1 best next
    token) with their log-probabilities, the best `alternatives` at each position, and text offsets."""
    ids, chosen, tops = list(scored.token_ids), list(scored.token_logprobs), list(scored.top_logprobs[:-1])
    if extra:
        best_id, best = scored.top_logprobs[-1][0]
        ids, chosen, tops = ids + [best_id], chosen + [best], tops + [scored.top_logprobs[-1]]
    shown = [None] + [top[:alternatives] for top in tops[1:]]
    return {"index": index, "text": tokenizer.decode(ids), "finish_reason": "length",
            "logprobs": completion_logprobs(ids, chosen, shown, tokenizer)}


def _prompt_count(prompt) -> int:
    """How many prompts a completion request's `prompt` field holds (a string, token ids, or a list of either)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return 1
    return len(prompt)


def _job_error(failed: JobFailed) -> ApiError:
    return ApiError(failed.status, failed.message, code=failed.code)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Put _DISCONNECTED on the queue when the client of a non-streaming request goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait((-1, _DISCONNECTED))
            return


class _CountRequests:
    """ASGI middleware: count answered requests by endpoint and status code."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
