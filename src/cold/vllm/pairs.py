"""Pair bookkeeping for CoLD inside vLLM, free of vLLM imports (unit-testable on its own), shared
by the processors of both vLLM model runners (`cold.vllm.processor`, `cold.vllm.processor_v2`).

Each user prompt becomes two vLLM requests with the same prompt: an *expert* request that
carries the LoRA and an *amateur* request without it. Both carry the same tag in
`SamplingParams.extra_args["cold"]`:

    {"pair": "<unique key>", "role": "expert" | "amateur",
     "alpha": 0.1, "beta": 0.5, "scoring": "logit", "eos": 2}

The logits processor sees the persistent batch as rows 0..B-1. `PairTable` keeps, per row, the
request's tag and a reference to its growing output-token list, follows vLLM's BatchUpdate
(removed, added, moved/swapped rows), and each step splits the rows into

  * in-step pairs: both rows present and their generated tokens so far equal -> score them;
  * broken rows: partner missing from this step, or histories that differ -> end them so that
    the two halves of the pair can never agree (the expert row is forced to EOS, the amateur row
    to a filler token), and `check_pair` on the caller's side raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cold.errors import ColdError
from cold.params import BETA_SCHEDULES, SCORING_FORMS
from cold.sampling import scoring

TAG = "cold"
ROLES = ("expert", "amateur")


@dataclass(frozen=True)
class PairTag:
    """The CoLD settings one request carries in `extra_args["cold"]`."""

    pair: str
    role: str
    alpha: float
    beta: float
    scoring: str
    eos: int
    beta_schedule: str = "constant"

    def to_extra_args(self) -> dict:
        return {TAG: {"pair": self.pair, "role": self.role, "alpha": self.alpha, "beta": self.beta,
                      "scoring": self.scoring, "eos": self.eos, "beta_schedule": self.beta_schedule}}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "PairTag | None":
        """The tag of a request, None when it is not part of a CoLD pair; ValueError when malformed."""
        raw = (extra_args or {}).get(TAG)
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ValueError(f"extra_args[{TAG!r}] must be an object, got {type(raw).__name__}")
        try:
            tag = cls(pair=str(raw["pair"]), role=raw["role"], alpha=float(raw.get("alpha", 0.1)),
                      beta=float(raw.get("beta", 0.5)), scoring=raw.get("scoring", "logit"), eos=int(raw["eos"]),
                      beta_schedule=raw.get("beta_schedule", "constant"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"extra_args[{TAG!r}] is malformed ({exc!r}); needs pair, role and eos") from exc
        if tag.role not in ROLES:
            raise ValueError(f"extra_args[{TAG!r}].role must be one of {ROLES}, got {tag.role!r}")
        if not 0 < tag.alpha <= 1:
            raise ValueError(f"CoLD alpha must be in (0, 1], got {tag.alpha}")
        if not tag.beta >= 0:
            raise ValueError(f"CoLD beta must be >= 0, got {tag.beta}")
        if tag.scoring not in SCORING_FORMS:
            raise ValueError(f"CoLD scoring must be one of {SCORING_FORMS}, got {tag.scoring!r}")
        if tag.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"CoLD beta_schedule must be one of {BETA_SCHEDULES}, got {tag.beta_schedule!r}")
        return tag


@dataclass
class Row:
    tag: PairTag
    prompt: list[int] | None  # the request's prompt ids
    output: list[int]  # vLLM's running output-token list of the request (a live reference)
    checked: bool = False  # its prompt was compared with the partner's


@dataclass
class StepPlan:
    """What to do with this step's logits rows."""

    expert_rows: list[int] = field(default_factory=list)  # [P] row of each in-step pair's expert
    amateur_rows: list[int] = field(default_factory=list)  # [P] row of its amateur
    tags: list[PairTag] = field(default_factory=list)  # [P] the pair's settings
    force: dict[int, int] = field(default_factory=dict)  # row -> the only token it may produce
    newly_broken: list[tuple[str, str]] = field(default_factory=list)  # (pair, why), for the log


class PairTable:
    """Rows of the persistent batch that belong to CoLD pairs, and pairs known to be broken."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self.broken: set[str] = set()

    # vLLM's BatchUpdate: removed (indices), added (index, params, prompt ids, output ids),
    # moved (from, to, UNIDIRECTIONAL | SWAP). Slots refilled by an add are not listed as removed.
    def update(self, removed, added, moved, is_swap) -> None:
        for index in removed:
            self.rows.pop(index, None)
        for index, params, prompt, output in added:
            tag = PairTag.from_extra_args(getattr(params, "extra_args", None))
            if tag is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = Row(tag, prompt, output)
        for a, b, direction in moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and is_swap(direction):
                self.rows[a] = row_b
        live = {row.tag.pair for row in self.rows.values()}
        self.broken &= live  # forget broken pairs once none of their rows is left

    def plan(self) -> StepPlan:
        plan = StepPlan()
        by_pair: dict[str, dict[str, int]] = {}
        for index, row in self.rows.items():
            roles = by_pair.setdefault(row.tag.pair, {})
            if row.tag.role in roles:  # two experts (or amateurs) with one key: never a valid pair
                self._break(row.tag.pair, f"two {row.tag.role} requests share the pair key", plan)
            roles[row.tag.role] = index
        for pair, roles in by_pair.items():
            expert, amateur = roles.get("expert"), roles.get("amateur")
            if pair not in self.broken:
                if expert is None or amateur is None:
                    missing = "amateur" if amateur is None else "expert"
                    self._break(pair, f"the {missing} row is not in this step", plan)
                elif self.rows[expert].output != self.rows[amateur].output:
                    self._break(pair, f"the rows' generated tokens differ (expert {len(self.rows[expert].output)}, "
                                f"amateur {len(self.rows[amateur].output)} tokens)", plan)
                elif not self.rows[expert].checked:
                    if self.rows[expert].prompt != self.rows[amateur].prompt:
                        self._break(pair, "the two requests have different prompts", plan)
                    self.rows[expert].checked = self.rows[amateur].checked = True
            if pair in self.broken:
                for role, index in roles.items():
                    plan.force[index] = self._forced_token(self.rows[index].tag, role)
            else:
                plan.expert_rows.append(expert)
                plan.amateur_rows.append(amateur)
                plan.tags.append(self.rows[expert].tag)
        return plan

    def _break(self, pair: str, why: str, plan: StepPlan) -> None:
        if pair not in self.broken:
            self.broken.add(pair)
            plan.newly_broken.append((pair, why))

    @staticmethod
    def _forced_token(tag: PairTag, role: str) -> int:
        # The expert ends now with EOS; the amateur repeats a non-EOS filler until its length limit.
        # Their outputs then always differ in the last token, which the caller detects.
        if role == "expert":
            return tag.eos
        return 0 if tag.eos != 0 else 1


def apply_plan(logits: torch.Tensor, plan: StepPlan) -> None:
    """Write a step's plan into its logits [B, V] (float32, in place): each in-step pair's CoLD score
    (`cold.sampling.scoring.contrastive_scores`, the rule of our own engine) into *both* of its rows,
    so the sampler picks the same token for both and the amateur keeps seeing the expert's text;
    each forced row's one allowed token."""
    if plan.expert_rows:
        device = logits.device
        expert_rows = torch.tensor(plan.expert_rows, device=device)  # [P]
        amateur_rows = torch.tensor(plan.amateur_rows, device=device)  # [P]
        alpha = torch.tensor([t.alpha for t in plan.tags], device=device)  # [P]
        beta = torch.tensor([t.beta for t in plan.tags], device=device)  # [P]
        forms = [t.scoring for t in plan.tags]
        expert, amateur = logits[expert_rows], logits[amateur_rows]  # [P, V] copies
        valid = scoring.plausibility_mask(expert, alpha)
        score = scoring.contrastive_scores_by_form(expert, amateur, beta, forms, valid, [t.beta_schedule for t in plan.tags])
        logits[expert_rows] = score
        logits[amateur_rows] = score
    for row, token in plan.force.items():
        logits[row].fill_(scoring.NEG_INF)
        logits[row, token] = 0.0


def check_pair(index: int, expert_ids: list[int], amateur_ids: list[int]) -> None:
    """Raise ColdError when the two halves of prompt `index`'s pair did not decode in step."""
    if expert_ids != amateur_ids:
        at = next((i for i, (e, a) in enumerate(zip(expert_ids, amateur_ids)) if e != a), min(len(expert_ids), len(amateur_ids)))
        raise ColdError(
            f"prompt {index}: the expert and amateur requests of its CoLD pair fell out of step inside vLLM "
            f"at generated token {at} (rows not decoded in the same engine steps: scheduling, preemption or "
            "chunked prefill); its output was discarded. Use cold.vllm.make_llm settings "
            "(enable_chunked_prefill=False, max_num_seqs and KV cache room for both rows of every prompt)."
        )
