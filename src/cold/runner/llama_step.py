"""The fused decode step for Llama-family models: the same arithmetic as transformers' forward in
far fewer tensor calls.

One decode step (one new token per row) runs through the transformer body directly:

- the base weights are the model's own tensors, used in place (never copied or fused);
- the LoRA A matrices of q/k/v (of gate/up) are stacked, so each group costs one A matmul and
  one row-scale multiply, and each member one in-place `addmm_` of its B, on the adapted rows
  only (`RowSelection.span`: CoLD's amateur rows come after the expert rows and skip the LoRA);
- residual adds are folded into the output projections (`addmm`);
- rotary embedding is applied to q and k in one go; attention is the same grouped SDPA call as
  the reference path (`cold.runner.attention`).

It covers the common case only: a Llama-architecture model without biases, a decode step
(one token per row), and a batch whose adapted rows all use one adapter (`RowSelection.single`).
Everything else (prefill, several adapters in one batch, other architectures) runs the reference
path, `LlamaModel.forward` with `RowLoRALinear` layers. `Engine(..., lean=False)` turns this off;
the tests check both paths give the same hidden states and the same greedy tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cold.lora.layer import RowLoRALinear, RowSelection


def supports(model) -> bool:
    """Whether `model` is a Llama-architecture causal LM this step reproduces exactly."""
    config = model.config
    return (
        config.model_type == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
        and getattr(config, "_attn_implementation", None) in ("sdpa", "cold_sdpa")
    )


@dataclass
class LoraGroup:
    """The LoRA of linear layers that share an input (q/k/v, or gate/up), per adapter.

    One matmul gives every member's LoRA hidden state, h = (x A^T) * row scale with the members'
    A matrices stacked; each member then adds h[:, its columns] B^T to its own output.
    """

    a: list[torch.Tensor]  # per adapter: [r_total, in], the members' A stacked
    b_t: list[list[torch.Tensor | None]]  # per adapter, per member: B^T [r, out] (None: not adapted)
    spans: list[tuple[int, int]]  # per member: its columns of h

    def hidden(self, x: torch.Tensor, adapter: int, scale: torch.Tensor) -> torch.Tensor:
        """x [A, in] (the adapted rows), scale [A, 1] -> h [A, r_total]."""
        return F.linear(x, self.a[adapter]) * scale

    def add(self, y: torch.Tensor, h: torch.Tensor, member: int, adapter: int) -> None:
        """Add member `member`'s LoRA delta to y [A, out] (a view of the adapted rows) in place."""
        b_t = self.b_t[adapter][member]
        if b_t is not None:
            start, end = self.spans[member]
            y.addmm_(h[:, start:end], b_t)


@dataclass
class LeanLayer:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    q: torch.Tensor  # [Hq * D, H] (the Linear weights themselves, not copies)
    k: torch.Tensor  # [Hkv * D, H]
    v: torch.Tensor  # [Hkv * D, H]
    o_t: torch.Tensor  # [Hq * D, H], o_proj's weight transposed (a view)
    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down_t: torch.Tensor  # [I, H], down_proj's weight transposed (a view)
    lora_qkv: LoraGroup | None
    lora_o: LoraGroup | None
    lora_gate_up: LoraGroup | None
    lora_down: LoraGroup | None


class LeanDecoder(nn.Module):
    """The lean decode step of one model; rebuild it (`LeanDecoder(model)`) after adapters change.

    A module (calling it runs the step) only so that forward hooks can time it like the body it replaces.
    """

    def __init__(self, model):
        super().__init__()
        config = model.config
        self.body = model.get_decoder()
        self.eps = config.rms_norm_eps
        self.q_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.layers = [self._layer(layer) for layer in self.body.layers[: config.num_hidden_layers]]

    def _layer(self, layer) -> LeanLayer:
        attn, mlp = layer.self_attn, layer.mlp
        weight = lambda module: _base(module).weight  # noqa: E731
        return LeanLayer(
            input_norm=layer.input_layernorm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            q=weight(attn.q_proj), k=weight(attn.k_proj), v=weight(attn.v_proj), o_t=weight(attn.o_proj).T,
            gate=weight(mlp.gate_proj), up=weight(mlp.up_proj), down_t=weight(mlp.down_proj).T,
            lora_qkv=lora_group([attn.q_proj, attn.k_proj, attn.v_proj]),
            lora_o=lora_group([attn.o_proj]),
            lora_gate_up=lora_group([mlp.gate_proj, mlp.up_proj]),
            lora_down=lora_group([mlp.down_proj]),
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm, written out (float32 models: the same operations in the same order)."""
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def forward(self, input_ids, attention_mask, position_ids, cache, rows: RowSelection) -> torch.Tensor:
        """One token per row: input_ids, position_ids [R, 1]; attention_mask [R, L] (1 = real
        token, the new one included); the cache is updated in place. Returns hidden states [R, H]
        after the final norm, as `LlamaModel.forward(...).last_hidden_state[:, -1]`."""
        body, heads, kv, dim = self.body, self.q_heads, self.kv_heads, self.head_dim
        x = body.embed_tokens(input_ids[:, 0])  # [R, H]
        rows_n = x.shape[0]
        cos, sin = body.rotary_emb(x[:, None], position_ids)  # [R, 1, D] each, broadcast over heads
        mask = attention_mask[:, None, None, :].bool()  # [R, 1, 1, L]
        adapter = rows.single if rows.single is not None and rows.single >= 0 else None
        lora = adapter is not None
        span = rows.span  # the adapted rows: only they pay for the LoRA (CoLD's amateur rows follow them)
        scale = rows.scale[span, None].to(x.dtype) if lora else None  # [A, 1]
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            q, k, value = F.linear(h, layer.q), F.linear(h, layer.k), F.linear(h, layer.v)
            if lora and layer.lora_qkv:
                low = layer.lora_qkv.hidden(h[span], adapter, scale)
                for i, y in enumerate((q, k, value)):
                    layer.lora_qkv.add(y[span], low, i, adapter)
            qk = _rotate(torch.cat([q, k], dim=1).view(rows_n, heads + kv, dim), cos, sin)  # [R, Hq + Hkv, D]
            keys, values = cache.layers[index].update(qk[:, heads:, None], value.view(rows_n, kv, 1, dim))  # [R, Hkv, L, D]
            query = qk[:, :heads].reshape(rows_n, kv, heads // kv, dim)  # a KV head's query heads as positions
            attn = F.scaled_dot_product_attention(query.to(keys.dtype), keys, values, attn_mask=mask, scale=self.scaling)
            attn = attn.reshape(rows_n, heads * dim).to(x.dtype)  # the cache's dtype may be narrower
            x = torch.addmm(x, attn, layer.o_t)  # residual + o_proj
            if lora and layer.lora_o:
                layer.lora_o.add(x[span], layer.lora_o.hidden(attn[span], adapter, scale), 0, adapter)
            h = self._norm(x, layer.post_norm)
            gate, up = F.linear(h, layer.gate), F.linear(h, layer.up)
            if lora and layer.lora_gate_up:
                low = layer.lora_gate_up.hidden(h[span], adapter, scale)
                layer.lora_gate_up.add(gate[span], low, 0, adapter)
                layer.lora_gate_up.add(up[span], low, 1, adapter)
            m = F.silu(gate) * up  # [R, I]
            x = torch.addmm(x, m, layer.down_t)  # residual + down_proj
            if lora and layer.lora_down:
                layer.lora_down.add(x[span], layer.lora_down.hidden(m[span], adapter, scale), 0, adapter)
        return self._norm(x, body.norm.weight)


def _base(module: nn.Module) -> nn.Linear:
    return module.base if isinstance(module, RowLoRALinear) else module


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [R, heads, D] (HF's `apply_rotary_pos_emb`)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def lora_group(modules: list[nn.Module]) -> LoraGroup | None:
    """The LoRA of linear layers that share an input; None if none of them is adapted."""
    if not any(isinstance(m, RowLoRALinear) for m in modules):
        return None
    a_parts, b_parts, spans, col = [], [], [], 0
    for module in modules:
        if isinstance(module, RowLoRALinear):
            rank = module.lora_a.shape[1]
            a_parts.append(module.lora_a)  # [n, r, in]
            b_parts.append([b.T.contiguous() for b in module.lora_b.unbind(0)])  # per adapter [r, out]
        else:
            rank = 0
            b_parts.append(None)
        spans.append((col, col + rank))
        col += rank
    a = torch.cat(a_parts, dim=1)  # [n, r_total, in]
    n_adapters = a.shape[0]
    b_t = [[None if parts is None else parts[k] for parts in b_parts] for k in range(n_adapters)]
    return LoraGroup(a=[m.contiguous() for m in a.unbind(0)], b_t=b_t, spans=spans)
