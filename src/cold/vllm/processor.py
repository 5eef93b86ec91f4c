"""The vLLM batch-level logits processor that turns each expert/amateur pair into CoLD scores.

Registered with `LLM(..., logits_processors=[ColdPairProcessor])` (or the FQCN
"cold.vllm.processor:ColdPairProcessor", e.g. `vllm serve --logits-processors ...`). It runs in
vLLM's engine-core worker, once per step, on the logits [B, V] of the persistent batch (row i =
request in batch slot i), after vLLM's allowed-token / bad-words stages and before penalties,
temperature and sampling. For every in-step pair it writes the CoLD score
(`cold.vllm.pairs.apply_plan`) into *both* rows, so the sampler picks the same token for both and
the amateur keeps seeing exactly the expert's text.

This is the V1 model-runner interface (`vllm.v1.sample.logits_processor.LogitsProcessor`);
`cold.vllm.processor_v2` has the same for Model Runner V2, and `cold.vllm.make_llm` passes the one
of the runner vLLM picks.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from cold.vllm.pairs import PairTable, PairTag, apply_plan

logger = init_logger(__name__)


class ColdPairProcessor(LogitsProcessor):
    """CoLD over request pairs tagged in `SamplingParams.extra_args["cold"]` (see cold.vllm.pairs)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        PairTag.from_extra_args(sampling_params.extra_args)  # ValueError -> the request is refused

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.table = PairTable()

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update:
            self.table.update(batch_update.removed, batch_update.added, batch_update.moved,
                              lambda d: d == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [B, V] float32, one row per request of this step; modified in place."""
        if not self.table.rows:
            return logits
        plan = self.table.plan()
        for pair, why in plan.newly_broken:
            logger.error("CoLD pair %s fell out of step (%s); both of its requests are being ended", pair, why)
        apply_plan(logits, plan)
        return logits
