"""A KV cache that appends in place instead of re-concatenating the whole cache every step.

transformers' `DynamicLayer` grows by `torch.cat`, which copies the full cache of every layer at
every decode step (O(length) per step; at batch 16 it was a quarter of the step time here).
`GrowingLayer` keeps a buffer with spare capacity and writes the new column into it; `keys` and
`values` are views of the filled part, so everything that reads or reassigns them (row
selection, beam reordering, merging batches) works unchanged.

The buffers may hold a narrower dtype than the model computes in (`new_cache(config, dtype)`,
e.g. bfloat16 under a float32 model: half the cache memory); keys and values are rounded to it
when written, and attention (`cold.attention`, `cold.lean`) computes in the cache's dtype.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 64  # extra capacity allocated whenever the buffer must grow


class GrowingLayer(DynamicLayer):
    """One layer's keys and values: buffers [R, H, capacity, D], the first `length` columns used."""

    def __init__(self, dtype: torch.dtype | None = None):
        super().__init__()
        self.store_dtype = dtype  # None: whatever dtype the first keys come in
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._k_length = self._v_length = 0  # equal except between the two assignments below

    # Whoever reassigns `keys` and `values` (row selection, beam reordering, merging) sets both.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._k_length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k, self._k_length = value, 0 if value is None else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._v_length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v, self._v_length = value, 0 if value is None else value.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.store_dtype is not None:
            key_states, value_states = key_states.to(self.store_dtype), value_states.to(self.store_dtype)
        length, new = self._k_length, key_states.shape[-2]
        if self._k is None or length == 0:
            self._k, self._v = self._grown(key_states, 0), self._grown(value_states, 0)
        else:
            if length + new > self._k.shape[-2]:
                self._k, self._v = self._grown(self.keys, new), self._grown(self.values, new)
            self._k[:, :, length : length + new] = key_states
            self._v[:, :, length : length + new] = value_states
        self._k_length = self._v_length = length + new
        return self.keys, self.values

    @staticmethod
    def _grown(filled: torch.Tensor, incoming: int) -> torch.Tensor:
        """A copy of `filled` in a fresh buffer with room for `incoming` + spare columns."""
        rows, heads, length, dim = filled.shape
        buffer = filled.new_empty(rows, heads, length + incoming + SPARE_COLUMNS, dim)
        buffer[:, :, :length] = filled
        return buffer


def new_cache(config, dtype: torch.dtype | None = None) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers append in place, storing keys and
    values in `dtype` (None: the model's). Sliding-window layers (Gemma) keep transformers' own."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(dtype) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
