"""The LoRA delta of a batch of rows, three ways with one signature; tests check they agree.

For rows r with adapter k = row_adapter[r] >= 0 (stacked adapters, B pre-scaled by lora_alpha/r):

    for r in range(R):
        out[r] = row_scale[r] * (x[r] @ lora_a[k].T) @ lora_b[k].T      # 0 where k == -1

`lora_delta_reference` is that loop; `lora_delta_single` is the fast case where every adapted row
uses one adapter (two plain matmuls); `lora_delta_gathered` handles any mix (one gather, two
batched matmuls: the BGMV op of multi-LoRA servers).
"""

from __future__ import annotations

import torch


def lora_delta_reference(x, lora_a, lora_b, row_adapter, row_scale):
    """Plain definition, one row at a time.

    x: [R, T, in]; lora_a: [n, r, in]; lora_b: [n, out, r] (scale folded in);
    row_adapter: [R] long (-1 = none); row_scale: [R]. Returns [R, T, out].
    """
    out = x.new_zeros(x.shape[0], x.shape[1], lora_b.shape[1])
    for row in range(x.shape[0]):
        k = int(row_adapter[row])
        if k >= 0:
            out[row] = row_scale[row] * ((x[row] @ lora_a[k].T) @ lora_b[k].T)
    return out


def lora_delta_single(x, lora_a, lora_b, adapter: int, row_scale):
    """Same result when every adapted row uses adapter `adapter`: no gather, two plain matmuls."""
    h = (x @ lora_a[adapter].T) * row_scale.to(x.dtype)[:, None, None]  # [R, T, r]
    return h @ lora_b[adapter].T  # [R, T, out]


def lora_delta_gathered(x, lora_a, lora_b, row_adapter, row_scale):
    """Same result as `lora_delta_reference` with one gather and two batched matmuls."""
    k = row_adapter.clamp(min=0)
    a = lora_a[k]  # [R, r, in]
    b = lora_b[k]  # [R, out, r]
    h = torch.bmm(x, a.transpose(1, 2)) * row_scale.to(x.dtype)[:, None, None]  # [R, T, r]
    return torch.bmm(h, b.transpose(1, 2))  # [R, T, out]
