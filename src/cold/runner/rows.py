"""Batch layout: which model rows belong to which sequence, and left-padded prefill inputs.

A CoLD sequence owns two rows of the model batch, an expert row and an amateur row; an
`expert` or `base` sequence owns one. Rows are laid out as all expert rows (one per sequence,
in sequence order) followed by the amateur rows of the contrastive sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXPERT, AMATEUR = "expert", "amateur"


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
    scale: torch.Tensor  # [R] float
    single_adapter: int | None  # the only adapter any row uses (-1: no row uses one), None if several

    @property
    def adapted_span(self) -> slice:
        """Rows [start, stop) holding every adapted row: with experts first, the amateurs skip the LoRA."""
        return _adapted_span(self.rows)

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
        return cls(
            rows=rows,
            expert_row=torch.tensor(expert, dtype=torch.long, device=device),
            amateur_row=torch.tensor(amateur, dtype=torch.long, device=device),
            adapter=torch.tensor([r.adapter for r in rows], dtype=torch.long, device=device),
            scale=torch.tensor([r.scale for r in rows], dtype=torch.float32, device=device),
            single_adapter=_single_adapter(rows),
        )

    def subset(self, rows: torch.Tensor) -> "RowLayout":
        """The adapter selection of some rows (for running only those rows through a layer)."""
        picked = [self.rows[i] for i in rows.tolist()]
        return RowLayout(
            rows=picked, expert_row=self.expert_row, amateur_row=self.amateur_row,
            adapter=self.adapter[rows], scale=self.scale[rows], single_adapter=_single_adapter(picked),
        )

    def keep(self, kept_seqs: list[int], device) -> tuple["RowLayout", torch.Tensor]:
        """Layout for a subset of sequences (renumbered 0..), and the old row index of each new row."""
        renumber = {old: new for new, old in enumerate(kept_seqs)}
        kept = [(i, r) for i, r in enumerate(self.rows) if r.seq in renumber]
        old_rows = torch.tensor([i for i, _ in kept], dtype=torch.long, device=device)
        rows = [RowSpec(renumber[r.seq], r.role, r.adapter, r.scale) for _, r in kept]
        return RowLayout.build(rows, len(kept_seqs), device), old_rows


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
