"""What the HTTP app needs of a decoder: the `Backend` interface, its `Job`s and the thread that decodes them.

    backend = EngineBackend(engine)                    # or VllmBackend(llm, lora)
    worker = backend.worker(max_batch=32, max_queue=256, metrics=metrics)
    worker.start()
    worker.submit([Job(backend.make_request(ids, params), deliver), ...])   # QueueFull when full
    worker.cancel(jobs)                                # the client went away
    worker.stop()

A backend knows the model (tokenizer, adapters, context, vocabulary), turns prompt ids and
`DecodeParams` into its own request objects (each with `prompt_ids`), says which request fields it
does not offer, and makes the `DecodeThread` that owns the model. The thread calls each job's
`deliver` with items that have `text`, `token_ids` and `finish_reason` (the last one set), or with
a `JobFailed`.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cold.serve.metrics import Metrics

log = logging.getLogger("cold.serve.app")

_keys = itertools.count()


class QueueFull(Exception):
    """More jobs wait than the server accepts."""


@dataclass(eq=False)
class Job:
    """One sequence to decode for a client.

    deliver(item) is called from the decode thread with new output (a `cold.decoding.engine.StreamEvent`
    or anything with `text`, `token_ids`, `finish_reason`), or with a `JobFailed` when the job cannot
    finish; it must not block.
    """

    request: object  # the backend's request: `prompt_ids` and what it decodes with
    deliver: Callable[[object], None]
    index: int = 0  # the choice index within its HTTP request
    key: int = field(default_factory=lambda: next(_keys))
    done: bool = False  # finished, failed or cancelled: no more deliveries


@dataclass
class ScoreRequest:
    """A prompt to score rather than continue (echo with logprobs): the decode thread answers it with
    its `cold.types.SequenceLogprobs`."""

    prompt_ids: list[int]
    params: object  # the DecodeParams of the decoder whose log-probabilities are reported
    top: int  # alternatives per position


@dataclass
class JobFailed:
    message: str
    status: int = 500  # the HTTP status to answer with: 500 decoder failure, 503 shutting down
    code: str | None = None  # the error's `code` in the response


class Backend:
    """A decoder the app serves. Subclasses set the attributes and implement the methods that raise."""

    name = ""  # "cold" or "vllm": /health's "engine"
    max_n: int | None = None  # the most choices per request it offers (None: as ServerConfig.max_n)
    token_ids_in_choices = False  # non-streaming choices carry their generated "token_ids"
    scores_prompts = False  # it answers `ScoreRequest`s (echo with logprobs)

    tokenizer = None  # a transformers tokenizer (chat template, decode)
    adapter_names: list[str] = []  # served model ids besides the base model
    context_length = 0  # prompt + completion tokens, at most
    vocab_size = 0  # prompt token ids must be below this

    def encode(self, text: str) -> list[int]:
        """The token ids of a completion prompt given as text."""
        raise NotImplementedError

    def refuse(self, body) -> None:
        """ApiError for request fields this backend does not offer (after `refuse_unsupported`)."""

    def make_request(self, prompt_ids: list[int], params) -> object:
        """The request one job decodes (with `prompt_ids`); ColdError for parameters it cannot decode."""
        raise NotImplementedError

    def make_score_request(self, prompt_ids: list[int], params, top: int) -> ScoreRequest:
        """A checked `ScoreRequest` (where `scores_prompts`); ColdError for parameters it cannot score with."""
        raise NotImplementedError

    def worker(self, max_batch: int, max_queue: int, metrics: Metrics) -> DecodeThread:
        """A new (not started) thread that owns the model and decodes submitted jobs."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds (after serving)."""


class DecodeThread:
    """A bounded queue of jobs and the one thread that decodes them; subclasses write `_loop`.

    `_loop` waits on `_cond` for `_pending` jobs, returns once `_stopping` is set, and keeps
    `_running` (sequences being decoded) up to date. The base class fails what is left with 503.
    """

    thread_name = "cold-decoder"

    def __init__(self, max_queue: int = 256, metrics: Metrics | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()  # waiting to be decoded, oldest first
        self._running = 0  # sequences being decoded, readable from other threads
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- any thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none); QueueFull when they do not fit."""
        with self._cond:
            if not self.alive:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(
                    f"the request queue is full ({len(self._pending)} waiting, at most {self.max_queue}); retry later"
                )
            self._pending.extend(jobs)
            self.metrics.queue_length.set(len(self._pending))
            self._cond.notify_all()

    def cancel(self, jobs: list[Job]) -> None:
        """Forget jobs whose client went away: queued ones never start; running ones go to `_cancel_running`."""
        with self._cond:
            mine = {j.key for j in jobs if not j.done}
            if not mine:
                return
            kept = [j for j in self._pending if j.key not in mine]
            for j in self._pending:
                if j.key in mine:
                    j.done = True
                    self.metrics.cancelled.inc()
            self._pending = deque(kept)
            self.metrics.queue_length.set(len(self._pending))
            self._cancel_running({j.key for j in jobs if not j.done})
            self._cond.notify_all()

    # ---- the decode thread ----------------------------------------------------------------

    def _cancel_running(self, keys: set[int]) -> None:
        """Called under `_cond` with the keys of cancelled jobs that already left the queue."""

    def _loop(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        self._loop()
        with self._cond:  # shutting down: nobody will decode what is left
            leftover = [*self._pending, *self._leftover()]
            self._pending.clear()
        for job in leftover:
            self._fail(job, "the server is shutting down", 503)
        self._running = 0

    def _leftover(self) -> list[Job]:
        """Jobs still being decoded when the loop returned (failed with 503)."""
        return []

    def _fail(self, job: Job, message: str, status: int = 500, code: str | None = None) -> None:
        if not job.done:
            job.done = True
            deliver(job, JobFailed(message, status, code))


def deliver(job: Job, item) -> None:
    try:
        job.deliver(item)
    except Exception:  # the client's event loop is gone: nothing to tell
        log.debug("could not deliver to job %s", job.key, exc_info=True)
