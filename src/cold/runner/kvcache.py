"""A KV cache that appends in place instead of re-concatenating the whole cache every step.

transformers' `DynamicLayer` grows by `torch.cat`, which copies the full cache of every layer at
every decode step. `GrowingLayer` keeps a buffer with spare capacity and writes the new column
into it; `keys` and `values` are views of the filled part, so everything that reads or reassigns
them (merging batches, trimming padding) works unchanged.

The prefill reserves room for the whole generation (`new_cache(..., reserve=prompt + max new
tokens)`), and the first buffers of every layer are views of one block (`_Block`), allocated
once: a batch that only decodes never reallocates or copies its cache, and the memory is handed
back whole when the cache is freed. Row selection and beam reordering keep the spare room.

The buffers may hold a narrower dtype than the model computes in (`new_cache(config, dtype)`,
e.g. bfloat16 under a float32 model: half the cache memory); keys and values are rounded to it
when written, and attention (`cold.runner.attention`, `cold.runner.llama_step`) computes in the
cache's dtype.

A forward over the first P rows only (the lazy amateur's decode step: lagging amateur rows come
last and are skipped) writes and attends to those rows' buffers, views again, no copies. When
sequences leave, the rows that stay keep their place where they can and the buffers keep the
vacated rows as spare ones (`live_rows`), which a joining sequence's rows then take
(`write_rows`): leaving and joining copy the rows that move, not the whole cache. A
lagging row catches up through `catch_up_cache`: for one forward, a window over some rows whose
new columns overwrite the columns that row skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 64  # extra capacity allocated whenever a buffer must grow


class _Block:
    """One allocation holding the first key and value buffers of every layer of a cache."""

    def __init__(self, layers: int):
        self.layers = layers
        self.block: torch.Tensor | None = None  # [layers, 2, R, H, capacity, D]
        self.handed_out = 0

    def take(self, like: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next layer's (key buffer, value buffer) [R, H, capacity, D], shaped and typed like
        `like`; None once every layer has its pair, or for a layer of another shape."""
        rows, heads, _, dim = like.shape
        if self.block is None:
            self.block = like.new_empty(self.layers, 2, rows, heads, capacity, dim)
        if self.handed_out == self.layers or self.block.shape[2:] != (rows, heads, capacity, dim) or self.block.dtype != like.dtype:
            return None
        keys, values = self.block[self.handed_out].unbind(0)
        self.handed_out += 1
        return keys, values


class GrowingLayer(DynamicLayer):
    """One layer's keys and values: buffers [R, H, capacity, D], the first `length` columns used."""

    def __init__(self, dtype: torch.dtype | None = None, reserve: int = 0, block: _Block | None = None,
                 rows: int | None = None):
        super().__init__()
        self.store_dtype = dtype  # None: whatever dtype the first keys come in
        self.reserve = reserve  # columns to make room for whenever a buffer is allocated
        self._block = block  # where the first buffers come from (None: allocate them here)
        self.rows = rows  # rows of the first buffers (None: as many as the first keys have)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._k_length = self._v_length = 0  # equal except between the two assignments below
        self.live_rows: int | None = None  # rows in use, the first ones (None: all of the buffers')

    # Whoever reassigns `keys` and `values` (merging, trimming) sets both.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[: self.live_rows, :, : self._k_length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k, self._k_length, self.live_rows = value, 0 if value is None else value.shape[-2], None

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[: self.live_rows, :, : self._v_length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v, self._v_length, self.live_rows = value, 0 if value is None else value.shape[-2], None

    @property
    def row_capacity(self) -> int:
        """Rows the buffers hold, those in use and the spare ones."""
        return 0 if self._k is None else self._k.shape[0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append columns to the first rows (as many as key_states [P, H, T, D] has); returns
        those rows' keys and values [P, H, L, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.store_dtype is not None:
            key_states, value_states = key_states.to(self.store_dtype), value_states.to(self.store_dtype)
        length, new, rows = self._k_length, key_states.shape[-2], key_states.shape[0]
        if self._k is None or length == 0:
            self._k, self._v = self._first_buffers(key_states)
        elif length + new > self._k.shape[-2]:
            self._k, self._v = self._grown(self.keys, new), self._grown(self.values, new)
        self._k[:rows, :, length : length + new] = key_states
        self._v[:rows, :, length : length + new] = value_states
        self._k_length = self._v_length = length + new
        return self._k[:rows, :, : length + new], self._v[:rows, :, : length + new]

    def _capacity(self, needed: int) -> int:
        """Columns of a new buffer: the reserve, or (beyond it) what is needed plus spare ones."""
        return self.reserve if needed <= self.reserve else needed + SPARE_COLUMNS

    def _first_buffers(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised: rows a forward skips hold garbage until written (`clear_rows` zeroes them)."""
        _, heads, _, dim = keys.shape
        rows, capacity = self.rows or keys.shape[0], self._capacity(keys.shape[-2])
        taken = self._block.take(keys.new_empty(rows, heads, 0, dim), capacity) if self._block is not None else None
        if taken is not None:
            return taken
        return keys.new_empty(rows, heads, capacity, dim), keys.new_empty(rows, heads, capacity, dim)

    def _grown(self, filled: torch.Tensor, incoming: int) -> torch.Tensor:
        """A copy of `filled` in a fresh buffer with room for `incoming` more columns and spare ones."""
        rows, heads, length, dim = filled.shape
        buffer = filled.new_empty(rows, heads, self._capacity(length + incoming), dim)
        buffer[:, :, :length] = filled
        return buffer

    @property
    def spare(self) -> int:
        """Columns the buffers hold beyond the filled ones."""
        return 0 if self._k is None else self._k.shape[-2] - self._k_length

    def drop_leading(self, columns: int) -> None:
        """Forget every row's first `columns` columns; a view of the same buffers, the spare room kept."""
        if self._k is not None:
            self._k, self._v = self._k[:, :, columns:], self._v[:, :, columns:]
            self._k_length = self._v_length = self._k_length - columns

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices` (in that order), and the spare room."""
        if self._k is not None and self._k_length > 0:
            self._k, self._v = self._rows(self._k, indices), self._rows(self._v, indices)
            self.live_rows = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def _rows(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` of a buffer, in a fresh buffer of the same capacity (only the filled part copied)."""
        out = buffer.new_empty((len(indices), *buffer.shape[1:]))
        out[:, :, : self._k_length] = buffer[indices.to(buffer.device), :, : self._k_length]
        return out


def new_cache(config, dtype: torch.dtype | None = None, reserve: int = 0, rows: int | None = None) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers append in place, storing keys and
    values in `dtype` (None: the model's), with room for `reserve` columns from the first write
    in one block shared by the layers, and for `rows` rows (None: as many as the first write has).
    Sliding-window layers (Gemma) keep transformers' own."""
    cache = DynamicCache(config=config)
    growing = [type(layer) is DynamicLayer for layer in cache.layers]
    block = _Block(sum(growing)) if reserve else None
    cache.layers = [GrowingLayer(dtype, reserve, block, rows) if g else layer for g, layer in zip(growing, cache.layers)]
    return cache


class _Window(DynamicLayer):
    """Rows `rows` of a GrowingLayer, for one forward whose new columns are the layer's columns
    [start, start + T): written where `write` [N, T] is set, kept as they are elsewhere."""

    def __init__(self, layer: GrowingLayer, rows: torch.Tensor, start: int, write: torch.Tensor):
        super().__init__()
        self.layer, self.rows, self.start, self.write = layer, rows, start, write
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.start + key_states.shape[-2]
        write = self.write[:, None, :, None]  # [N, 1, T, 1]
        layer = self.layer
        for buffer, new in ((layer._k, key_states), (layer._v, value_states)):
            old = buffer[self.rows, :, self.start : end]
            buffer[self.rows, :, self.start : end] = torch.where(write, new.to(buffer.dtype), old)
        return layer._k[self.rows, :, :end], layer._v[self.rows, :, :end]  # [N, H, end, D] copies


def catch_up_cache(cache: DynamicCache, rows: torch.Tensor, start: int, write: torch.Tensor) -> DynamicCache:
    """A cache for one forward of rows `rows` [N] over columns [start, start + T) of `cache`
    (T = write.shape[1]): keys and values are written into those columns where `write` [N, T]
    is set (the columns a lagging row skipped) and the rest stay as they are; attention reads the
    rows' columns [0, start + T)."""
    window = DynamicCache()
    window.layers = [_Window(layer, rows, start, write) for layer in cache.layers]
    return window


def merge_caches(first: DynamicCache, second: DynamicCache, pieces: list[tuple[int, int, int]], length: int,
                 spare: int) -> None:
    """`first` takes both caches' rows in the order of `pieces` ((0 or 1, start, end): rows
    start..end of `first` or of `second`), each row left-padded with zeros to `length` filled
    columns. Each row is copied once, into buffers with `spare` columns of room beyond them."""
    for mine, theirs in zip(first.layers, second.layers):
        layers = (mine, theirs)
        rows = sum(end - start for _, start, end in pieces)
        _, heads, _, dim = mine._k.shape
        capacity = length + spare
        merged = []
        for name in ("_k", "_v"):
            out = mine._k.new_empty(rows, heads, capacity, dim)
            at = 0
            for which, start, end in pieces:
                layer, n = layers[which], end - start
                filled = layer._k_length
                out[at : at + n, :, : length - filled] = 0
                out[at : at + n, :, length - filled : length] = getattr(layer, name)[start:end, :, :filled]
                at += n
            merged.append(out)
        mine._k, mine._v = merged
        mine._k_length = mine._v_length = length
        mine.live_rows = None


def write_rows(cache: DynamicCache, rows: Sequence[int], sources: Sequence[int], other: DynamicCache) -> None:
    """Row rows[i] of `cache` takes row sources[i] of `other`, right-aligned to `cache`'s filled
    columns (at least as many as `other`'s) and zero before: a joining sequence's prompt, written
    into spare or vacated rows."""
    for mine, theirs in zip(cache.layers, other.layers):
        length, filled = mine._k_length, theirs._k_length
        target, source = (torch.tensor(side, device=mine._k.device) for side in (rows, sources))
        for buffer, new in ((mine._k, theirs._k), (mine._v, theirs._v)):
            buffer[target, :, : length - filled] = 0
            buffer[target, :, length - filled : length] = new[source, :, :filled]


def in_place(cache: DynamicCache) -> bool:
    """Whether every layer appends in place (`GrowingLayer`): then rows can move and join within its buffers."""
    return all(isinstance(layer, GrowingLayer) for layer in cache.layers)


def set_live_rows(cache: DynamicCache, rows: int) -> None:
    """The first `rows` rows of every layer's buffers are in use (the rest are spare)."""
    for layer in cache.layers:
        layer.live_rows = rows


def move_rows(cache: DynamicCache, rows: torch.Tensor, sources: torch.Tensor) -> None:
    """Row rows[i] of every layer takes the filled columns of row sources[i] (the others stay): a
    swap of a few rows copies only those rows."""
    for layer in cache.layers:
        layer._k[rows, :, : layer._k_length] = layer._k[sources, :, : layer._k_length]
        layer._v[rows, :, : layer._v_length] = layer._v[sources, :, : layer._v_length]


def clear_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Zero the filled columns of rows never written (an amateur whose prompt was skipped), so
    that no uninitialised memory reaches attention once they are caught up."""
    for layer in cache.layers:
        layer._k[rows, :, : layer._k_length] = 0
        layer._v[rows, :, : layer._v_length] = 0
