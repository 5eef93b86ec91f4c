"""CoLD on vLLM's async engine: pairs join the running batch as their requests arrive.

    engine, lora = make_async_llm("smollm2", adapter=DIR)
    pairs = OnlinePairs(engine, lora)                          # used from one event loop
    # or, against an anti-expert: engine, lora, amateur = make_async_llm(..., amateur_adapter=DIR2)
    #                             pairs = OnlinePairs(engine, lora, amateur)
    async for event in pairs.stream(prompt_ids, params):      # cold.types.StreamEvent, index 0
        ...

A CoLD prompt is two vLLM requests, the expert (with the LoRA) and the amateur (without, or with
the amateur's LoRA where a request names it in `amateur_adapter`), tagged
as a pair (`cold.vllm.pairs`); the logits processor scores both rows together. Online, what keeps
the two rows of a pair in one step:

  * admission (`Room`): a pair is added only when both rows fit now: two of `max_num_seqs`
    seats, both prompts in the next step's token budget (`max_num_batched_tokens` less one token
    per running row), and KV blocks reserved for both rows' prompt + max_tokens, so the scheduler
    admits both rows in one step and never has to preempt one. Requests that do not fit wait, in
    arrival order, until running ones end;
  * the requests admitted together are added while vLLM's scheduler is paused
    (`pause_generation(mode="keep")`) and released at once (`resume_generation`);
  * a token is handed on only once both rows have produced it and they agree, so a broken pair's
    forced EOS (`cold.vllm.pairs`) never reaches a client. A pair that falls out of step anyway is
    aborted and retried once from scratch; greedy (or seeded) decoding reproduces what was already
    handed on, and the retry continues after it. A second break raises `PairBroken`.

The expert and base decoders run as single requests through the same admission.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cold.errors import ColdError
from cold.params import DecodeParams
from cold.types import StreamEvent
from cold.vllm.generate import engine_limits, pair_tag, sampling_params


class PairBroken(ColdError):
    """A CoLD pair fell out of step inside vLLM on its first try and on its retry."""


class _OutOfStep(Exception):
    """This try of a pair fell out of step (its rows' tokens differ)."""


@dataclass
class Room:
    """The engine's limits (`engine_limits`) and what the admitted requests hold of them."""

    limits: dict
    seats: int = 0  # rows admitted and not yet ended
    blocks: int = 0  # KV blocks reserved for them

    def need(self, rows: int, prompt_len: int, max_tokens: int) -> tuple[int, int]:
        """(seats, KV blocks) of a request group: `rows` rows of prompt + max_tokens tokens each."""
        return rows, rows * math.ceil((prompt_len + max_tokens) / self.limits["block_size"])

    def check(self, rows: int, prompt_len: int, max_tokens: int) -> None:
        """ColdError for a request group that could never be admitted, even alone."""
        seats, blocks = self.need(rows, prompt_len, max_tokens)
        limits = self.limits
        if seats > limits["seats"] or rows * prompt_len > limits["tokens"] or (limits["blocks"] and blocks > limits["blocks"]):
            raise ColdError(f"a prompt of {prompt_len} tokens with max_tokens {max_tokens} does not fit vLLM's limits "
                            f"for {rows} row(s) in one step: {limits}")

    def fits(self, rows: int, prompt_len: int, max_tokens: int, wave_tokens: int) -> bool:
        """Whether the group can join the next step after a wave that already holds `wave_tokens` prompt tokens."""
        seats, blocks = self.need(rows, prompt_len, max_tokens)
        limits = self.limits
        return (self.seats + seats <= limits["seats"]
                and wave_tokens + rows * prompt_len + self.seats <= limits["tokens"]  # running rows decode one token each
                and (not limits["blocks"] or self.blocks + blocks <= limits["blocks"]))

    def take(self, rows: int, prompt_len: int, max_tokens: int) -> None:
        seats, blocks = self.need(rows, prompt_len, max_tokens)
        self.seats, self.blocks = self.seats + seats, self.blocks + blocks

    def give(self, rows: int, prompt_len: int, max_tokens: int) -> None:
        seats, blocks = self.need(rows, prompt_len, max_tokens)
        self.seats, self.blocks = self.seats - seats, self.blocks - blocks


@dataclass
class _Ticket:
    """A request group waiting for admission; `admitted` gets its [(request id, output collector)]."""

    prompt_ids: list[int]
    params: DecodeParams
    seed: int
    admitted: asyncio.Future
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = 2 if self.params.contrastive else 1


class OnlinePairs:
    """Streams of CoLD pairs (and single expert / base requests) over one `AsyncLLM`."""

    def __init__(self, engine, lora, amateur=None, on_broken: Callable[[], None] | None = None):
        """`lora`: the expert's LoRARequest (None: base model only); `amateur`: the LoRARequest of an
        adapter CoLD requests may name as their amateur (None: the base model is the only amateur);
        `on_broken`: called for every try that fell out of step."""
        self.engine, self.lora, self.amateur = engine, lora, amateur
        self.room = Room(engine_limits(engine.vllm_config))
        self.eos = engine.get_tokenizer().eos_token_id
        self.on_broken = on_broken or (lambda: None)
        self._waiting: deque[_Ticket] = deque()
        self._wake: asyncio.Event | None = None
        self._admitter: asyncio.Task | None = None

    def check(self, prompt_ids: list[int], params: DecodeParams) -> None:
        """ColdError for a request these limits can never run (before it is queued)."""
        if params.contrastive and self.eos is None:
            raise ColdError("the tokenizer defines no EOS token, which a broken CoLD pair needs to be ended")
        if params.decoder != "base" and self.lora is None:
            raise ColdError(f"decoder {params.decoder!r} needs a LoRA adapter and none is served")
        self.expert_row(params)
        if params.contrastive:
            self.amateur_row(params)
        self.room.check(2 if params.contrastive else 1, len(prompt_ids), params.max_new_tokens)

    def expert_row(self, params: DecodeParams):
        """The LoRARequest `params.adapter` names (None: the expert's); ColdError for one not loaded."""
        loaded = [lora for lora in (self.lora, self.amateur) if lora is not None]
        if params.adapter is None:
            return self.lora
        for lora in loaded:
            if lora.lora_name == params.adapter:
                return lora
        raise ColdError(f"adapter {params.adapter!r} is not loaded in this vLLM engine "
                        f"({', '.join(repr(lora.lora_name) for lora in loaded) or 'none'})")

    def amateur_row(self, params: DecodeParams):
        """The LoRARequest of a CoLD request's amateur row (None: the bare base model); ColdError for an
        amateur this engine was not started with, or one at a scale it cannot run."""
        if params.amateur_adapter is None:
            if params.amateur_scale != 0:
                raise ColdError("an amateur at a scale of the expert's own adapter is not offered by the vLLM engine; "
                                "name an amateur adapter, or leave the amateur as the base model")
            return None
        if self.amateur is None or params.amateur_adapter != self.amateur.lora_name:
            offered = f"only {self.amateur.lora_name!r}" if self.amateur is not None else "none: the base model is the amateur"
            raise ColdError(f"amateur {params.amateur_adapter!r} is not an amateur of this vLLM engine ({offered})")
        if params.amateur_scale != 1:
            raise ColdError(f"the vLLM engine runs an amateur adapter at scale 1 only, not {params.amateur_scale:g}")
        return self.amateur

    async def stream(self, prompt_ids: list[int], params: DecodeParams) -> AsyncIterator[StreamEvent]:
        """The generation of one prompt as it is decoded: events with the new text and ids, the last
        with its finish reason. Cancelling the iteration aborts its requests."""
        self.check(prompt_ids, params)
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        sent_ids: list[int] = []  # handed on so far (a retry must reproduce them)
        sent_text = ""
        for attempt in (1, 2):
            handles = await self._admit(prompt_ids, params, seed)
            try:
                ids: list[int] = []
                text = ""
                async for new_ids, new_text, reason in self._verified(handles):
                    ids, text = ids + new_ids, text + new_text
                    if ids[: len(sent_ids)] != sent_ids[: len(ids)]:
                        raise PairBroken("a CoLD pair fell out of step inside vLLM and its retry decoded other tokens")
                    event = StreamEvent(index=0, text=text[len(sent_text):], token_ids=ids[len(sent_ids):],
                                        finish_reason=reason)
                    sent_ids, sent_text = sent_ids + event.token_ids, sent_text + event.text
                    if event.text or event.token_ids or reason is not None:
                        yield event
                return
            except _OutOfStep as exc:
                self.on_broken()
                if attempt == 2:
                    raise PairBroken(f"a CoLD pair fell out of step inside vLLM twice ({exc}); its answer was discarded") from None
            finally:
                await self._end(handles, prompt_ids, params)

    # ---- admission --------------------------------------------------------------------------

    async def _admit(self, prompt_ids: list[int], params: DecodeParams, seed: int) -> list:
        if self._admitter is None or self._admitter.done():
            self._wake = asyncio.Event()
            self._admitter = asyncio.create_task(self._admit_waves())
        ticket = _Ticket(prompt_ids, params, seed, asyncio.get_running_loop().create_future())
        self._waiting.append(ticket)
        self._wake.set()
        try:
            return await asyncio.shield(ticket.admitted)
        except asyncio.CancelledError:
            if ticket.admitted.done() and not ticket.admitted.cancelled() and ticket.admitted.exception() is None:
                await self._end(ticket.admitted.result(), prompt_ids, params)  # admitted as the client left
            else:
                ticket.admitted.cancel()
            raise

    async def _admit_waves(self) -> None:
        """Forever: admit the waiting requests that fit now, in arrival order, as one wave added while
        the scheduler is paused."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            wave, tokens = [], 0
            while self._waiting:
                ticket = self._waiting[0]
                if ticket.admitted.done():  # its client went away while it waited
                    self._waiting.popleft()
                    continue
                size = (ticket.rows, len(ticket.prompt_ids), ticket.params.max_new_tokens)
                if not self.room.fits(*size, tokens):
                    break
                self._waiting.popleft()
                self.room.take(*size)
                tokens += ticket.rows * len(ticket.prompt_ids)
                wave.append(ticket)
            if wave:
                await self._add_wave(wave)

    async def _add_wave(self, wave: list[_Ticket]) -> None:
        paused = any(t.rows == 2 for t in wave)
        if paused:
            await self.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            for ticket in wave:
                try:
                    handles = await self._add(ticket)
                except Exception as exc:  # noqa: BLE001 - the request fails, the admitter keeps running
                    self.room.give(ticket.rows, len(ticket.prompt_ids), ticket.params.max_new_tokens)
                    if not ticket.admitted.done():
                        ticket.admitted.set_exception(exc)
                    continue
                if ticket.admitted.done():  # its client went away while it was being added
                    await self._end(handles, ticket.prompt_ids, ticket.params)
                else:
                    ticket.admitted.set_result(handles)
        finally:
            if paused:
                await self.engine.resume_generation()

    async def _add(self, ticket: _Ticket) -> list:
        """Add the ticket's vLLM request(s); [(request id, output collector)], the expert first."""
        params, key = ticket.params, uuid.uuid4().hex
        if params.contrastive:
            rows = [("expert", self.expert_row(params)), ("amateur", self.amateur_row(params))]
        else:
            rows = [(None, self.expert_row(params) if params.decoder == "expert" else None)]
        return [await self._add_row(ticket, key, role, lora) for role, lora in rows]

    async def _add_row(self, ticket: _Ticket, key: str, role: str | None, lora) -> tuple:
        """Add one row (role None: a single expert / base request); (request id, output collector)."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = ticket.params
        tag = pair_tag(key, role, params, self.eos) if role else None
        request_id = f"cold-{key}-{role or params.decoder}"
        collector = await self.engine.add_request(
            request_id, TokensPrompt(prompt_token_ids=ticket.prompt_ids),
            sampling_params(params, ticket.seed, tag, output_kind=RequestOutputKind.DELTA), lora_request=lora)
        return request_id, collector

    async def _end(self, handles: list, prompt_ids: list[int], params: DecodeParams) -> None:
        """Abort what is still running of a try and give its room back."""
        await self.engine.abort([request_id for request_id, _ in handles])
        self.room.give(len(handles), len(prompt_ids), params.max_new_tokens)
        if self._wake is not None:
            self._wake.set()

    # ---- the outputs ------------------------------------------------------------------------

    @staticmethod
    async def _verified(handles: list) -> AsyncIterator[tuple[list[int], str, str | None]]:
        """(new ids, new text, finish reason or None) of the expert's (or the single request's)
        output, each part once the amateur has produced the same ids; _OutOfStep where they differ."""
        first = handles[0][1]
        if len(handles) == 1:
            while True:
                out = await first.get()
                yield list(out.outputs[0].token_ids), out.outputs[0].text, out.outputs[0].finish_reason if out.finished else None
                if out.finished:
                    return
        second = handles[1][1]
        expert: list[int] = []
        amateur: list[int] = []
        held: deque[tuple[int, list[int], str, str | None]] = deque()  # (ids up to, new ids, text, reason), unchecked
        amateur_done = False
        while True:
            out = await first.get()
            expert += out.outputs[0].token_ids
            held.append((len(expert), list(out.outputs[0].token_ids), out.outputs[0].text,
                         (out.outputs[0].finish_reason or "length") if out.finished else None))
            while not amateur_done and (len(amateur) < len(expert) or out.finished):  # bring the amateur level
                other = await second.get()
                amateur += other.outputs[0].token_ids
                amateur_done = other.finished
                _check_in_step(expert, amateur, out.finished, amateur_done)
            _check_in_step(expert, amateur, out.finished, amateur_done)
            checked = min(len(expert), len(amateur))
            while held and held[0][0] <= checked and (held[0][3] is None or amateur_done):
                _, ids, text, reason = held.popleft()
                yield ids, text, reason
            if out.finished:
                return


def _check_in_step(expert: list[int], amateur: list[int], expert_done: bool, amateur_done: bool) -> None:
    """_OutOfStep unless the two rows' ids agree so far (and, once both ended, entirely)."""
    checked = min(len(expert), len(amateur))
    if expert[:checked] != amateur[:checked]:
        at = next(i for i, (e, a) in enumerate(zip(expert, amateur)) if e != a)
        raise _OutOfStep(f"the rows' tokens differ at generated token {at}")
    if (expert_done and len(amateur) > len(expert)) or (expert_done and amateur_done and len(amateur) != len(expert)):
        raise _OutOfStep(f"the expert ended after {len(expert)} tokens and the amateur after {len(amateur)}")
