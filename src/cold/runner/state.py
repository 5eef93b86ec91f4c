"""The state of a batch between decode steps: its row layout, KV cache, attention mask, positions,
last hidden states and the lazy amateur's bookkeeping. Made by `ModelRunner.prefill`; changed
only by the runner.

Rows are ordered expert rows (one per sequence, in sequence order), then the amateur rows that
run with them at every step, then the lagging amateur rows; a decode step forwards the first
`active` rows. A lagging row's mask is 0 over the columns it skipped (its "holes", the last
len(pending) columns) until it catches up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cold.runner.rows import RowLayout
from cold.sampling.amateur import AmateurLag

SPARE_COLUMNS = 64  # extra mask columns allocated whenever the mask must grow


class GrowingMask:
    """An attention mask [R, L] (1 = real token) with spare columns, so a step appends in place."""

    def __init__(self, mask: torch.Tensor, capacity: int = 0):
        rows, length = mask.shape
        self._buffer = mask.new_zeros(rows, max(capacity, length + 1))
        self._buffer[:, :length] = mask
        self.length = length

    @property
    def view(self) -> torch.Tensor:
        """[R, L] the filled columns."""
        return self._buffer[:, : self.length]

    @property
    def rows(self) -> int:
        return self._buffer.shape[0]

    @property
    def spare(self) -> int:
        """Columns the buffer holds beyond the filled ones."""
        return self._buffer.shape[1] - self.length

    def append(self, real_rows: int | None = None) -> None:
        """Add one column: a real token in the first `real_rows` rows (None: all), a hole in the rest."""
        if self.length == self._buffer.shape[1]:
            grown = self._buffer.new_zeros(self.rows, self.length + SPARE_COLUMNS)
            grown[:, : self.length] = self._buffer
            self._buffer = grown
        self._buffer[:real_rows, self.length] = 1
        self._buffer[real_rows:, self.length] = 0
        self.length += 1

    def fill(self, rows: torch.Tensor, start: int, real: torch.Tensor) -> None:
        """Mark columns [start, start + T) of rows `rows` [N] real where `real` [N, T] is set."""
        columns = self._buffer[rows, start : start + real.shape[1]]
        self._buffer[rows, start : start + real.shape[1]] = columns | real.to(columns.dtype)

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (in that order), and the spare room."""
        self._buffer = self._buffer[rows]

    def move_rows(self, rows: torch.Tensor, sources: torch.Tensor) -> None:
        """Row rows[i] takes row sources[i]'s mask (the rest stay)."""
        self._buffer[rows] = self._buffer[sources]

    def repeat_rows(self, times: int) -> None:
        self._buffer = self._buffer.repeat_interleave(times, dim=0)

    def drop_leading(self, columns: int) -> None:
        self._buffer = self._buffer[:, columns:]
        self.length -= columns

    def left_padded(self, length: int) -> torch.Tensor:
        """[R, length] the mask with masked-out columns added on the left."""
        view = self.view
        return torch.cat([view.new_zeros(self.rows, length - self.length), view], dim=1)


@dataclass
class BatchState:
    layout: RowLayout
    cache: DynamicCache
    mask: GrowingMask  # [R, L]
    positions: torch.Tensor  # [R] position of each row's next token
    hidden: torch.Tensor  # [R, H] last hidden state of each row, not yet scored (stale in lagging rows)
    amateur: AmateurLag  # per sequence: which amateurs lag, their pending tokens, how often they were needed
    active: int  # rows a decode step forwards: the expert rows and the co-batched amateur rows
    room: int = 0  # columns some row may still append: the longest remaining generation

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.mask.view

    @property
    def sliding(self) -> bool:
        """Whether the cache has sliding-window layers (Gemma), whose rows cannot be left-padded into line."""
        return any(layer.is_sliding for layer in self.cache.layers)
