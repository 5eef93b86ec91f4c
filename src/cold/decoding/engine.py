"""`Engine`: the public face of decoding — load a model and adapters, check requests, decode them.

    engine = Engine.load("smollm2", adapters={"gsm8k": "adapters/smollm2-gsm8k"})
    for g in engine.generate(["2+2="], decoder="cold", alpha=0.1, beta=0.5, max_new_tokens=32):
        print(g.text, g.finish_reason)

The work is done below it: `cold.runner.ModelRunner` runs the model, `cold.decoding.running`
(greedy / sampling, continuous batching) and `cold.decoding.beam` run the decode loops over it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from cold.decoding.beam import beam_search
from cold.decoding.running import decode
from cold.errors import ColdError
from cold.load.adapters import LoraAdapter, read_adapter
from cold.load.models import DEFAULT_MODEL, BaseModel, load_base, pick_dtype
from cold.load.prompts import Prompt, check_fits, encode_prompt
from cold.params import MAX_LOGPROBS, DecodeParams
from cold.runner.model_runner import DEFAULT_COBATCH_STEPS, ModelRunner
from cold.runner.rows import layout_of
from cold.sampling.scoring import OUTSIDE_PENALTY, cold_log_probs
from cold.types import Generation, Request, SequenceLogprobs, StreamEvent, TokenLogprob

__all__ = ["Engine", "Generation", "Prompt", "Request", "SequenceLogprobs", "StreamEvent", "TokenLogprob"]

class Engine:
    """A base model with row-indexed LoRA adapters installed, ready to decode."""

    def __init__(
        self, base: BaseModel, adapters: Sequence[LoraAdapter] = (), lean: bool = True,
        kv_dtype: str | torch.dtype | None = None, cobatch_steps: int = DEFAULT_COBATCH_STEPS,
    ):
        """`lean=False` runs every step through transformers' forward (see `ModelRunner`);
        `kv_dtype`: the dtype the KV cache stores (None: the model's); `cobatch_steps`: the lazy
        amateur's policy (see `ModelRunner`; `ALWAYS` from `cold.sampling.amateur` turns it off)."""
        self.base = base
        self.runner = ModelRunner(base, adapters, lean=lean, kv_dtype=kv_dtype, cobatch_steps=cobatch_steps)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        adapters: Mapping[str, str | Path] | Sequence[str | Path] = (),
        device: str | None = "cpu",
        dtype: str | torch.dtype | None = None,
        lean: bool = True,
        kv_dtype: str | torch.dtype | None = None,
        cobatch_steps: int = DEFAULT_COBATCH_STEPS,
    ) -> "Engine":
        """Load a base model and adapters. Adapter files are read and checked before the model loads."""
        items = adapters.items() if isinstance(adapters, Mapping) else [(None, p) for p in adapters]
        read = [read_adapter(path, name) for name, path in items]
        if kv_dtype is not None:
            pick_dtype(kv_dtype)  # a bad name fails before the model loads
        return cls(load_base(model, device=device, dtype=dtype), read, lean=lean, kv_dtype=kv_dtype,
                   cobatch_steps=cobatch_steps)

    # ---- what front-ends read -----------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def eos_ids(self) -> set[int]:
        return self.runner.eos_ids

    @property
    def pad_id(self) -> int:
        return self.runner.pad_id

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def lean(self):
        return self.runner.lean

    @property
    def kv_dtype(self) -> torch.dtype | None:
        return self.runner.kv_dtype

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[LoraAdapter]:
        return self.runner.adapters

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def set_adapters(self, adapters: list[LoraAdapter]) -> None:
        """Install exactly these adapters (validated first; on error nothing changes)."""
        self.runner.set_adapters(adapters)

    def add_adapter(self, path: str | Path, name: str | None = None) -> LoraAdapter:
        adapter = read_adapter(path, name)
        self.set_adapters([*self.adapters, adapter])
        return adapter

    def adapter_index(self, name: str | None, decoder: str) -> int:
        """The stack index of adapter `name` (None: the only loaded one)."""
        names = self.adapter_names
        if name is None:
            if len(names) == 1:
                return 0
            if not names:
                raise ColdError(f"decoder {decoder!r} needs a LoRA adapter and none is loaded (give one with --adapter DIR)")
            raise ColdError(f"several adapters are loaded ({', '.join(names)}); name one")
        if name not in names:
            raise ColdError(f"unknown adapter {name!r}; loaded: {', '.join(names) or 'none'}")
        return names.index(name)

    # ---- requests -------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, chat: bool = False) -> tuple[str, list[int]]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def make_request(self, prompt: Prompt, params: DecodeParams, chat: bool = False) -> Request:
        """A checked request: parameters validated, prompt encoded and sized, adapters resolved."""
        params.validate()
        text, ids = self.encode(prompt, chat)
        check_fits(len(ids), params.max_new_tokens, self.context_length)
        request = Request(prompt=text, prompt_ids=ids, params=params)
        if params.decoder != "base":
            request.expert_adapter = self.adapter_index(params.adapter, params.decoder)
        if params.contrastive and params.amateur_scale != 0:
            request.amateur_adapter = self.adapter_index(params.amateur_adapter or params.adapter, params.decoder)
        return request

    def make_requests(self, prompts, params: DecodeParams | None, chat: bool, overrides: dict) -> list[Request]:
        params = (params or DecodeParams()).with_(**overrides)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ColdError("no prompts given")
        return [self.make_request(p, params, chat) for p in prompts]

    # ---- generation -----------------------------------------------------------------------------

    def generate(self, prompts, params: DecodeParams | None = None, *, chat: bool = False, **overrides) -> list[Generation]:
        """Decode a batch of prompts; keyword arguments override fields of `params`."""
        requests = self.make_requests(prompts, params, chat, overrides)
        ids: list[list[int]] = [[] for _ in requests]
        texts = [""] * len(requests)
        reasons: list[str | None] = [None] * len(requests)
        amateur: list[int | None] = [None] * len(requests)
        logprobs = [[] if r.params.logprobs is not None else None for r in requests]
        for event in self.run(requests):
            ids[event.index] += event.token_ids
            texts[event.index] += event.text
            if event.logprobs:
                logprobs[event.index] += event.logprobs
            reasons[event.index] = event.finish_reason or reasons[event.index]
            if event.amateur_steps is not None:
                amateur[event.index] = event.amateur_steps
        return [
            Generation(prompt=r.prompt, text=t, token_ids=i, finish_reason=f, prompt_tokens=len(r.prompt_ids),
                       amateur_steps=a, logprobs=lp)
            for r, t, i, f, a, lp in zip(requests, texts, ids, reasons, amateur, logprobs)
        ]

    def stream(self, prompts, params: DecodeParams | None = None, *, chat: bool = False, **overrides) -> Iterator[StreamEvent]:
        """Like `generate`, but yields text as it is produced."""
        return self.run(self.make_requests(prompts, params, chat, overrides))

    def logprobs(self, sequences: Sequence[Sequence[int]], params: DecodeParams | None = None, *, top: int = 0,
                 penalty: float = OUTSIDE_PENALTY, batch_size: int = 4, **overrides) -> list[SequenceLogprobs]:
        """How likely a decoder finds token sequences: each token given those before it, and the `top`
        most likely tokens at each position and after the last (keyword arguments override `params`).

        decoder "expert" or "base": the log-softmax of that model's logits. "cold": the CoLD score's
        (alpha, beta, scoring and the amateur of `params`), by `cold.sampling.scoring.cold_log_probs`:
        inside the plausible set the log-softmax of the score over it, outside it the expert's own
        log-probability minus `penalty`. Sequences run `batch_size` at a time, in one forward pass each.
        """
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS:
            raise ColdError(f"top must be an integer in [0, {MAX_LOGPROBS}], got {top!r}")
        if batch_size < 1:
            raise ColdError(f"batch_size must be >= 1, got {batch_size}")
        params = (params or DecodeParams()).with_(**{"max_new_tokens": 1, **overrides})
        sequences = [list(s) for s in sequences]
        vocab = self.runner.vocab_size
        for ids in sequences:
            if not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ColdError(f"a sequence must be a non-empty list of token ids in 0..{vocab - 1}")
        requests = [self.make_request(ids, params) for ids in sequences]
        out: list[SequenceLogprobs] = []
        with torch.inference_mode():
            for start in range(0, len(requests), batch_size):
                out += self._batch_logprobs(requests[start : start + batch_size], top, penalty)
        return out

    def _batch_logprobs(self, requests: list[Request], top: int, penalty: float) -> list[SequenceLogprobs]:
        layout = layout_of(requests, self.device)
        ids = [r.prompt_ids for r in requests]
        logits = self.runner.sequence_logits(ids, layout)  # [R, L, V]
        results = []
        for seq, request in enumerate(requests):
            n, params = len(request.prompt_ids), request.params
            expert = logits[layout.expert_row[seq], -n:]  # [n, V]: position i predicts token i + 1
            if params.contrastive:
                amateur = logits[layout.amateur_row[seq], -n:]
                full = lambda t: torch.full((n,), t, device=expert.device)  # noqa: E731
                lp = cold_log_probs(expert, amateur, full(params.alpha), full(params.beta), params.scoring, penalty,
                                    params.beta_schedule)
            else:
                lp = torch.log_softmax(expert, dim=-1)
            targets = torch.tensor(request.prompt_ids[1:], device=lp.device)
            chosen = lp[:-1].gather(-1, targets[:, None])[:, 0].tolist() if n > 1 else []
            best = lp.topk(top, dim=-1) if top else None
            tops = ([list(zip(i.tolist(), v.tolist())) for v, i in zip(best.values, best.indices)] if best is not None
                    else [[] for _ in range(n)])
            results.append(SequenceLogprobs(request.prompt_ids, [None, *chosen], [[], *tops]))
        return results

    def run(self, requests: list[Request]) -> Iterator[StreamEvent]:
        """Decode prepared requests; beam search when they ask for it (all or none)."""
        beams = {r.params.num_beams > 1 for r in requests}
        if len(beams) > 1:
            raise ColdError("beam search and other modes cannot be mixed in one batch")
        return beam_search(self.runner, requests) if beams.pop() else decode(self.runner, requests)
