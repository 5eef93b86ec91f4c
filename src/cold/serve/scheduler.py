"""The server's decode loop: one thread owns the engine and runs continuous batching.

    scheduler = Scheduler(engine, max_batch=32, max_queue=256)
    scheduler.start()
    scheduler.submit([job, ...])      # from any thread; raises QueueFull when the queue is full
    scheduler.cancel([job, ...])      # the client went away: leave the queue / the batch
    scheduler.stop()

Between decode steps the thread drops cancelled sequences, lets queued jobs join the running
batch (up to `max_batch` live sequences), then runs one step and hands each job its new text
through the job's `deliver` callback (which must be thread-safe, e.g. `loop.call_soon_threadsafe`).
The engine is never touched from any other thread while the scheduler runs.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cold.decoding.running import RunningBatch
from cold.serve.metrics import Metrics

log = logging.getLogger("cold.serve.app")

_keys = itertools.count()


class QueueFull(Exception):
    """More jobs wait than the server accepts."""


@dataclass(eq=False)
class Job:
    """One sequence to decode for a client.

    deliver(item) is called from the scheduler thread with a `cold.decoding.engine.StreamEvent`, or with a
    `JobFailed` when the job cannot finish; it must not block.
    """

    request: object  # cold.decoding.engine.Request
    deliver: Callable[[object], None]
    index: int = 0  # the choice index within its HTTP request
    key: int = field(default_factory=lambda: next(_keys))
    done: bool = False  # finished, failed or cancelled: no more deliveries


@dataclass
class JobFailed:
    message: str
    status: int = 500  # the HTTP status to answer with: 500 engine failure, 503 shutting down


class Scheduler:
    def __init__(self, engine, max_batch: int = 32, max_queue: int = 256, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()  # waiting to join, oldest first
        self._cancelled: set[int] = set()  # keys of live jobs to drop before the next step
        self._live: dict[int, Job] = {}  # key -> job in the running batch (scheduler thread only)
        self._running = 0  # len(self._live), readable from other threads
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- any thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cold-scheduler", daemon=True)
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
        """Forget jobs whose client went away: queued ones never start, running ones free their rows."""
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
            self._cancelled |= {j.key for j in jobs if not j.done}
            self._cond.notify_all()

    # ---- scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        batch = RunningBatch(self.engine)
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._live or self._cancelled):
                    self._cond.wait()
                if self._stopping:
                    break
                gone = [k for k in self._cancelled if k in self._live]
                self._cancelled.clear()
                live = len(self._live) - len(gone)
                room = self.max_batch - live
                if live and not batch.joinable:
                    room = 0  # sliding-window caches (Gemma): queued jobs wait for the batch to finish
                joining = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                self.metrics.queue_length.set(len(self._pending))
            try:
                self._drop(batch, gone)
                self._join(batch, joining)
                if self._live:
                    self._step(batch)
            except Exception as exc:  # an engine failure must not kill the server
                log.exception("decode step failed; failing the %d running request(s)", len(self._live) + len(joining))
                for job in [*self._live.values(), *joining]:
                    self._fail(job, f"internal error while decoding: {type(exc).__name__}: {exc}")
                self._live.clear()
                batch = RunningBatch(self.engine)
            self._running = len(self._live)
            self.metrics.running.set(self._running)
        with self._cond:  # shutting down: nobody will decode what is left
            leftover = [*self._pending, *self._live.values()]
            self._pending.clear()
        for job in leftover:
            self._fail(job, "the server is shutting down", 503)
        self._live.clear()
        self._running = 0

    def _drop(self, batch: RunningBatch, keys: list[int]) -> None:
        if not keys:
            return
        batch.drop(keys)
        for key in keys:
            self._live.pop(key).done = True
        self.metrics.cancelled.inc(len(keys))
        log.info("dropped %d sequence(s) whose client went away", len(keys))

    def _join(self, batch: RunningBatch, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.done]
        if not jobs:
            return
        start = time.perf_counter()
        batch.join([j.request for j in jobs], [j.key for j in jobs])
        self.metrics.prefill_seconds.observe(time.perf_counter() - start)
        for job in jobs:
            self._live[job.key] = job

    def _step(self, batch: RunningBatch) -> None:
        start = time.perf_counter()
        events = batch.step()
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(len(events))
        for key, event in events:
            job = self._live[key]
            self.metrics.completion_tokens.inc(len(event.token_ids))
            if event.finish_reason is not None:
                del self._live[key]
                job.done = True
            _deliver(job, event)

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        if not job.done:
            job.done = True
            _deliver(job, JobFailed(message, status))


def _deliver(job: Job, item) -> None:
    try:
        job.deliver(item)
    except Exception:  # the client's event loop is gone: nothing to tell
        log.debug("could not deliver to job %s", job.key, exc_info=True)
