"""The backend whose CoLD runs inside vLLM (`cold serve --engine vllm`): online, on vLLM's async engine.

    backend = VllmBackend.load("smollm2", {"smollm2-gsm8k": "path/to/lora"}, dtype="float32")
    app = create_app(backend, ServerConfig(model_name="smollm2"))

One worker thread runs an event loop that owns the `AsyncLLM`. Each job becomes a task that
streams its prompt through `cold.vllm.online.OnlinePairs`: a CoLD pair joins vLLM's running batch
as soon as both of its rows fit (continuous batching), and every piece of text is delivered as
soon as both rows have produced it. A pair that falls out of step is retried once, then answered
500 (`cold_pair_failed`); both are counted in /metrics.

An anti-expert served beside its expert (`cold serve --engine vllm --adapter cf50=DIR --adapter
cf50-selfneg=DIR2`, or a shipped pair) is the amateur CoLD requests may name (`"amateur":
"cf50-selfneg"`; a pair's tuned setting is preset as with the default engine); it can also be asked
for as a model of its own.

Not offered: expert_scale, an amateur at another scale than 1 (or the expert's own adapter at a
scale), logprobs on generated tokens, scoring prompts; each is a 400 that names it. Importing this
module does not import vLLM.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from cold.errors import ColdError
from cold.params import DecodeParams, amateur_fields
from cold.serve.backend import Backend, DecodeThread, Job, deliver
from cold.serve.metrics import Metrics
from cold.serve.protocol import ApiError
from cold.vllm.online import OnlinePairs, PairBroken

log = logging.getLogger("cold.serve.vllm_backend")


@dataclass
class VllmRequest:
    prompt_ids: list[int]
    params: object  # cold.params.DecodeParams, max_new_tokens set


class VllmBackend(Backend):
    name = "vllm"
    token_ids_in_choices = True

    def __init__(self, engine, lora, amateur=None):
        """`engine`: a `vllm.v1.engine.async_llm.AsyncLLM` (`cold.vllm.generate.make_async_llm`); `lora`:
        the LoRARequest served under its name (None: the base model only); `amateur`: an amateur
        adapter's LoRARequest, served under its name too. `close()` shuts the engine down."""
        self.engine, self.lora = engine, lora
        self.tokenizer = engine.get_tokenizer()
        model_config = engine.vllm_config.model_config
        self.context_length = model_config.max_model_len
        self.vocab_size = min(len(self.tokenizer), model_config.get_vocab_size())
        self.adapter_names = [r.lora_name for r in (lora, amateur) if r is not None]
        self.pairs = OnlinePairs(engine, lora, amateur)  # used from the worker's event loop only

    @classmethod
    def load(cls, model: str, adapters: dict[str, str], dtype: str = "float32", amateur: str | None = None,
             **options) -> VllmBackend:
        """Start vLLM's async engine with the expert adapter and, named by `amateur`, its amateur
        (`adapters`: name -> directory, at most these two); `options` go to `make_async_llm`."""
        from cold.vllm.generate import make_async_llm
        from cold.vllm.generator import quiet_vllm_logs

        quiet_vllm_logs()
        experts = [name for name in adapters if name != amateur]
        if len(experts) > 1:
            raise ColdError("--engine vllm takes one adapter, the expert, and optionally its anti-expert "
                            f"(a `cold anti-expert` directory naming it); got {', '.join(adapters)}")
        name = experts[0] if experts else None
        return cls(*make_async_llm(model, adapters.get(name), adapter_name=name, amateur_adapter=adapters.get(amateur),
                                   amateur_name=amateur, dtype=dtype, **options))

    def close(self) -> None:
        self.engine.shutdown()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def refuse(self, body) -> None:
        if body.expert_scale not in (None, 1, 1.0):
            raise ApiError(400, "expert_scale is not supported by the vLLM engine", param="expert_scale", code="unsupported_parameter")
        if body.amateur is not None or body.amateur_scale is not None:
            try:
                self.pairs.amateur_row(DecodeParams(decoder="cold", **amateur_fields(body.amateur, body.amateur_scale)))
            except ColdError as exc:
                raise ApiError(400, str(exc), param="amateur" if body.amateur is not None else "amateur_scale",
                               code="unsupported_parameter") from None
        if body.reported_logprobs() is not None:
            raise ApiError(400, "logprobs on generated tokens are not offered by `cold serve --engine vllm`", param="logprobs",
                           code="unsupported_parameter")

    def make_request(self, prompt_ids: list[int], params) -> VllmRequest:
        params.validate()
        if params.num_beams > 1:
            raise ColdError("beam search is not offered by the vLLM engine")
        self.pairs.check(prompt_ids, params)  # a request vLLM's limits could never admit is a 400 now
        return VllmRequest(list(prompt_ids), params)

    def worker(self, max_batch: int, max_queue: int, metrics: Metrics) -> VllmWorker:
        return VllmWorker(self, max_batch=max_batch, max_queue=max_queue, metrics=metrics)


class VllmWorker(DecodeThread):
    """Owns the async engine: an event loop in this thread, one task per job (up to `max_batch` at once)."""

    thread_name = "cold-vllm-worker"

    def __init__(self, backend: VllmBackend, max_batch: int = 32, max_queue: int = 256, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        super().__init__(max_queue, metrics)
        self.backend, self.max_batch = backend, max_batch
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: dict[int, tuple[Job, asyncio.Task]] = {}  # job key -> its job and task (this thread only)

    # ---- any thread -------------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        super().submit(jobs)
        self._poke()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
        self._poke()
        super().stop(timeout)

    def _cancel_running(self, keys: set[int]) -> None:
        if self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self._cancel_tasks, keys)

    def _poke(self) -> None:
        if self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self._wake.set)

    # ---- the worker thread ------------------------------------------------------------------

    def _loop(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._wake = asyncio.Event()
        self._event_loop = asyncio.get_running_loop()
        self.backend.pairs.on_broken = self.metrics.broken_pairs.inc
        while True:
            with self._cond:
                if self._stopping:
                    break
                room = self.max_batch - len(self._tasks)
                jobs = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                self.metrics.queue_length.set(len(self._pending))
            for job in jobs:
                if not job.done:
                    self._tasks[job.key] = (job, asyncio.create_task(self._decode(job)))
            self._running = len(self._tasks)
            self.metrics.running.set(self._running)
            await self._wake.wait()
            self._wake.clear()
        tasks = [task for _, task in self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each aborts its vLLM requests

    def _leftover(self) -> list[Job]:
        return [job for job, _ in self._tasks.values() if not job.done]

    def _cancel_tasks(self, keys: set[int]) -> None:
        for key in keys:
            if key in self._tasks:
                self._tasks[key][1].cancel()
                self.metrics.cancelled.inc()

    async def _decode(self, job: Job) -> None:
        request = job.request
        try:
            async for event in self.backend.pairs.stream(request.prompt_ids, request.params):
                self.metrics.completion_tokens.inc(len(event.token_ids))
                if event.finish_reason is not None:
                    job.done = True
                deliver(job, event)
        except asyncio.CancelledError:
            pass  # the client went away, or the server is stopping (the job is failed with 503 then)
        except PairBroken as exc:
            self.metrics.failed_pairs.inc()
            log.error("%s", exc)
            self._fail(job, str(exc), code="cold_pair_failed")
        except ColdError as exc:
            self._fail(job, str(exc), 400, "invalid_value")
        except Exception as exc:  # noqa: BLE001 - the worker must keep serving
            log.exception("vLLM decoding failed")
            self._fail(job, f"vLLM failed: {type(exc).__name__}: {exc}")
        finally:
            if not self._stopping:
                self._tasks.pop(job.key, None)
                self._running = len(self._tasks)
                self.metrics.running.set(self._running)
                self._wake.set()
