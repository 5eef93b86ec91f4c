"""The model runner: one loaded model with its row-indexed LoRA layers, run a batch at a time.

    runner = ModelRunner(base_model)                 # cold.load.models.BaseModel
    runner.set_adapters([adapter, ...])              # cold.load.adapters.LoraAdapter
    state = runner.prefill(prompt_ids, layout, max_new_tokens)   # -> BatchState
    score = runner.scores(state, sampler)            # [S, V] CoLD score (plain logits for expert/base)
    runner.step(state, tokens)                       # feed each sequence's token [S] to all its rows

It owns the step: it is the only code that touches the KV cache, the attention mask and the
positions (`merge`, `keep`, `repeat_rows`, `reorder` change the batch between steps). A decode
step over one adapter goes through the fused Llama step of `cold.runner.llama_step` where the
model allows it, every other forward through transformers' model with the LoRA layers installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cold.errors import ColdError
from cold.load.adapters import LoraAdapter
from cold.load.models import BaseModel, eos_ids, pick_dtype
from cold.lora.layer import RowLoRALinear, install_adapters, uninstall_adapters
from cold.lora.routing import RowSelection
from cold.runner.attention import NAME as GROUPED_ATTENTION
from cold.runner.attention import use_grouped_attention
from cold.runner.kvcache import new_cache
from cold.runner.llama_step import LeanDecoder
from cold.runner.llama_step import supports as lean_supported
from cold.runner.rows import RowLayout, left_pad
from cold.runner.state import BatchState, GrowingMask
from cold.sampling import scoring
from cold.sampling.sampler import Sampler

PREFILL_POSITIONS = 2048  # rows x prompt columns per prefill forward (more: in chunks of columns)


class ModelRunner:
    """A base model with row-indexed LoRA adapters installed; prefill, step, logits and scores."""

    def __init__(self, base: BaseModel, adapters: Sequence[LoraAdapter] = (), lean: bool = True,
                 kv_dtype: str | torch.dtype | None = None):
        """`lean=False` runs every step through transformers' forward with row-indexed LoRA layers
        instead of the fused decode step of `cold.runner.llama_step`.

        `kv_dtype`: the dtype the KV cache stores (None: the model's). "bfloat16" under a float32
        model halves the cache's memory and the bytes attention reads; keys and values are
        rounded, so tokens can differ from the float32 cache's where scores nearly tie.
        """
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        use_grouped_attention(self.model)
        self.kv_dtype = _kv_dtype(kv_dtype, self.model)
        self.rows = RowSelection()
        self.adapters: list[LoraAdapter] = []
        self.lean: LeanDecoder | None = None
        self._use_lean = lean and lean_supported(self.model)
        self.set_adapters(adapters)
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.base.context_length

    def set_adapters(self, adapters: Sequence[LoraAdapter]) -> None:
        """Install exactly these adapters, stack index = position (validated first; on error nothing changes)."""
        if adapters:
            install_adapters(self.model, list(adapters), self.rows)
        else:
            uninstall_adapters(self.model)
        self.adapters = list(adapters)
        self.lean = LeanDecoder(self.model) if self._use_lean else None

    # ---- forward passes -----------------------------------------------------------------------

    def forward(self, layout: RowLayout, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """One forward pass of all rows through the decoder; returns the last hidden states [R, H].

        input_ids, position_ids [R, T]; attention_mask [R, L] (the new columns included). The
        vocabulary projection is left to `scores`, which needs it in full only for expert rows.
        """
        self._route(layout)
        try:
            if self.lean is not None and input_ids.shape[1] == 1 and self.rows.single is not None:
                return self.lean(input_ids, attention_mask, position_ids, cache, self.rows)
            out = self.model.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True,
            )
        finally:
            self.rows.clear()
        return out.last_hidden_state[:, -1]

    def logits(self, hidden: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
        """Full next-token logits [R, V] (float32) of hidden states [R, H]."""
        head = self.model.get_output_embeddings()
        if layout is not None:
            self._route(layout)
        try:
            return self._softcap(head(hidden[:, None])[:, 0].float())
        finally:
            self.rows.clear()

    def _route(self, layout: RowLayout) -> None:
        self.rows.assign(layout.adapter, layout.scale, layout.single_adapter, layout.adapted_span)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # ---- the batch state ----------------------------------------------------------------------

    def prefill(self, prompts: Sequence[Sequence[int]], layout: RowLayout, max_new_tokens: int) -> BatchState:
        """Run every row's prompt (`prompts[seq]` for each row's sequence); room is reserved in the
        cache for `max_new_tokens` more columns, so decoding never reallocates it."""
        ids, mask, positions = left_pad([prompts[r.seq] for r in layout.rows], self.pad_id, self.device)
        reserve = min(ids.shape[1] + max_new_tokens, self.context_length)
        cache = new_cache(self.model.config, self.kv_dtype, reserve)
        rows, length = ids.shape
        # chunks of prompt columns bound the activations a forward holds: a CoLD batch (two rows
        # per prompt) then peaks no higher than plain decoding of as many prompts
        sliding = any(layer.is_sliding for layer in cache.layers)  # transformers' sliding caches: one pass
        chunk = length if sliding else max(1, PREFILL_POSITIONS // rows)
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            hidden = self.forward(layout, ids[:, start:end], mask[:, :end], positions[:, start:end], cache)
        return BatchState(layout, cache, GrowingMask(mask, reserve), positions[:, -1] + 1, hidden)

    def step(self, state: BatchState, tokens: torch.Tensor) -> None:
        """Feed each sequence's token (tokens [S]) to all of its rows; the state moves one column on."""
        row_tokens = tokens[state.layout.row_seq]  # [R]
        state.mask.append_real()
        state.hidden = self.forward(state.layout, row_tokens[:, None], state.mask.view, state.positions[:, None], state.cache)
        state.positions = state.positions + 1

    def merge(self, state: BatchState, other: BatchState) -> BatchState:
        """One state holding `state`'s sequences, then `other`'s. Rows are left-padded to one length
        with masked-out columns, which leaves every row's attention exactly as it was."""
        if state.sliding or other.sliding:
            raise ColdError("joining a running batch needs a model without sliding-window caches")
        length = max(state.mask.length, other.mask.length)
        for mine, theirs in zip(state.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
        mask = torch.cat([state.mask.left_padded(length), other.mask.left_padded(length)])
        return BatchState(
            layout=state.layout.merged(other.layout, self.device), cache=state.cache, mask=GrowingMask(mask),
            positions=torch.cat([state.positions, other.positions]), hidden=torch.cat([state.hidden, other.hidden]),
        )

    def keep(self, state: BatchState, kept_seqs: list[int]) -> BatchState | None:
        """Only sequences `kept_seqs` (renumbered 0.. in that order); None when none is kept. Leading
        columns that are padding in every remaining row are dropped."""
        if not kept_seqs:
            return None
        layout, old_rows = state.layout.keep(kept_seqs, self.device)
        state.cache.batch_select_indices(old_rows)
        state.mask.select(old_rows)
        state.layout, state.positions, state.hidden = layout, state.positions[old_rows], state.hidden[old_rows]
        real = state.mask.view.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start > 0 and not state.sliding:
            state.mask.drop_leading(start)
            for layer in state.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        return state

    def repeat_rows(self, state: BatchState, times: int) -> None:
        """Every row `times` times in a row, each copy its own sequence (beam search's start)."""
        state.cache.batch_repeat_interleave(times)
        state.mask.repeat_rows(times)
        state.hidden = state.hidden.repeat_interleave(times, dim=0)
        state.positions = state.positions.repeat_interleave(times, dim=0)
        state.layout = state.layout.repeated(times, self.device)

    def reorder(self, state: BatchState, seq_source: torch.Tensor) -> None:
        """Sequence s takes over the rows (cache, mask, positions) of sequence seq_source[s] (beams)."""
        layout = state.layout
        row_source = layout.role_rows[layout.row_role, seq_source[layout.row_seq]]  # [R]
        state.cache.reorder_cache(row_source)
        state.mask.select(row_source)
        state.positions = state.positions[row_source]

    # ---- scores ---------------------------------------------------------------------------------

    def scores(self, state: BatchState, sampler: Sampler) -> torch.Tensor:
        """[S, V] score of every sequence: the CoLD score, or plain logits for expert/base sequences."""
        hidden, layout = state.hidden, state.layout
        expert = self.logits(hidden[layout.expert_row], layout.experts)  # [S, V]
        if sampler.contrastive is None:
            return expert
        seqs = sampler.contrastive
        own = expert if sampler.every_contrastive else expert[seqs]  # the usual CoLD batch: no gather, no copy back
        score = self._contrastive_scores(hidden, layout, seqs, own, sampler.alpha, sampler.beta, sampler.forms)
        if sampler.every_contrastive:
            return score
        out = expert.clone()
        out[seqs] = score
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


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


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
