"""The llama.cpp model runner: one GGUF model loaded once, a llama.cpp context per LoRA setting.

    runner = LlamaCppRunner(LlamaCppModel.load(gguf_path), adapters=[adapter_gguf, ...])
    state = runner.prefill(prompt_ids, layout, max_new_tokens)   # -> LlamaState
    expert = runner.expert_logits(state)             # [S, V] each sequence's expert (or base) logits
    score = runner.scores(state, sampler, expert)    # [S, V] CoLD score (those logits for expert/base)
    runner.step(state, tokens)                       # feed each sequence's token [S]

It offers what `cold.runner.ModelRunner` offers the decode loops (`cold.decoding.running`,
`cold.decoding.beam`), so greedy, sampling, beam search, continuous batching and the lazy amateur
run unchanged over it. llama.cpp applies a LoRA to a whole context, not per row: a row of the
layout (`cold.runner.rows`) lives in the context of its (adapter, scale), as one llama.cpp
sequence of that context; the expert rows of a CoLD batch share one context, their amateurs
another. Each step decodes every context that has a row to feed, once, with all its rows.

The lazy amateur (`cold.sampling.amateur`) is cheaper here than in our own engine: a co-batched
amateur is a second decode over the weights at every step, and a catch-up (its pending tokens as
one multi-token decode) costs about the same as one step. So by default no amateur runs with its
expert (`cobatch_steps=0`): the amateur context decodes only at the steps whose plausibility mask
leaves more than one token.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cold.errors import ColdError
from cold.llamacpp.library import llama
from cold.runner.rows import RowLayout, RowSpec
from cold.sampling import scoring
from cold.sampling.amateur import AmateurLag
from cold.sampling.sampler import Sampler

DEFAULT_CONTEXT_TOKENS = 8192  # KV cells of each llama.cpp context, shared by its sequences
MIN_CONTEXT_TOKENS = 512  # llama.cpp aborts on a context with fewer cells than sequences (n_seq_max)
DEFAULT_SEQUENCES = 64  # llama.cpp sequences per context (rows of one LoRA setting; beams count twice)
BATCH_TOKENS = 2048  # tokens per llama_decode call (more: in several calls)
DEFAULT_COBATCH_STEPS = 0  # fully lazy: see the module docstring

ContextKey = tuple[int, float]  # (adapter stack index or -1 for the bare model, LoRA scale)


class LlamaCppModel:
    """A GGUF model loaded by llama.cpp (memory-mapped, read once), and the LoRA files applied to it."""

    def __init__(self, path: Path, pointer, vocab_size: int, context_length: int):
        self.path, self.pointer, self.vocab_size, self.context_length = path, pointer, vocab_size, context_length
        self._loras: dict[Path, object] = {}
        L = llama()
        # a sequence of this model can be cut short and go on from there (not so with sliding-window
        # or recurrent caches, which drop or fold the earlier cells)
        self.prefix_reuse = not (L.llama_model_n_swa(pointer) > 0 or L.llama_model_is_recurrent(pointer)
                                 or L.llama_model_is_hybrid(pointer))

    @classmethod
    def load(cls, path: str | Path) -> "LlamaCppModel":
        L = llama()
        path = Path(path)
        params = L.llama_model_default_params()
        pointer = L.llama_model_load_from_file(str(path).encode(), params)
        if not pointer:
            raise ColdError(f"llama.cpp cannot load {path} (not a GGUF model it supports?)")
        vocab = L.llama_model_get_vocab(pointer)
        return cls(path, pointer, L.llama_vocab_n_tokens(vocab), L.llama_model_n_ctx_train(pointer))

    def lora(self, path: Path):
        """The llama.cpp adapter of a GGUF LoRA file (loaded once)."""
        if path not in self._loras:
            pointer = llama().llama_adapter_lora_init(self.pointer, str(path).encode())
            if not pointer:
                raise ColdError(f"llama.cpp cannot apply the LoRA adapter {path} to {self.path}")
            self._loras[path] = pointer
        return self._loras[path]

    def close(self) -> None:
        L = llama()
        for pointer in self._loras.values():
            L.llama_adapter_lora_free(pointer)
        self._loras.clear()
        if self.pointer:
            L.llama_model_free(self.pointer)
            self.pointer = None


class Context:
    """One llama.cpp context: its KV cells hold the sequences ("slots") of rows of one LoRA setting.

    A released slot keeps its cells until they are needed, and a new prompt starts in the free
    slot that holds the longest prefix of it (`start`): only the rest is decoded, as llama.cpp's
    server does with its prompt cache. llama.cpp computes that as it does a fresh prompt decoded
    in two pieces: bit for bit the same while each decode holds under 64 tokens, within its usual
    batch-size rounding otherwise (tests/test_llamacpp.py). Copying a kept prompt's cells into
    another sequence (llama_memory_seq_cp) is not used for this: it gave later steps logits
    0.6-0.8 off those of decoding it afresh in this llama.cpp.
    """

    def __init__(self, model: LlamaCppModel, lora, scale: float, tokens: int, sequences: int, threads: int):
        L = llama()
        params = L.llama_context_default_params()
        tokens = max(tokens, MIN_CONTEXT_TOKENS)
        params.n_ctx, params.n_seq_max = tokens, sequences
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # the cells are shared: a sequence may use as many as are free
        params.no_perf = True
        self.pointer = L.llama_init_from_model(model.pointer, params)
        if not self.pointer:
            raise ColdError(f"llama.cpp cannot create a context of {tokens} tokens for {model.path}")
        if lora is not None:
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(lora)
            scales = (ctypes.c_float * 1)(scale)
            if L.llama_set_adapters_lora(self.pointer, adapters, 1, scales) != 0:
                raise ColdError("llama.cpp refused to apply the LoRA adapter to a context")
        self.memory = L.llama_get_memory(self.pointer)
        self.batch = L.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.tokens, self.vocab_size, self.prefix_reuse = tokens, model.vocab_size, model.prefix_reuse
        self.free = list(range(sequences - 1, -1, -1))  # slots not in use, the lowest last (popped first)
        self.reserved: dict[int, int] = {}  # slot -> KV cells it may come to hold
        self.held: dict[int, list[int]] = {}  # slot -> the tokens in its cells, by position (free slots' kept)

    def take(self, cells: int) -> int:
        """A free slot, emptied, that reserves `cells` KV cells."""
        return self.start((), cells)[0]

    def start(self, prompt: Sequence[int], cells: int) -> tuple[int, int]:
        """A free slot for a sequence starting with `prompt`, reserving `cells` KV cells, and how many
        of the prompt's first tokens its cells hold already (at most all but the last): feed the
        rest from that position. Other free slots' kept cells are dropped as the room is needed."""
        if not self.free:
            raise ColdError(f"a llama.cpp context holds at most {len(self.reserved)} sequences; this batch needs more "
                            "(fewer prompts or beams at once)")
        if sum(self.reserved.values()) + cells > self.tokens:
            raise ColdError(f"a llama.cpp context holds {self.tokens} tokens and this batch needs more: decode fewer "
                            "prompts at once, or give the engine more (LlamaCppEngine.load(context_tokens=...); "
                            "cold serve sizes them from --max-batch and --max-tokens)")
        limit = len(prompt) - 1 if self.prefix_reuse else 0
        kept = {slot: _common_prefix(self.held.get(slot, ()), prompt, limit) for slot in self.free}
        # the longest prefix; on a tie the slot with the fewest kept cells, then the lowest
        slot = max(reversed(self.free), key=lambda s: (kept[s], -len(self.held.get(s, ()))))
        self.free.remove(slot)
        self.reserved[slot] = cells
        self._trim(slot, kept[slot])
        kept_cells = sum(len(self.held.get(s, ())) for s in self.free)
        for other in list(self.free):  # drop kept cells the reservations may come to need, the highest slots' first
            if sum(self.reserved.values()) + kept_cells <= self.tokens:
                break
            kept_cells -= len(self.held.get(other, ()))
            self._trim(other, 0)
        return slot, len(self.held[slot])

    def _trim(self, slot: int, keep: int) -> None:
        """Keep the first `keep` tokens of a slot's cells (all of them dropped where llama.cpp cannot
        cut the sequence short)."""
        L = llama()
        held = self.held.get(slot, [])
        if len(held) > keep and not L.llama_memory_seq_rm(self.memory, slot, keep, -1):
            L.llama_memory_seq_rm(self.memory, slot, -1, -1)
            keep = 0
        self.held[slot] = held[:keep]

    def clear(self) -> None:
        """Free every slot and KV cell."""
        llama().llama_memory_clear(self.memory, True)
        self.free += list(self.reserved)
        self.reserved.clear()
        self.held.clear()

    def release(self, slot: int) -> None:
        """Free a slot; its cells stay, for a later prompt that starts alike (`start`), where the
        model's cache allows."""
        if not self.prefix_reuse:
            self._trim(slot, 0)
        del self.reserved[slot]
        self.free.append(slot)

    def copy(self, source: int, cells: int) -> int:
        """A new slot holding `source`'s KV cells (shared, not duplicated: the cache is unified)."""
        slot = self.take(cells)
        llama().llama_memory_seq_cp(self.memory, source, slot, -1, -1)
        self.held[slot] = list(self.held[source])
        return slot

    def decode(self, work: list[tuple[int, Sequence[int], int]]) -> np.ndarray:
        """Feed each (slot, tokens, first position); return the logits after each one's last token,
        [len(work), V] float32 in work order. Runs as few llama_decode calls as BATCH_TOKENS allows."""
        L = llama()
        out = np.empty((len(work), self.vocab_size), dtype=np.float32)
        flat = [(i, slot, token, pos + j, j == len(tokens) - 1)
                for i, (slot, tokens, pos) in enumerate(work) for j, token in enumerate(tokens)]
        for slot, tokens, pos in work:
            held = self.held.setdefault(slot, [])
            del held[pos:]
            held += tokens
        try:
            self._decode_flat(flat, out)
        except ColdError:  # the cells of these slots are unknown now: none is kept for reuse
            for slot, _, _ in work:
                L.llama_memory_seq_rm(self.memory, slot, -1, -1)
                self.held[slot] = []
            raise
        return out

    def _decode_flat(self, flat: list, out: np.ndarray) -> None:
        L = llama()
        batch, filled, owners = self.batch, 0, []
        for n, (i, slot, token, pos, last) in enumerate(flat):
            batch.token[filled], batch.pos[filled], batch.n_seq_id[filled] = token, pos, 1
            batch.seq_id[filled][0], batch.logits[filled] = slot, last
            filled += 1
            if last:
                owners.append(i)
            if filled == BATCH_TOKENS or n == len(flat) - 1:
                batch.n_tokens = filled
                status = L.llama_decode(self.pointer, batch)
                if status != 0:
                    raise ColdError(f"llama_decode failed (status {status}): the context's KV cells are full or the batch is malformed")
                if owners:
                    logits = np.ctypeslib.as_array(L.llama_get_logits(self.pointer), shape=(len(owners), self.vocab_size))
                    out[owners] = logits
                filled, owners = 0, []

    def close(self) -> None:
        L = llama()
        L.llama_batch_free(self.batch)
        L.llama_free(self.pointer)


@dataclass
class LlamaState:
    """A batch between steps: the row layout, each row's llama.cpp slot and next position, the last
    logits of every row (stale in a lagging amateur's row) and the lazy amateur's bookkeeping."""

    layout: RowLayout
    keys: list[ContextKey]  # [R] the context of each row
    slots: list[int]  # [R] its sequence in that context
    positions: list[int]  # [R] the position of its next token
    logits: torch.Tensor  # [R, V] float32
    amateur: AmateurLag
    reserve: int  # KV cells each sequence may come to hold
    new_tokens: int  # of which new tokens (a beam's copy shares its source's prompt cells)
    sliding = False  # llama.cpp keeps sliding-window caches per sequence: batches merge freely
    cache = None


class LlamaCppRunner:
    """A GGUF model on llama.cpp with GGUF LoRA adapters; prefill, step and scores as `ModelRunner`."""

    def __init__(self, model: LlamaCppModel, tokenizer, eos_ids: set[int], adapters: Sequence = (),
                 cobatch_steps: int = DEFAULT_COBATCH_STEPS, threads: int | None = None,
                 context_tokens: int = DEFAULT_CONTEXT_TOKENS, sequences: int = DEFAULT_SEQUENCES):
        """`adapters`: objects with `.name` and `.gguf` (the GGUF LoRA file), stack index = position."""
        if not isinstance(cobatch_steps, int) or cobatch_steps < 0:
            raise ColdError(f"cobatch_steps must be an integer >= 0, got {cobatch_steps!r}")
        for name, value in (("context_tokens", context_tokens), ("sequences", sequences)):
            if not isinstance(value, int) or value < 1:
                raise ColdError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        self.cobatch_steps = cobatch_steps
        self.threads = threads or torch.get_num_threads()
        self.context_tokens, self.sequences = context_tokens, min(sequences, 256)
        self.device = torch.device("cpu")
        self.lean = self.kv_dtype = None
        self.contexts: dict[ContextKey, Context] = {}
        self.adapters: list = []
        self.set_adapters(adapters)

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def vocab_size(self) -> int:
        return min(len(self.tokenizer), self.model.vocab_size)

    def set_adapters(self, adapters: Sequence) -> None:
        """Use exactly these adapters, stack index = position (each is loaded before anything changes)."""
        for adapter in adapters:
            self.model.lora(adapter.gguf)
        for context in self.contexts.values():
            if context.reserved:
                raise ColdError("adapters cannot change while sequences are decoding")
        self.close_contexts()
        self.adapters = list(adapters)

    def reset(self) -> None:
        """Forget every sequence (after a failure left batch states that will not be released)."""
        for context in self.contexts.values():
            context.clear()

    def close_contexts(self) -> None:
        for context in self.contexts.values():
            context.close()
        self.contexts.clear()

    def close(self) -> None:
        self.close_contexts()
        self.model.close()

    def resize(self, context_tokens: int) -> None:
        """Give each llama.cpp context `context_tokens` KV cells from now on (none may hold sequences)."""
        if any(c.reserved for c in self.contexts.values()):
            raise ColdError("the llama.cpp contexts cannot be resized while sequences are decoding")
        self.close_contexts()
        self.context_tokens = context_tokens

    def context(self, key: ContextKey, cells: int = 0) -> Context:
        """The context of a LoRA setting, made on first use with `context_tokens` KV cells, or as many
        as `cells` (rounded up to a power of two) where that is more: an idle context (no sequences)
        too small for `cells` is made again, bigger, so a static batch always fits."""
        context = self.contexts.get(key)
        if context is not None and not context.reserved and context.tokens < cells:
            context.close()
            context = None
        if context is None:
            adapter, scale = key
            lora = None if adapter < 0 else self.model.lora(self.adapters[adapter].gguf)
            size = max(self.context_tokens, 1 << max(cells - 1, 0).bit_length())
            context = self.contexts[key] = Context(self.model, lora, scale, size, self.sequences, self.threads)
        return context

    # ---- the batch state ----------------------------------------------------------------------

    def prefill(self, prompts: Sequence[Sequence[int]], layout: RowLayout, max_new_tokens: int,
                amateur_prompts: bool | None = None) -> LlamaState:
        """Decode every row's prompt (`prompts[seq]` for each row's sequence), except the amateur rows,
        which lag with their prompt pending unless `amateur_prompts` (beam search) or the policy is
        ALWAYS: a prompt is compute-bound, so decoding it now costs what a catch-up costs later, and
        nothing for an amateur that is never needed."""
        contrastive = (layout.amateur_row != layout.expert_row).tolist()
        reserve = max(len(p) for p in prompts) + max_new_tokens
        keys = [_key(row) for row in layout.rows]
        slots, kept = self._take(keys, [prompts[row.seq] for row in layout.rows], reserve)
        rest = [prompts[row.seq][k:] for row, k in zip(layout.rows, kept)]  # [R] each row's prompt past its kept cells
        lag = AmateurLag.start([rest[r] for r in layout.amateur_row.tolist()], contrastive, self.cobatch_steps,
                               bool(amateur_prompts))
        state = LlamaState(layout, keys, slots, kept, torch.zeros(len(keys), self.model.vocab_size), lag, reserve,
                           max_new_tokens)
        work = [(r, rest[r]) for r, row in enumerate(layout.rows) if row.role == "expert" or lag.started[row.seq]]
        try:
            self._decode(state, work)
        except ColdError:
            self._release(state, range(len(keys)))
            raise
        return state

    def step(self, state: LlamaState, tokens: torch.Tensor) -> None:
        """Feed each sequence's token (tokens [S]) to its expert row and, where its amateur runs with
        it, its amateur row; a lagging amateur adds it to its pending tokens."""
        values, lag = tokens.tolist(), state.amateur
        work = [(r, [values[row.seq]]) for r, row in enumerate(state.layout.rows)
                if row.role == "expert" or lag.cobatched[row.seq]]
        self._decode(state, work)
        if lag.lazy:
            lag.fed(values)

    def _decode(self, state: LlamaState, work: list[tuple[int, Sequence[int]]]) -> None:
        """Feed rows their tokens ((row, tokens) pairs), one decode per context; each row's logits
        and position move on. (Decoding two contexts at once, on a thread each, measured no faster
        than one after the other: bench/llamacpp/steps.md, "always" at batch 1.)"""
        by_context: dict[ContextKey, list[tuple[int, Sequence[int]]]] = {}
        for row, tokens in work:
            by_context.setdefault(state.keys[row], []).append((row, tokens))
        for key, items in by_context.items():
            logits = self.context(key).decode([(state.slots[r], t, state.positions[r]) for r, t in items])
            state.logits[[r for r, _ in items]] = torch.from_numpy(logits)
            for r, t in items:
                state.positions[r] += len(t)

    def merge(self, state: LlamaState, other: LlamaState) -> LlamaState:
        """One state holding `state`'s sequences, then `other`'s (their slots stay as they are)."""
        offset = len(state.layout.expert_row)
        rows = state.layout.rows + [RowSpec(r.seq + offset, r.role, r.adapter, r.scale) for r in other.layout.rows]
        return LlamaState(
            RowLayout.build(rows, offset + len(other.layout.expert_row), self.device), state.keys + other.keys,
            state.slots + other.slots, state.positions + other.positions, torch.cat([state.logits, other.logits]),
            state.amateur.merged(other.amateur), max(state.reserve, other.reserve), max(state.new_tokens, other.new_tokens),
        )

    def keep(self, state: LlamaState, kept_seqs: list[int]) -> LlamaState | None:
        """Only sequences `kept_seqs` (renumbered 0.. in that order); the others' slots are freed."""
        lag = state.amateur
        layout, old_rows = state.layout.keep(kept_seqs, self.device)
        old = old_rows.tolist()
        self._release(state, sorted(set(range(len(state.slots))) - set(old)))
        if not kept_seqs:
            return None
        return LlamaState(layout, [state.keys[r] for r in old], [state.slots[r] for r in old],
                          [state.positions[r] for r in old], state.logits[old_rows], lag.kept(kept_seqs), state.reserve,
                          state.new_tokens)

    def repeat_rows(self, state: LlamaState, times: int) -> None:
        """Every row `times` times in a row, each copy its own sequence (beam search's start); a copy
        shares its source's prompt cells. If the copies do not fit, none is kept."""
        slots, made = [], []
        try:
            for key, slot in zip(state.keys, state.slots):
                slots.append(slot)
                for _ in range(times - 1):
                    made.append((key, self.context(key).copy(slot, state.new_tokens)))
                    slots.append(made[-1][1])
        except ColdError:
            for key, copy in made:
                self.contexts[key].release(copy)
            raise
        state.slots = slots
        state.keys = [k for k in state.keys for _ in range(times)]
        state.positions = [p for p in state.positions for _ in range(times)]
        state.logits = state.logits.repeat_interleave(times, dim=0)
        state.layout = state.layout.repeated(times, self.device)
        state.amateur = state.amateur.repeated(times)

    def reorder(self, state: LlamaState, seq_source: torch.Tensor) -> None:
        """Sequence s takes over the rows (KV cells, position, logits) of sequence seq_source[s] (beams)."""
        layout = state.layout
        source = layout.role_rows[layout.row_role, seq_source[layout.row_seq]].tolist()  # [R]
        moved = [r for r, s in enumerate(source) if s != r]
        fresh: dict[int, int] = {}
        try:
            for r in moved:
                fresh[r] = self.context(state.keys[r]).copy(state.slots[source[r]], state.new_tokens)
        except ColdError:
            for r, slot in fresh.items():
                self.contexts[state.keys[r]].release(slot)
            raise
        self._release(state, moved)
        for r, slot in fresh.items():
            state.slots[r] = slot
        state.positions = [state.positions[s] for s in source]
        state.logits = state.logits[source]
        state.amateur = state.amateur.reordered(seq_source.tolist())

    def _take(self, keys: list[ContextKey], prompts: list[Sequence[int]], reserve: int) -> tuple[list[int], list[int]]:
        """A slot for each row (keys[r], prompts[r]) and how many of its prompt's first tokens it holds."""
        slots: list[int] = []
        kept: list[int] = []
        counts = {key: keys.count(key) for key in keys}
        try:
            for key, prompt in zip(keys, prompts):
                slot, held = self.context(key, counts[key] * reserve).start(prompt, reserve)
                slots.append(slot)
                kept.append(held)
        except ColdError:
            for key, slot in zip(keys, slots):
                self.contexts[key].release(slot)
            raise
        return slots, kept

    def _release(self, state: LlamaState, rows) -> None:
        for r in rows:
            self.contexts[state.keys[r]].release(state.slots[r])

    # ---- scores ---------------------------------------------------------------------------------

    def expert_logits(self, state: LlamaState) -> torch.Tensor:
        """[S, V] logits of every sequence's expert row (its base row for the base decoder)."""
        return state.logits[state.layout.expert_row]

    def scores(self, state: LlamaState, sampler: Sampler, expert: torch.Tensor) -> torch.Tensor:
        """[S, V] score of every sequence given its `expert_logits`, as `ModelRunner.scores`: a CoLD sequence whose
        plausibility mask holds one token scores that token alone; the others need their amateur,
        and a lagging one catches up first (its pending tokens as one decode)."""
        layout = state.layout
        if sampler.contrastive is None:
            return expert
        seqs = sampler.contrastive
        own = expert[seqs]  # [C, V]
        valid = own >= scoring.plausibility_threshold(own, sampler.alpha)  # [C, V]
        needed = valid.sum(dim=1) > 1  # [C]
        needs = dict(zip(sampler.contrastive_seqs, needed.tolist()))
        lag = state.amateur
        late = lag.catch_up_seqs(needs)
        if late:
            rows = layout.amateur_row[late].tolist()
            self._decode(state, [(r, lag.pending[s]) for r, s in zip(rows, late)])
            lag.caught_up(late)
        lag.observe(needs)
        amateur_rows = torch.where(needed, layout.amateur_row[seqs], layout.expert_row[seqs])  # [C]
        score = scoring.contrastive_scores_by_form(own, state.logits[amateur_rows], sampler.beta, sampler.forms, valid,
                                                   sampler.schedules)
        out = expert.clone()
        out[seqs] = score
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many first tokens `a` and `b` share, at most `limit`."""
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


def _key(row: RowSpec) -> ContextKey:
    return (row.adapter, float(row.scale)) if row.adapter >= 0 else (-1, 0.0)
