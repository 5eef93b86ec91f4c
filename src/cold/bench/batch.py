"""The step-mode runner over an engine's running batch, shared by our engine's and llama.cpp's CoLD
decoders (`cold.bench.cells`, `cold.bench.llamacpp`)."""

from __future__ import annotations

from cold.decoding.running import RunningBatch


class BatchRunner:
    """A runner over an engine's `RunningBatch`: `join` is the prefill, `.step()` the step. Subclasses
    set `engine` and `params`."""

    engine = params = batch = None
    tokens: list[list[int]] = []

    def prefill(self, prompts: list[list[int]]) -> None:
        requests = [self.engine.make_request(p, self.params) for p in prompts]
        self.batch = RunningBatch(self.engine.runner)
        self.batch.join(requests, list(range(len(requests))))
        self.tokens = [[] for _ in prompts]

    def step(self) -> None:
        for key, event in self.batch.step():
            self.tokens[key] += event.token_ids

    def finish(self) -> None:
        self.batch.drop(range(len(self.tokens)))  # a runner whose sequences hold resources (llama.cpp) frees them
        self.batch = None
