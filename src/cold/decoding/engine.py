"""The decode loop: one forward pass per step over all rows (expert and amateur) of all prompts.

    engine = Engine.load("smollm2", adapters={"gsm8k": "adapters/smollm2-gsm8k"})
    for g in engine.generate(["2+2="], decoder="cold", alpha=0.1, beta=0.5, max_new_tokens=32):
        print(g.text, g.finish_reason)

Each step: forward the last token of every row (each row has its own KV cache entries), score
all sequences at once (`cold.sampling.scoring`), pick one token per sequence, feed that same token to
both of its rows. Finished sequences leave the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cold.sampling import scoring
from cold.load.adapters import LoraAdapter, read_adapter
from cold.runner.attention import NAME as GROUPED_ATTENTION
from cold.runner.attention import use_grouped_attention
from cold.runner.rows import AMATEUR, EXPERT, RowLayout, RowSpec, left_pad
from cold.errors import ColdError
from cold.runner.kvcache import new_cache
from cold.runner.llama_step import LeanDecoder
from cold.runner.llama_step import supports as lean_supported
from cold.lora.layer import RowLoRALinear, RowSelection, install_adapters, uninstall_adapters
from cold.load.models import DEFAULT_MODEL, BaseModel, load_base, pick_dtype
from cold.params import DecodeParams
from cold.decoding.running import RunningBatch
from cold.sampling.detokenize import TextTracker

Prompt = str | Sequence[int]  # text, or already tokenised ids


@dataclass
class Generation:
    """The result for one prompt."""

    prompt: str
    text: str
    token_ids: list[int]  # generated ids only (an EOS that ended the text included)
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens)
    prompt_tokens: int


@dataclass
class StreamEvent:
    """New output of one prompt after a decode step."""

    index: int  # which prompt of the call
    text: str  # text produced since the last event of this prompt
    token_ids: list[int]  # ids produced since the last event of this prompt
    finish_reason: str | None = None  # set on the prompt's last event


@dataclass
class Request:
    """One prompt, tokenised, with validated parameters resolved against the engine."""

    prompt: str
    prompt_ids: list[int]
    params: DecodeParams
    expert_adapter: int = -1
    amateur_adapter: int = -1
    tracker: TextTracker | None = field(default=None, repr=False)  # set when decoding starts
    generator: torch.Generator | None = field(default=None, repr=False)  # when sampling


PREFILL_POSITIONS = 2048  # rows x prompt columns per prefill forward (more: in chunks of columns)


class Engine:
    """A base model with row-indexed LoRA adapters installed, ready to decode."""

    def __init__(
        self, base: BaseModel, adapters: Sequence[LoraAdapter] = (), lean: bool = True,
        kv_dtype: str | torch.dtype | None = None,
    ):
        """`lean=False` runs every step through the reference path (transformers' forward with
        row-indexed LoRA layers) instead of the lean decode step of `cold.runner.llama_step`.

        `kv_dtype`: the dtype the KV cache stores (None: the model's). "bfloat16" under a float32
        model halves the cache's memory and the bytes attention reads; keys and values are
        rounded, so tokens can differ from the float32 cache's where scores nearly tie.
        """
        self.base = base
        self.model = base.model
        use_grouped_attention(self.model)
        self.kv_dtype = _kv_dtype(kv_dtype, self.model)
        self.tokenizer = base.tokenizer
        self.rows = RowSelection()
        self.adapters: list[LoraAdapter] = []
        self.lean: LeanDecoder | None = None
        self._use_lean = lean and lean_supported(self.model)
        if adapters:
            self.set_adapters(list(adapters))
        else:
            uninstall_adapters(self.model)
            self._rebuild_lean()
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        adapters: Mapping[str, str | Path] | Sequence[str | Path] = (),
        device: str | None = "cpu",
        dtype: str | torch.dtype | None = None,
        lean: bool = True,
        kv_dtype: str | torch.dtype | None = None,
    ) -> "Engine":
        """Load a base model and adapters. Adapter files are read and checked before the model loads."""
        items = adapters.items() if isinstance(adapters, Mapping) else [(None, p) for p in adapters]
        read = [read_adapter(path, name) for name, path in items]
        if kv_dtype is not None:
            pick_dtype(kv_dtype)  # a bad name fails before the model loads
        return cls(load_base(model, device=device, dtype=dtype), read, lean=lean, kv_dtype=kv_dtype)

    # ---- adapters -------------------------------------------------------------------------

    def set_adapters(self, adapters: list[LoraAdapter]) -> None:
        """Install exactly these adapters (validated first; on error nothing changes)."""
        install_adapters(self.model, adapters, self.rows)
        self.adapters = list(adapters)
        self._rebuild_lean()

    def _rebuild_lean(self) -> None:
        self.lean = LeanDecoder(self.model) if self._use_lean else None

    def add_adapter(self, path: str | Path, name: str | None = None) -> LoraAdapter:
        adapter = read_adapter(path, name)
        self.set_adapters([*self.adapters, adapter])
        return adapter

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def adapter_index(self, name: str | None, decoder: str) -> int:
        if name is None:
            if len(self.adapters) == 1:
                return 0
            if not self.adapters:
                raise ColdError(f"decoder {decoder!r} needs a LoRA adapter and none is loaded (give one with --adapter DIR)")
            raise ColdError(f"several adapters are loaded ({', '.join(self.adapter_names)}); name one")
        if name not in self.adapter_names:
            raise ColdError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapter_names) or 'none'}")
        return self.adapter_names.index(name)

    # ---- prompts --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: Prompt, chat: bool = False) -> tuple[str, list[int]]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def make_request(self, prompt: Prompt, params: DecodeParams, chat: bool = False) -> Request:
        params.validate()
        text, ids = self.encode(prompt, chat)
        if not ids:
            raise ColdError("a prompt is empty (no tokens)")
        context = self.base.context_length
        if len(ids) + params.max_new_tokens > context:
            raise ColdError(
                f"prompt of {len(ids)} tokens plus max_new_tokens {params.max_new_tokens} "
                f"exceeds the model's context of {context} tokens"
            )
        request = Request(prompt=text, prompt_ids=ids, params=params)
        if params.decoder != "base":
            request.expert_adapter = self.adapter_index(params.adapter, params.decoder)
        if params.contrastive and params.amateur_scale != 0:
            name = params.amateur_adapter or params.adapter
            request.amateur_adapter = self.adapter_index(name, params.decoder)
        return request

    def make_requests(self, prompts, params: DecodeParams | None, chat: bool, overrides: dict) -> list[Request]:
        params = (params or DecodeParams()).with_(**overrides)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ColdError("no prompts given")
        return [self.make_request(p, params, chat) for p in prompts]

    # ---- generation -----------------------------------------------------------------------

    def generate(self, prompts, params: DecodeParams | None = None, *, chat: bool = False, **overrides) -> list[Generation]:
        """Decode a batch of prompts; keyword arguments override fields of `params`."""
        requests = self.make_requests(prompts, params, chat, overrides)
        ids: list[list[int]] = [[] for _ in requests]
        texts = [""] * len(requests)
        reasons: list[str | None] = [None] * len(requests)
        for event in self.run(requests):
            ids[event.index] += event.token_ids
            texts[event.index] += event.text
            reasons[event.index] = event.finish_reason or reasons[event.index]
        return [
            Generation(prompt=r.prompt, text=t, token_ids=i, finish_reason=f, prompt_tokens=len(r.prompt_ids))
            for r, t, i, f in zip(requests, texts, ids, reasons)
        ]

    def stream(self, prompts, params: DecodeParams | None = None, *, chat: bool = False, **overrides) -> Iterator[StreamEvent]:
        """Like `generate`, but yields text as it is produced."""
        return self.run(self.make_requests(prompts, params, chat, overrides))

    def run(self, requests: list[Request]) -> Iterator[StreamEvent]:
        """Decode prepared requests; beam search when they ask for it (all or none)."""
        beams = {r.params.num_beams > 1 for r in requests}
        if len(beams) > 1:
            raise ColdError("beam search and other modes cannot be mixed in one batch")
        if beams.pop():
            from cold.decoding.beam import beam_search

            return beam_search(self, requests)
        return self._decode(requests)

    # ---- internals shared with beam search ------------------------------------------------

    def row_specs(self, requests: list[Request]) -> list[RowSpec]:
        """Expert rows of all sequences, then amateur rows of the contrastive ones."""
        rows = []
        for s, r in enumerate(requests):
            scale = r.params.expert_scale if r.expert_adapter >= 0 else 0.0
            rows.append(RowSpec(s, EXPERT, r.expert_adapter, scale))
        for s, r in enumerate(requests):
            if r.params.contrastive:
                scale = r.params.amateur_scale if r.amateur_adapter >= 0 else 0.0
                rows.append(RowSpec(s, AMATEUR, r.amateur_adapter, scale))
        return rows

    def forward(self, layout: RowLayout, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """One forward pass of all rows through the decoder; returns the last hidden states [R, H].

        The vocabulary projection is left to `scores`, which needs it in full only for expert rows.
        """
        self.rows.set(layout.adapter, layout.scale, layout.single_adapter, layout.adapted_span)
        try:
            if self.lean is not None and input_ids.shape[1] == 1 and self.rows.single is not None:
                return self.lean(input_ids, attention_mask, position_ids, cache, self.rows)
            out = self.model.get_decoder()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            self.rows.clear()
        return out.last_hidden_state[:, -1]

    def logits(self, hidden: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
        """Full next-token logits [R, V] (float32) of hidden states [R, H]."""
        head = self.model.get_output_embeddings()
        if layout is not None:
            self.rows.set(layout.adapter, layout.scale, layout.single_adapter, layout.adapted_span)
        try:
            return self._softcap(head(hidden[:, None])[:, 0].float())
        finally:
            self.rows.clear()

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def prefill(self, requests: list[Request], layout: RowLayout):
        """Run every row's prompt; return (hidden [R, H], cache, attention_mask, next positions [R])."""
        ids, mask, positions = left_pad([requests[r.seq].prompt_ids for r in layout.rows], self.pad_id, self.device)
        # room for the whole generation up front: decoding then never reallocates the cache
        reserve = min(ids.shape[1] + max(r.params.max_new_tokens for r in requests), self.base.context_length)
        cache = new_cache(self.model.config, self.kv_dtype, reserve)
        rows, length = ids.shape
        # chunks of prompt columns bound the activations a forward holds: a CoLD batch (two rows
        # per prompt) then peaks no higher than plain decoding of as many prompts
        sliding = any(layer.is_sliding for layer in cache.layers)  # transformers' sliding caches: one pass
        chunk = length if sliding else max(1, PREFILL_POSITIONS // rows)
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            hidden = self.forward(layout, ids[:, start:end], mask[:, :end], positions[:, start:end], cache)
        return hidden, cache, mask, positions[:, -1] + 1

    def scores(self, hidden: torch.Tensor, layout: RowLayout, requests: list[Request]) -> torch.Tensor:
        """[S, V] score of every sequence (CoLD score, or plain logits for expert/base)."""
        device = hidden.device
        expert = self.logits(hidden[layout.expert_row], layout.subset(layout.expert_row))  # [S, V]
        contrastive = [i for i, r in enumerate(requests) if r.params.contrastive]
        if not contrastive:
            return expert
        idx = torch.tensor(contrastive, device=device)
        params = [requests[i].params for i in contrastive]
        alpha = torch.tensor([p.alpha for p in params], device=device)
        beta = torch.tensor([p.beta for p in params], device=device)
        every = len(contrastive) == len(requests)  # the usual CoLD batch: no [S, V] gather, no copy back
        own = expert if every else expert[idx]
        score = self._contrastive_scores(hidden, layout, idx, own, alpha, beta, [p.scoring for p in params])
        if every:
            return score
        out = expert.clone()
        out[idx] = score
        return out

    def _contrastive_scores(self, hidden, layout, seqs, expert, alpha, beta, forms) -> torch.Tensor:
        """[C, V] CoLD scores of the contrastive sequences `seqs` (expert logits [C, V]).

        The logit-form score reads the amateur only inside the expert's plausibility mask, so with
        a plain (unadapted) output layer only the union of the masked-in columns is computed, for
        the amateur's logits and for the score itself; every other entry is -inf.
        """
        rows = layout.amateur_row[seqs]
        head = self.model.get_output_embeddings()
        if set(forms) == {"logit"} and not isinstance(head, RowLoRALinear) and getattr(head, "bias", None) is None:
            threshold = scoring.plausibility_threshold(expert, alpha)  # [C, 1]
            # columns inside some sequence's mask; a - b >= 0 iff a >= b, and one [C, V] pass less than any()
            columns = ((expert - threshold).amax(dim=0) >= 0).nonzero().squeeze(1)  # [K]
            own = expert[:, columns]  # [C, K]
            amateur = self._softcap((hidden[rows] @ head.weight[columns].T).float())  # [C, K]
            part = scoring.contrastive_scores(own, amateur, alpha, beta, "logit", own >= threshold)
            return torch.full_like(expert, scoring.NEG_INF).index_copy_(1, columns, part)
        amateur = self.logits(hidden[rows], layout.subset(rows))
        if len(set(forms)) == 1:
            return scoring.contrastive_scores(expert, amateur, alpha, beta, forms[0])
        out = torch.empty_like(expert)
        for form in set(forms):
            idx = torch.tensor([i for i, f in enumerate(forms) if f == form], device=expert.device)
            out[idx] = scoring.contrastive_scores(expert[idx], amateur[idx], alpha[idx], beta[idx], form)
        return out

    def _decode(self, requests: list[Request]) -> Iterator[StreamEvent]:
        batch = RunningBatch(self)
        batch.join(requests, list(range(len(requests))))
        while batch:
            for _, event in batch.step():
                yield event


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = False) -> tuple[str, list[int]]:
    """(prompt text, token ids): token ids are taken as given; text gets the chat template when `chat`."""
    if not isinstance(prompt, str):
        ids = [int(t) for t in prompt]
        return tokenizer.decode(ids), ids
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ColdError("this model's tokenizer has no chat template: give it plain text "
                            "(cold generate without --chat; cold eval / cold tune --prompt zero-shot or few-shot)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return prompt, tokenizer(text, add_special_tokens=False).input_ids
    return prompt, tokenizer(prompt).input_ids


def _kv_dtype(kv_dtype: str | torch.dtype | None, model) -> torch.dtype | None:
    """The KV cache's dtype (None: the model's own), checked against what the model can attend with."""
    if kv_dtype is None:
        return None
    wanted, own = pick_dtype(kv_dtype), next(model.parameters()).dtype
    if wanted == own:
        return None
    if getattr(model.config, "_attn_implementation", None) != GROUPED_ATTENTION:
        raise ColdError(
            f"kv_dtype {kv_dtype!r} differs from the model's dtype ({str(own).removeprefix('torch.')}), which needs "
            f"SDPA attention; this model uses {model.config._attn_implementation!r}: leave kv_dtype unset"
        )
    return wanted


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    if not ids:
        raise ColdError("the model defines no end-of-sequence token")
    return ids
