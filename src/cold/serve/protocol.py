"""The OpenAI request bodies the server accepts, and their translation into `DecodeParams`.

Bodies are parsed strictly (wrong types and unknown fields are 400s that name the field), so a
typo such as `"alpah": 0.2` is reported instead of silently ignored. Fields of the OpenAI API that
the server does not implement are refused with a message naming them, unless they hold their
neutral value (e.g. `presence_penalty: 0`, `logprobs: false`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from cold.params import (
    BETA_SCHEDULES,
    DECODERS,
    LOGPROB_SCORES,
    MAX_BETA,
    MAX_LOGPROBS,
    MAX_SCALE,
    SCORING_FORMS,
    DecodeParams,
    amateur_fields,
)


class ApiError(Exception):
    """An error answered as OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded",
             500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # CoLD extensions (the openai client sends them with extra_body=...)
    decoder: Literal[DECODERS] | None = None
    alpha: float | None = None
    beta: float | None = None
    scoring: Literal[SCORING_FORMS] | None = None
    beta_schedule: Literal[BETA_SCHEDULES] | None = None
    top_k: int | None = None
    expert_scale: float | None = None
    amateur: str | None = None  # a served adapter's model id: the amateur row runs that adapter
    amateur_scale: float | None = None
    score: Literal[LOGPROB_SCORES] | None = None  # whose log-probabilities `logprobs` reports (expert: the adapted model's)

    def reported_logprobs(self) -> int | None:
        """How many alternatives to report with each generated token's log-probability (None: none)."""
        raise NotImplementedError


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str | list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @property
    def scores_prompt(self) -> bool:
        """Scoring, not generating: echo the prompt with its log-probabilities (what lm-eval's
        log-likelihood requests send: echo, logprobs and max_tokens 0 or 1)."""
        return bool(self.echo) and (self.logprobs is not None or self.max_tokens == 0)

    def reported_logprobs(self) -> int | None:
        return None if self.scores_prompt else self.logprobs


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # echoed assistant messages carry refusal, annotations…
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    def reported_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Strict):
    """POST /tokenize (as vLLM's): a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    """POST /detokenize (as vLLM's)."""

    model: str | None = None
    tokens: list[int]


MAX_STOP = 16
MIN_TEMPERATURE = 1e-5  # below: greedy (dividing scores by a tinier number overflows)
MAX_TEMPERATURE = 100.0
CHAT_ROLES = ("system", "developer", "user", "assistant")


def parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Parse a JSON body; ApiError 400 naming the problem."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return ApiError(400, f"malformed JSON in the request body: {first['msg'].removeprefix('Invalid JSON: ')}",
                        code="invalid_json")
    if kind == "model_type" and not loc:
        return ApiError(400, "the request body must be a JSON object", code="invalid_json")
    path = ".".join(str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS))
    param = str(loc[0]) if loc else None
    if kind == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument: {path}", param=param, code="unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"missing required argument: {path}", param=param, code="missing_required_parameter")
    if param in _SHAPES:
        return ApiError(400, f"invalid value for {param}: expected {_SHAPES[param]}", param=param, code="invalid_type")
    return ApiError(400, f"invalid value for {path}: {first['msg']}", param=param, code="invalid_type")


_SHAPES = {
    "prompt": "a string, a list of token ids, or a list of those",
    "stop": "a string or a list of strings",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def refuse_unsupported(body: _Generation, max_n: int) -> None:
    """ApiError 400 for OpenAI features the server does not implement."""
    def refuse(field: str, why: str) -> None:
        raise ApiError(400, f"{field} is not supported by this server{why}", param=field, code="unsupported_parameter")

    if body.n is not None and not 1 <= body.n <= max_n:
        raise ApiError(400, f"n must be between 1 and {max_n}, got {body.n}", param="n", code="invalid_value")
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field) not in (None, 0, 0.0):
            refuse(field, " (only 0)")
    if body.logit_bias:
        refuse("logit_bias", "")
    _check_logprobs(body)
    if isinstance(body, CompletionRequest):
        if body.scores_prompt:
            _check_scoring(body)
        if body.best_of not in (None, 1) and body.best_of != body.n:
            refuse("best_of", " (only 1)")
        if body.suffix:
            refuse("suffix", "")
    else:
        if body.tools or body.functions:
            refuse("tools" if body.tools else "functions", " (no tool calling)")
        if body.tool_choice not in (None, "none") or body.function_call not in (None, "none"):
            refuse("tool_choice" if body.tool_choice not in (None, "none") else "function_call", " (no tool calling)")
        if body.response_format is not None and body.response_format.get("type") != "text":
            refuse("response_format", " (only {\"type\": \"text\"})")
        if body.modalities is not None and body.modalities != ["text"]:
            refuse("modalities", " (only [\"text\"])")


def _check_logprobs(body: _Generation) -> None:
    """Alternatives in range, and `score` only where log-probabilities are reported."""
    field = "top_logprobs" if isinstance(body, ChatRequest) else "logprobs"
    wanted = getattr(body, field)
    if wanted is not None and not 0 <= wanted <= MAX_LOGPROBS:
        raise ApiError(400, f"{field} must be in [0, {MAX_LOGPROBS}], got {wanted}", param=field, code="invalid_value")
    if isinstance(body, ChatRequest) and body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if body.score is not None and body.reported_logprobs() is None and not getattr(body, "scores_prompt", False):
        raise ApiError(400, "score chooses whose log-probabilities are reported: it needs logprobs"
                       + ("" if isinstance(body, ChatRequest) else " (or echo=true with logprobs, to score a prompt)"),
                       param="score", code="invalid_value")


def _check_scoring(body: CompletionRequest) -> None:
    """A scoring request: max_tokens 0 or 1, one choice, not streamed."""
    if body.max_tokens not in (0, 1):
        raise ApiError(400, f"echo with logprobs scores the prompt and at most one more token: max_tokens must be 0 or 1, "
                       f"got {body.max_tokens}", param="max_tokens", code="invalid_value")
    if body.stream:
        raise ApiError(400, "echo with logprobs cannot be streamed", param="stream", code="invalid_value")
    if body.n not in (None, 1):
        raise ApiError(400, "echo with logprobs gives one choice per prompt (n = 1)", param="n", code="invalid_value")


def decode_params(body: _Generation, adapter: str | None) -> DecodeParams:
    """DecodeParams for a request whose model id selected `adapter` (None: the base model).

    Greedy unless temperature >= 1e-5. The decoder defaults to "cold" for an adapter's model id and
    to "base" for the base model's id. max_new_tokens is filled in per prompt later.
    """
    # Bounds that keep every score finite: one request's NaN would fail the whole batch's step.
    _check_range(body.temperature, "temperature", lambda t: 0 <= t <= MAX_TEMPERATURE, f"in [0, {MAX_TEMPERATURE}] (0 = greedy)")
    _check_range(body.top_p, "top_p", lambda p: 0 < p <= 1, "in (0, 1]")
    _check_range(body.beta, "beta", lambda b: 0 <= b <= MAX_BETA, f"in [0, {MAX_BETA}]")
    _check_range(body.expert_scale, "expert_scale", lambda s: abs(s) <= MAX_SCALE, f"in [-{MAX_SCALE}, {MAX_SCALE}]")
    _check_range(body.amateur_scale, "amateur_scale", lambda s: abs(s) <= MAX_SCALE, f"in [-{MAX_SCALE}, {MAX_SCALE}]")
    if body.top_k is not None and not 0 <= body.top_k < 2**31:
        raise ApiError(400, f"top_k must be >= 0 (0 = off), got {body.top_k}", param="top_k", code="invalid_value")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise ApiError(400, f"seed must be in [0, 2**63), got {body.seed}", param="seed", code="invalid_value")
    if body.max_tokens is not None and body.max_tokens < 1 and not getattr(body, "scores_prompt", False):
        raise ApiError(400, f"max_tokens must be >= 1, got {body.max_tokens}", param="max_tokens", code="invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop", code="invalid_value")
    if any(s == "" for s in stop):
        raise ApiError(400, "stop strings must not be empty", param="stop", code="invalid_value")
    sample = body.temperature is not None and body.temperature >= MIN_TEMPERATURE
    changes = dict(
        decoder=body.decoder or ("cold" if adapter is not None else "base"),
        adapter=adapter,
        do_sample=sample,
        seed=body.seed,
        stop=tuple(stop),
    )
    if sample:
        changes.update(temperature=body.temperature)
        if body.top_p is not None:
            changes["top_p"] = body.top_p
        if body.top_k is not None:
            changes["top_k"] = body.top_k
    for field in ("alpha", "beta", "scoring", "beta_schedule", "expert_scale"):
        if getattr(body, field) is not None:
            changes[field] = getattr(body, field)
    if body.reported_logprobs() is not None:
        changes.update(logprobs=body.reported_logprobs(), logprob_score=body.score or "expert")
    if body.amateur is not None or body.amateur_scale is not None:
        if changes["decoder"] != "cold":
            field = "amateur" if body.amateur is not None else "amateur_scale"
            raise ApiError(400, f"{field} applies to the cold decoder only", param=field, code="invalid_value")
        changes.update(amateur_fields(body.amateur, body.amateur_scale))
    return DecodeParams(**changes)


def _check_range(value: float | None, name: str, ok, wanted: str) -> None:
    if value is not None and not (math.isfinite(value) and ok(value)):
        raise ApiError(400, f"{name} must be {wanted}, got {value}", param=name, code="invalid_value")


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as plain {"role", "content"} dicts for the tokenizer's chat template."""
    if not body.messages:
        raise ApiError(400, "messages must contain at least one message", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(body.messages):
        if m.role not in CHAT_ROLES:
            raise ApiError(400, f"messages.{i}.role: {m.role!r} is not supported (use one of {', '.join(CHAT_ROLES)})",
                           param="messages", code="invalid_value")
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"messages.{i}.content.{j}: only text parts are supported, got type {part.type!r}",
                                   param="messages", code="invalid_value")
                parts.append(part.text)
            content = "\n".join(parts)
        else:
            content = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out
