"""Grouped-query attention without copying keys and values for every query head.

transformers' "sdpa" attention repeats the KV heads to the number of query heads whenever an
attention mask is given (always, with left padding), copying the whole KV cache at every layer
of every step. Here, one decode token's query heads that share a KV head are folded into the
query-length axis and attend to that KV head directly; prefill uses `enable_gqa`. Same
arithmetic, no copies. Registered with transformers' AttentionInterface as "cold_sdpa".

Attention runs in the dtype of the keys: a bfloat16 KV cache under a float32 model
(`Engine(kv_dtype=...)`) gets a bfloat16 query and gives its output back in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "cold_sdpa"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [B, Hq, T, D]; key, value [B, Hkv, L, D]; attention_mask bool [B, 1, T, L] or None.

    Returns ([B, T, Hq, D], None) like transformers' attention functions.
    """
    batch, q_heads, q_len, dim = query.shape
    compute_dtype = query.dtype
    query = query.to(key.dtype)
    kv_heads = key.shape[1]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    causal = q_len > 1 and attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if q_len == 1 and kv_heads != q_heads:
        group = q_heads // kv_heads
        folded = query.view(batch, kv_heads, group, dim)  # the group's heads act as query positions
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
        out = out.view(batch, q_heads, 1, dim)
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=causal, enable_gqa=kv_heads != q_heads,
        )
    return out.transpose(1, 2).to(compute_dtype).contiguous(), None


def use_grouped_attention(model) -> None:
    """Switch a transformers model that uses "sdpa" attention to the grouped version."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
