"""The backend over this package's `Engine`: its requests are decoded by the continuous-batching `Scheduler`.

    app = create_app(EngineBackend(Engine.load("smollm2", {"gsm8k": "adapters/smollm2-gsm8k"})), ServerConfig())

Offers everything the app does: streaming, n > 1, expert_scale, an adapter as the amateur.
"""

from __future__ import annotations

from cold.serve.backend import Backend, ScoreRequest
from cold.serve.metrics import Metrics
from cold.serve.scheduler import Scheduler


class EngineBackend(Backend):
    name = "cold"

    def __init__(self, engine, name: str = "cold"):
        self.engine, self.name = engine, name  # name: "cold" or "llamacpp", /health's "engine"
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.vocab_size
        self.scores_prompts = hasattr(engine.runner, "sequence_logits")  # llama.cpp's runner keeps no logits of prompts

    @property
    def adapter_names(self) -> list[str]:
        return self.engine.adapter_names

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)[1]

    def make_request(self, prompt_ids: list[int], params):
        return self.engine.make_request(prompt_ids, params)

    def make_score_request(self, prompt_ids: list[int], params, top: int) -> ScoreRequest:
        self.engine.make_request(prompt_ids, params.with_(max_new_tokens=1))  # validates and resolves the adapters
        return ScoreRequest(list(prompt_ids), params.with_(max_new_tokens=1), top)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def worker(self, max_batch: int, max_queue: int, metrics: Metrics) -> Scheduler:
        return Scheduler(self.engine, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
