"""Row routing: which adapter and scale each row of a forward pass uses, read by every LoRA layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowSelection:
    """Which adapter (index into the stack, -1 for none) and what scale each batch row uses.

    Shared by all `RowLoRALinear` layers of one model; the model runner sets it around a forward pass.
    """

    adapter: torch.Tensor | None = None  # [R] long, -1 = base weights only
    scale: torch.Tensor | None = None  # [R] float, 0 where adapter == -1
    single: int | None = None  # the one adapter all adapted rows use (-1: none), None if several
    span: slice = field(default_factory=lambda: slice(None))  # rows holding every adapted row; others skip LoRA

    def set(self, adapter: torch.Tensor, scale: torch.Tensor, single: int | None = None, span: slice | None = None) -> None:
        """`single`: pass the adapter index when every row with adapter >= 0 uses it (fast path);
        `span`: rows outside it must have adapter -1 (CoLD's amateur rows come after the experts)."""
        self.assign(adapter, torch.where(adapter >= 0, scale, torch.zeros_like(scale)), single, span)

    def assign(self, adapter: torch.Tensor, scale: torch.Tensor, single: int | None = None, span: slice | None = None) -> None:
        """`set` for a scale that is already 0 wherever adapter == -1 (a row layout's, built once)."""
        self.adapter, self.scale, self.single = adapter, scale, single
        self.span = slice(None) if span is None else span

    def clear(self) -> None:
        self.adapter = self.scale = self.single = None
        self.span = slice(None)
