"""The backend whose CoLD runs inside vLLM (`cold serve --engine vllm`): batch-synchronous decoding with `cold.vllm.generate`.

    backend = VllmBackend.load("smollm2", {"smollm2-gsm8k": "path/to/lora"}, dtype="float32")
    app = create_app(backend, ServerConfig(model_name="smollm2"))

One worker thread owns the `vllm.LLM`. It takes every job that has arrived (up to `max_batch`),
groups them by decoding settings and decodes each group with one `cold.vllm.generate` call (pairs
added while vLLM's scheduler is paused, so they are admitted together); jobs arriving meanwhile
wait for the next round, so a new request does not join a running batch mid-way. Each job gets
its whole answer as one delivery.

Not offered: streaming, n > 1, expert_scale, amateur / amateur_scale; each is a 400 that names it.
Importing this module does not import vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cold.errors import ColdError
from cold.serve.backend import Backend, DecodeThread, Job, deliver
from cold.serve.metrics import Metrics
from cold.serve.protocol import ApiError
from cold.vllm.generate import generate
from cold.vllm.generator import VllmGenerator

log = logging.getLogger("cold.serve.vllm_backend")


@dataclass
class VllmRequest:
    prompt_ids: list[int]
    params: object  # cold.params.DecodeParams, max_new_tokens set
    group: tuple = field(init=False)  # requests with equal groups are decoded by one generate() call

    def __post_init__(self):
        p = self.params
        self.group = (p.decoder, p.alpha, p.beta, p.scoring, p.stop, p.do_sample, p.temperature, p.top_k, p.top_p,
                      p.seed, p.max_new_tokens)


class VllmBackend(Backend):
    name = "vllm"
    max_n = 1
    token_ids_in_choices = True

    def __init__(self, llm, lora, on_close=None):
        """`lora` is the LoRARequest served under its name (None: the base model only)."""
        self.llm, self.lora, self.on_close = llm, lora, on_close
        self.tokenizer = llm.get_tokenizer()
        model_config = llm.llm_engine.vllm_config.model_config
        self.context_length = model_config.max_model_len
        self.vocab_size = min(len(self.tokenizer), model_config.get_vocab_size())
        self.adapter_names = [lora.lora_name] if lora is not None else []

    @classmethod
    def load(cls, model: str, adapters: dict[str, str], dtype: str = "float32") -> VllmBackend:
        """Start vLLM with the (single) adapter; `close()` shuts it down."""
        generator = VllmGenerator(model, adapters, dtype)
        return cls(generator.llm, generator.lora, on_close=generator.close)

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def refuse(self, body) -> None:
        if body.stream:
            raise ApiError(400, "stream is not supported by `cold serve --engine vllm`", param="stream", code="unsupported_parameter")
        if body.expert_scale not in (None, 1, 1.0):
            raise ApiError(400, "expert_scale is not supported by the vLLM engine", param="expert_scale", code="unsupported_parameter")
        for name in ("amateur", "amateur_scale"):
            if getattr(body, name) is not None:
                raise ApiError(400, f"{name} is not supported by the vLLM engine", param=name, code="unsupported_parameter")
        if body.reported_logprobs() is not None:
            raise ApiError(400, "logprobs on generated tokens are not offered by `cold serve --engine vllm`", param="logprobs",
                           code="unsupported_parameter")

    def make_request(self, prompt_ids: list[int], params) -> VllmRequest:
        params.validate()
        return VllmRequest(list(prompt_ids), params)

    def worker(self, max_batch: int, max_queue: int, metrics: Metrics) -> VllmWorker:
        return VllmWorker(self.llm, self.lora, max_batch=max_batch, max_queue=max_queue, metrics=metrics)


class VllmWorker(DecodeThread):
    """Owns the LLM: takes the queued jobs, decodes each settings group with `cold.vllm.generate`."""

    thread_name = "cold-vllm-worker"

    def __init__(self, llm, lora, max_batch: int = 32, max_queue: int = 256, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        super().__init__(max_queue, metrics)
        self.llm, self.lora, self.max_batch = llm, lora, max_batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._pending):
                    self._cond.wait()
                if self._stopping:
                    break
                batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
                self.metrics.queue_length.set(len(self._pending))
                self._running = len(batch)
            self.metrics.running.set(self._running)
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.request.group, []).append(job)
            for jobs in groups.values():
                self._decode(jobs)
            self._running = 0
            self.metrics.running.set(0)

    def _decode(self, jobs: list[Job]) -> None:
        p = jobs[0].request.params
        try:
            out = generate(self.llm, [j.request.prompt_ids for j in jobs], self.lora, decoder=p.decoder, alpha=p.alpha,
                           beta=p.beta, scoring=p.scoring, max_tokens=p.max_new_tokens, stop=p.stop,
                           do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
        except ColdError as exc:
            log.error("vLLM decoding failed: %s", exc)
            for job in jobs:
                self._fail(job, str(exc), code="cold_pair_failed")
            return
        except Exception as exc:  # noqa: BLE001 - the thread must keep serving
            log.exception("vLLM decoding failed")
            for job in jobs:
                self._fail(job, f"vLLM failed: {type(exc).__name__}: {exc}")
            return
        for job, generation in zip(jobs, out):  # a Generation: text, token_ids, finish_reason
            self.metrics.completion_tokens.inc(len(generation.token_ids))
            if not job.done:
                job.done = True
                deliver(job, generation)
