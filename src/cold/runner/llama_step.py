"""The fused forward for Llama-family models: the same arithmetic as transformers' forward in
far fewer tensor calls.

A decode step (one new token per row), and small chunks of the prefill and the lazy amateur's
catch-ups (several new tokens per row, as rows of the linear layers; `ModelRunner.forward` sends
chunks of more than `LEAN_CHUNK_TOKENS` to the reference path), run through the transformer body directly:

- linear layers that share an input run as one matmul: q/k/v, and gate/up. Their base weights
  are concatenated once into one tensor and the model's own layers are given views into it, so
  there is still one copy of the base weights (transformers' forward reads the same memory); the
  originals' pages, memory-mapped from the weights file, are given back to the system;
- the LoRA of such a group is one A matmul (the members' A stacked), one row-scale multiply and
  one product with the members' B as one block-diagonal matrix, added in place, on the adapted
  rows only (`RowSelection.span`: CoLD's amateur rows come after the expert rows and skip the
  LoRA); in float32 on the CPU when the model computes in a narrower dtype (`LoraGroup`);
- residual adds are folded into the output projections;
- on the CPU the base weights and the LM head are multiplied through oneDNN on copies reordered
  once into its blocked layout (`Dense`, one copy per model, where it fits in the free memory);
- rotary embedding is applied to q and k in one go; attention is the same grouped SDPA call as
  the reference path (`cold.runner.attention`).

It covers the common case only: a Llama-architecture model without biases, and a batch whose
adapted rows all use one adapter (`RowSelection.single`). Everything else (several adapters in
one batch, other architectures, large prefill chunks, the cache-less `ModelRunner.sequence_logits`) runs the reference
path, `LlamaModel.forward` with `RowLoRALinear` layers. `Engine(..., lean=False)` turns this off;
the tests check both paths give the same hidden states and the same greedy tokens.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

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
    """The LoRA of linear layers that share an input (q/k/v, gate/up, or one layer), per adapter,
    for their fused output (the members' outputs side by side).

    h = (x A^T) * row scale with the members' A matrices stacked, then y += h B^T with the
    members' B^T as one block-diagonal matrix (a member without this LoRA: a zero block).

    A and B^T are kept in float32 when a CPU model computes in a narrower dtype: oneDNN's bfloat16
    products of these thin matrices cost a fixed ~20 us each, float32 ones (MKL) a few; the
    sum is rounded to the model's dtype as the delta is added.
    """

    a: list[torch.Tensor]  # per adapter: [r_total, in], the members' A stacked
    b_t: list[torch.Tensor]  # per adapter: [r_total, out_total], the members' B^T block-diagonal

    def add(self, y: torch.Tensor, x: torch.Tensor, adapter: int, scale: torch.Tensor) -> None:
        """y [A, out_total] (a view of the adapted rows) += LoRA delta of x [A, in]; scale [A, 1]."""
        a, b_t = self.a[adapter], self.b_t[adapter]
        if a.dtype == x.dtype:
            y.addmm_(F.linear(x, a) * scale, b_t)
        else:
            y.add_(torch.mm(x.to(a.dtype), a.T).mul_(scale).mm(b_t))


class Dense:
    """x @ W^T for a fixed weight W [out, in]: through oneDNN with W reordered once into its blocked
    layout where the CPU build can (float32 anywhere; bfloat16 with AVX512-BF16 or AVX-NE-CONVERT),
    otherwise `F.linear`. At a few rows the reordered weight is read at the memory's speed, where
    the plain layout's matrix-matrix kernels fall well short of it (bench/README.md)."""

    def __init__(self, weight: torch.Tensor, packed: dict | None = None):
        """`packed`: where the reordered weights of this model are kept, keyed by memory, shape and
        version, so that every lean step over the model shares one copy (None: no reordering)."""
        self.weight = weight  # [out, in]
        self.packed = None
        if packed is not None:
            key = (weight.data_ptr(), tuple(weight.shape), weight.dtype, weight._version)
            if key not in packed:
                packed[key] = _reordered(weight)
            self.packed = packed[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, in] -> [R, out]."""
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual [R, out] + x @ W^T, in one call."""
        if self.packed is None:
            return torch.addmm(residual, x, self.weight.T)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, None, "add")


PACK_ROWS = 2  # the row count oneDNN's weight layout is chosen for (one CoLD pair); it serves any count
# model -> its reordered weights, {(data_ptr, shape, dtype, version): mkldnn tensor or None}; kept
# beside the model rather than on it, so that copies of the model (deepcopy) do not carry them
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PACK_SHARE = 0.25  # reorder a model's weights only when the copy takes at most this share of the free memory


def should_pack(model) -> bool:
    """Whether to keep a reordered copy of `model`'s weights for the lean step: on the CPU, where
    the copy (about the model's size: the plain weights stay for prefill) fits in PACK_SHARE of the
    memory that is free now. COLD_PACK_WEIGHTS=0 or 1 decides instead."""
    forced = os.environ.get("COLD_PACK_WEIGHTS")
    if forced in ("0", "1"):
        return forced == "1"
    if _PACKED.get(model):  # reordered for an earlier lean step: share them
        return True
    weights = list(model.parameters())
    if not weights or weights[0].device.type != "cpu":
        return False
    size = sum(p.numel() * p.element_size() for p in weights)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no cheap way to ask
        return False
    return size <= PACK_SHARE * free


def _reordered(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in oneDNN's blocked layout (an opaque mkldnn tensor), or None where it cannot be."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available() or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
    except RuntimeError:  # e.g. bfloat16 on a CPU without the instructions oneDNN's bfloat16 path needs
        return None


@dataclass
class LeanLayer:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv: Dense  # [(Hq + 2 Hkv) * D, H]: q, k and v weights back to back (the layers' weights are views of it)
    o: Dense  # [H, Hq * D], o_proj's weight
    gate_up: Dense  # [2 I, H]: gate and up weights back to back (likewise)
    down: Dense  # [H, I], down_proj's weight
    lora_qkv: LoraGroup | None
    lora_o: LoraGroup | None
    lora_gate_up: LoraGroup | None
    lora_down: LoraGroup | None


class LeanDecoder(nn.Module):
    """The lean decode step of one model; rebuild it (`LeanDecoder(model)`) after adapters change.

    A module (calling it runs the step) only so that forward hooks can time it like the body it replaces.
    """

    def __init__(self, model, pack: bool = True):
        """`pack`: run the base weights' matmuls on oneDNN-reordered copies (`Dense`), shared by
        every lean step over `model`."""
        super().__init__()
        config = model.config
        self.packed = _PACKED.setdefault(model, {}) if pack else None
        self.body = model.get_decoder()
        self.eps = config.rms_norm_eps
        self.q_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.layers = [self._layer(layer) for layer in self.body.layers[: config.num_hidden_layers]]
        head = model.get_output_embeddings()
        plain_head = type(head) is nn.Linear and head.bias is None
        self.head = Dense(head.weight, self.packed) if plain_head else None  # the LM head (None: the model's own module)

    def _layer(self, layer) -> LeanLayer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        return LeanLayer(
            input_norm=layer.input_layernorm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            qkv=Dense(fused_weight(qkv), self.packed), o=Dense(_base(attn.o_proj).weight, self.packed),
            gate_up=Dense(fused_weight(gate_up), self.packed), down=Dense(_base(mlp.down_proj).weight, self.packed),
            lora_qkv=lora_group(qkv), lora_o=lora_group([attn.o_proj]),
            lora_gate_up=lora_group(gate_up), lora_down=lora_group([mlp.down_proj]),
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm (float32 models: the same result; narrower ones: the norm itself in float32)."""
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def forward(self, input_ids, attention_mask, position_ids, cache, rows: RowSelection) -> torch.Tensor:
        """T new tokens per row (a decode step: T = 1; a prefill or catch-up chunk: more):
        input_ids, position_ids [R, T]; attention_mask [R, L] (1 = real token; the new tokens are
        its last T columns, each attending to the columns up to its own); the cache is updated in
        place. Returns the hidden states [R, H] of each row's last new token after the final norm,
        as `LlamaModel.forward(...).last_hidden_state[:, -1]`."""
        body, heads, kv, dim = self.body, self.q_heads, self.kv_heads, self.head_dim
        rows_n, new = input_ids.shape
        x = body.embed_tokens(input_ids)  # [R, T, H]
        cos, sin = body.rotary_emb(x, position_ids)  # [R, T, D] each
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        x = x.reshape(rows_n * new, -1)  # [R T, H]: the linear layers see every new token as a row
        mask = _attention_mask(attention_mask, new)  # [R, 1, 1 or T, L]
        adapter = rows.single if rows.single is not None and rows.single >= 0 else None
        lora = adapter is not None
        span = _token_rows(rows.span, new)  # the adapted rows' tokens: only they pay for the LoRA (CoLD's amateur rows follow them)
        scale = None
        if lora:
            per_token = rows.scale if new == 1 else rows.scale.repeat_interleave(new)  # [R T]
            scale = per_token[span, None].to(lora_dtype(x))  # [A T, 1]
        qk_width, inner = (heads + kv) * dim, self.layers[0].gate_up.weight.shape[0] // 2 if self.layers else 0
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            qkv = layer.qkv(h)  # [R T, (Hq + 2 Hkv) D]
            if lora and layer.lora_qkv:
                layer.lora_qkv.add(qkv[span], h[span], adapter, scale)
            qk = _rotate(qkv[:, :qk_width].reshape(rows_n, new, heads + kv, dim), cos, sin)  # [R, T, Hq + Hkv, D]
            value = qkv[:, qk_width:].reshape(rows_n, new, kv, dim).transpose(1, 2)  # [R, Hkv, T, D]
            keys, values = cache.layers[index].update(qk[:, :, heads:].transpose(1, 2), value)  # [R, Hkv, L, D]
            attn = self._attend(qk[:, :, :heads], keys, values, mask).to(x.dtype)  # [R T, Hq D]; the cache's dtype may be narrower
            x = layer.o.add_to(x, attn)  # residual + o_proj
            if lora and layer.lora_o:
                layer.lora_o.add(x[span], attn[span], adapter, scale)
            h = self._norm(x, layer.post_norm)
            gate_up = layer.gate_up(h)  # [R T, 2 I]
            if lora and layer.lora_gate_up:
                layer.lora_gate_up.add(gate_up[span], h[span], adapter, scale)
            m = F.silu(gate_up[:, :inner]) * gate_up[:, inner:]  # [R T, I]
            x = layer.down.add_to(x, m)  # residual + down_proj
            if lora and layer.lora_down:
                layer.lora_down.add(x[span], m[span], adapter, scale)
        return self._norm(x.view(rows_n, new, -1)[:, -1], body.norm.weight)

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention of query [R, T, Hq, D] to keys, values [R, Hkv, L, D] under
        mask [R, 1, 1 or T, L]; returns [R T, Hq D]. One token per row: a KV head's query heads
        act as its query positions (no copy of the keys per query head), as `cold.runner.attention`."""
        rows_n, new, heads, dim = query.shape
        query = query.to(keys.dtype)
        if new == 1:
            folded = query.reshape(rows_n, self.kv_heads, heads // self.kv_heads, dim)
            out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=self.scaling)
            return out.reshape(rows_n, heads * dim)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scaling,
                                             enable_gqa=self.kv_heads != heads)  # [R, Hq, T, D]
        return out.transpose(1, 2).reshape(rows_n * new, heads * dim)


def _attention_mask(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """[R, 1, 1 or T, L] bool: column j is visible to new token t where it is a real token and
    j <= L - T + t (causal within the T new columns, the last ones); a query with nothing to
    see gets zeros from SDPA, as in transformers' forward."""
    visible = attention_mask[:, None, None, :].bool()
    if new == 1:
        return visible
    length = attention_mask.shape[1]
    causal = torch.ones(new, length, dtype=torch.bool, device=attention_mask.device).tril(length - new)  # [T, L]
    return visible & causal


def _token_rows(span: slice, new: int) -> slice:
    """The rows of the token-flattened [R T, ...] activations that a row span covers."""
    if new == 1:
        return span
    return slice(None if span.start is None else span.start * new, None if span.stop is None else span.stop * new)


def _base(module: nn.Module) -> nn.Linear:
    return module.base if isinstance(module, RowLoRALinear) else module


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [R, T, heads, D], cos and sin [R, T, 1, D] (HF's `apply_rotary_pos_emb`)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def fused_weight(modules: list[nn.Module]) -> torch.Tensor:
    """[sum of out, in]: the base weights of linear layers that share an input, back to back.

    Concatenated once; each layer's weight is then replaced by its view into the result, so the
    model keeps one copy. Layers fused before (by an earlier LeanDecoder) are used as they are.
    """
    bases = [_base(m) for m in modules]
    weights = [b.weight for b in bases]
    first = weights[0]
    rows = sum(w.shape[0] for w in weights)
    offsets = [w.storage_offset() for w in weights]
    if (all(w.is_contiguous() and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for w in weights)
            and all(o + w.numel() == n for o, w, n in zip(offsets, weights, offsets[1:]))):
        return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))
    fused = torch.cat([w.detach() for w in weights])
    start = 0
    for base, weight in zip(bases, weights):
        base.weight = nn.Parameter(fused[start : start + weight.shape[0]], requires_grad=weight.requires_grad)
        start += weight.shape[0]
    mapped = _file_mappings()
    for weight in weights:
        _drop_file_pages(weight, mapped)
    return fused


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory mappings (/proc/self/maps; [] elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _drop_file_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Give back the resident pages of a weight that was memory-mapped from its file (safetensors)
    and has just been copied into a fused tensor: they would otherwise stay resident beside the
    copy as long as the file stays mapped. Only file-backed memory is touched (a page dropped
    there is read back from the file if anyone reads it again), and only whole pages."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or not any(a <= start and end <= b for a, b in mapped):
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


MADV_DONTNEED = 4  # Linux madvise advice: drop the pages (file-backed ones are read back from the file)


def lora_group(modules: list[nn.Module]) -> LoraGroup | None:
    """The LoRA of linear layers that share an input, for their fused output; None if none is adapted."""
    adapted = [m for m in modules if isinstance(m, RowLoRALinear)]
    if not adapted:
        return None
    n_adapters = adapted[0].lora_a.shape[0]
    like = adapted[0].lora_a
    dtype = lora_dtype(like)
    a, b_t = [], []
    for k in range(n_adapters):
        a_parts, blocks, width = [], [], sum(_base(m).weight.shape[0] for m in modules)
        column = 0
        for module in modules:
            out = _base(module).weight.shape[0]
            if isinstance(module, RowLoRALinear):
                a_parts.append(module.lora_a[k])  # [r, in]
                block = like.new_zeros(module.lora_a.shape[1], width)
                block[:, column : column + out] = module.lora_b[k].T  # B^T [r, out] in this member's columns
                blocks.append(block)
            column += out
        a.append(torch.cat(a_parts).to(dtype).contiguous())  # [r_total, in]
        b_t.append(torch.cat(blocks).to(dtype).contiguous())  # [r_total, out_total]
    return LoraGroup(a=a, b_t=b_t)


def lora_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the lean step's LoRA products for a model whose weights are like `weight`:
    float32 on the CPU for narrower floats (see `LoraGroup`), the weights' own elsewhere."""
    narrow = weight.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if narrow and weight.device.type == "cpu" else weight.dtype
