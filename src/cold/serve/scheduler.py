"""The engine's decode thread: one thread owns the engine and runs continuous batching.

    scheduler = Scheduler(engine, max_batch=32, max_queue=256)
    scheduler.start()
    scheduler.submit([job, ...])      # from any thread; raises QueueFull when the queue is full
    scheduler.cancel([job, ...])      # the client went away: leave the queue / the batch
    scheduler.stop()

Between decode steps the thread answers queued scoring jobs (`ScoreRequest`: echo with logprobs),
drops cancelled sequences, lets queued jobs join the running batch (up to `max_batch` live
sequences), then runs one step and hands each job its new text
through the job's `deliver` callback (which must be thread-safe, e.g. `loop.call_soon_threadsafe`).
The engine is never touched from any other thread while the scheduler runs.
"""

from __future__ import annotations

import logging
import time

from cold.decoding.running import RunningBatch
from cold.errors import ColdError
from cold.serve.backend import DecodeThread, Job, JobFailed, QueueFull, ScoreRequest, deliver
from cold.serve.metrics import Metrics

__all__ = ["Job", "JobFailed", "QueueFull", "Scheduler"]

log = logging.getLogger("cold.serve.app")


class Scheduler(DecodeThread):
    thread_name = "cold-scheduler"

    def __init__(self, engine, max_batch: int = 32, max_queue: int = 256, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        super().__init__(max_queue, metrics)
        self.engine = engine
        self.max_batch = max_batch
        self._cancelled: set[int] = set()  # keys of live jobs to drop before the next step
        self._live: dict[int, Job] = {}  # key -> job in the running batch (scheduler thread only)

    def _cancel_running(self, keys: set[int]) -> None:
        self._cancelled |= keys

    # ---- scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        batch = RunningBatch(self.engine.runner)
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
            scoring = [j for j in joining if isinstance(j.request, ScoreRequest)]
            joining = [j for j in joining if not isinstance(j.request, ScoreRequest)]
            try:
                self._score(scoring)
                self._drop(batch, gone)
                self._join(batch, joining)
                if self._live:
                    self._step(batch)
            except Exception as exc:  # an engine failure must not kill the server
                log.exception("decode step failed; failing the %d running request(s)", len(self._live) + len(joining))
                for job in [*self._live.values(), *joining, *scoring]:
                    self._fail(job, f"internal error while decoding: {type(exc).__name__}: {exc}")
                self._live.clear()
                reset = getattr(self.engine.runner, "reset", None)
                if reset is not None:  # a runner whose sequences live outside the batch state (llama.cpp)
                    reset()
                batch = RunningBatch(self.engine.runner)
            self._running = len(self._live)
            self.metrics.running.set(self._running)

    def _leftover(self) -> list[Job]:
        jobs = list(self._live.values())
        self._live.clear()
        return jobs

    def _score(self, jobs: list[Job]) -> None:
        """Answer scoring jobs (echo with logprobs) between decode steps: one forward pass each."""
        for job in jobs:
            if job.done:
                continue
            request = job.request
            scored = self.engine.logprobs([request.prompt_ids], request.params, top=request.top)[0]
            job.done = True
            deliver(job, scored)

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
        try:
            batch.join([j.request for j in jobs], [j.key for j in jobs])
        except ColdError as exc:  # these requests cannot run now (llama.cpp's KV cells are full): the batch is unchanged
            log.warning("could not start %d request(s): %s", len(jobs), exc)
            for job in jobs:
                self._fail(job, str(exc), 503, "capacity")
            return
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
            deliver(job, event)

