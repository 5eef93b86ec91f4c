"""Batch layout: which model rows belong to which sequence, and left-padded prefill inputs.

A CoLD sequence owns two rows of the model batch, an expert row and an amateur row; an
`expert` or `base` sequence owns one. Rows are laid out as all expert rows (one per sequence;
in sequence order at prefill, in any order once sequences have left and joined: `expert_row`
says where) followed by the amateur rows of the contrastive sequences, so the adapted
rows form one run that the LoRA layers can restrict themselves to (the runner keeps the amateur
rows that run at every step before the lagging ones, `cold.runner.state`). Every tensor a step needs
is built here once per layout, not per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

EXPERT, AMATEUR = "expert", "amateur"
ROLES = (EXPERT, AMATEUR)


@dataclass(frozen=True)
class RowSpec:
    seq: int  # index of the sequence this row belongs to
    role: str  # EXPERT or AMATEUR
    adapter: int  # adapter stack index, -1 = base weights only
    scale: float  # LoRA scale multiplier (0 for the bare base model)


@dataclass
class RowLayout:
    rows: list[RowSpec]
    expert_row: torch.Tensor  # [S] row index of each sequence's expert row
    amateur_row: torch.Tensor  # [S] row index of its amateur row (its expert row if it has none)
    adapter: torch.Tensor  # [R] long
    scale: torch.Tensor  # [R] float, 0 where adapter == -1
    single_adapter: int | None  # the only adapter any row uses (-1: no row uses one), None if several
    row_seq: torch.Tensor = field(default=None)  # [R] long: the sequence of each row
    adapted_span: slice = field(default_factory=lambda: slice(0, 0))  # rows [start, stop) holding every adapted row

    @classmethod
    def build(cls, rows: list[RowSpec], num_seqs: int, device) -> "RowLayout":
        expert = [0] * num_seqs
        amateur = [None] * num_seqs
        for index, row in enumerate(rows):
            if row.role == EXPERT:
                expert[row.seq] = index
            else:
                amateur[row.seq] = index
        amateur = [e if a is None else a for e, a in zip(expert, amateur)]
        return cls._of(rows, torch.tensor(expert, dtype=torch.long, device=device),
                       torch.tensor(amateur, dtype=torch.long, device=device), device)

    @classmethod
    def _of(cls, rows: list[RowSpec], expert_row, amateur_row, device) -> "RowLayout":
        adapter = torch.tensor([r.adapter for r in rows], dtype=torch.long, device=device)
        scale = torch.tensor([r.scale if r.adapter >= 0 else 0.0 for r in rows], dtype=torch.float32, device=device)
        return cls(
            rows=rows, expert_row=expert_row, amateur_row=amateur_row, adapter=adapter, scale=scale,
            single_adapter=_single_adapter(rows),
            row_seq=torch.tensor([r.seq for r in rows], dtype=torch.long, device=device),
            adapted_span=_adapted_span(rows),
        )

    def subset(self, rows: torch.Tensor) -> "RowLayout":
        """The adapter selection of some rows (for running only those rows through a layer)."""
        picked = [self.rows[i] for i in rows.tolist()]
        return RowLayout._of(picked, self.expert_row, self.amateur_row, self.adapter.device)

    def head(self, rows: int) -> "RowLayout":
        """The adapter selection of the first `rows` rows (a lazy decode step forwards only those)."""
        if rows == len(self.rows):
            return self
        heads = self.__dict__.setdefault("_heads", {})
        if rows not in heads:
            heads[rows] = self.subset(torch.arange(rows, device=self.adapter.device))
        return heads[rows]

    def reordered(self, source: list[int], device) -> "RowLayout":
        """Row i of the new layout is row source[i] of this one (same sequences)."""
        return RowLayout.build([self.rows[i] for i in source], len(self.expert_row), device)

    @cached_property
    def experts(self) -> "RowLayout":
        """The adapter selection of the expert rows, in sequence order (for the LM head)."""
        return self.subset(self.expert_row)

    @cached_property
    def role_rows(self) -> torch.Tensor:
        """[2, S]: the row of (role, sequence), role 0 expert, 1 amateur (its expert row if it has none)."""
        return torch.stack([self.expert_row, self.amateur_row])

    @cached_property
    def row_role(self) -> torch.Tensor:
        """[R] long: 0 for an expert row, 1 for an amateur row."""
        return torch.tensor([ROLES.index(r.role) for r in self.rows], dtype=torch.long, device=self.row_seq.device)

    def keep(self, kept_seqs: list[int], device) -> tuple["RowLayout", torch.Tensor]:
        """Layout for a subset of sequences (renumbered 0..), and the old row index of each new row."""
        renumber = {old: new for new, old in enumerate(kept_seqs)}
        kept = [(i, r) for i, r in enumerate(self.rows) if r.seq in renumber]
        old_rows = torch.tensor([i for i, _ in kept], dtype=torch.long, device=device)
        rows = [RowSpec(renumber[r.seq], r.role, r.adapter, r.scale) for _, r in kept]
        return RowLayout.build(rows, len(kept_seqs), device), old_rows

    def repeated(self, times: int, device) -> "RowLayout":
        """Each row becomes `times` consecutive rows; sequence s becomes sequences s*times + b (beams)."""
        rows = [RowSpec(r.seq * times + b, r.role, r.adapter, r.scale) for r in self.rows for b in range(times)]
        return RowLayout.build(rows, len(self.expert_row) * times, device)


def placed(regions: list[list], current: dict) -> list:
    """A row order for consecutive regions that moves as few rows as possible: `regions[g]` are the
    members of region g (any hashable; the regions lie back to back in this order), `current` the
    row each member holds now (none for a new member). A member whose current row falls inside
    its region's new rows keeps it; the others take the region's free rows, in order. Returns
    the member of each new row."""
    order, start = [], 0
    for members in regions:
        slots = [None] * len(members)
        movers = []
        for member in members:
            offset = current.get(member, -1) - start
            if 0 <= offset < len(members) and slots[offset] is None:
                slots[offset] = member
            else:
                movers.append(member)
        pending = iter(movers)
        order += [member if member is not None else next(pending) for member in slots]
        start += len(members)
    return order


def row_specs(requests) -> list[RowSpec]:
    """The rows of some requests (`cold.types.Request`): expert rows of all sequences, then amateur
    rows of the contrastive ones."""
    rows = []
    for s, r in enumerate(requests):
        scale = r.params.expert_scale if r.expert_adapter >= 0 else 0.0
        rows.append(RowSpec(s, EXPERT, r.expert_adapter, scale))
    for s, r in enumerate(requests):
        if r.params.contrastive:
            scale = r.params.amateur_scale if r.amateur_adapter >= 0 else 0.0
            rows.append(RowSpec(s, AMATEUR, r.amateur_adapter, scale))
    return rows


def layout_of(requests, device) -> RowLayout:
    """The row layout of a batch of requests."""
    return RowLayout.build(row_specs(requests), len(requests), device)


def _adapted_span(rows: list[RowSpec]) -> slice:
    """The smallest run of rows holding every row that uses an adapter (empty if none does)."""
    adapted = [i for i, r in enumerate(rows) if r.adapter >= 0]
    return slice(adapted[0], adapted[-1] + 1) if adapted else slice(0, 0)


def _single_adapter(rows: list[RowSpec]) -> int | None:
    used = {r.adapter for r in rows if r.adapter >= 0}
    return used.pop() if len(used) == 1 else (-1 if not used else None)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists: input_ids, attention_mask and position_ids, each [R, L]."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, length - len(seq) :] = 1
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
