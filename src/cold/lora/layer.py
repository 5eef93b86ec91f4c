"""Row-indexed LoRA: one copy of the base weights, a LoRA delta only for the rows that ask for it.

In every adapted linear layer

    y[r] = x[r] W^T + row_scale[r] * (x[r] A[k]^T) B[k]^T      with k = row_adapter[r]

where the adapters are stacked (A: [n_adapters, r_max, in], B: [n_adapters, out, r_max], each
B pre-multiplied by its adapter's lora_alpha/r scale) and `row_scale` is 0 for rows that run the
bare base model (the amateur rows of CoLD), 1 for a plain expert row, or any other factor (an
adapter scaled up or down). This is the batched-gather LoRA op (BGMV) of multi-LoRA servers.

`lora_delta_reference` is the readable definition; the layer uses `lora_delta_single` when all
adapted rows share one adapter (two plain matmuls on the run of rows that holds them, so CoLD's
amateur rows, laid out after the experts, skip the LoRA: the common CoLD case) and
`lora_delta_gathered` (one gather, two batched matmuls) otherwise; tests check all three agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cold.load.adapters import LoraAdapter, check_adapter_fits
from cold.errors import ColdError


@dataclass
class RowSelection:
    """Which adapter (index into the stack, -1 for none) and what scale each batch row uses.

    Shared by all `RowLoRALinear` layers of one model; the engine sets it before a forward pass.
    """

    adapter: torch.Tensor | None = None  # [R] long, -1 = base weights only
    scale: torch.Tensor | None = None  # [R] float, 0 where adapter == -1
    single: int | None = None  # the one adapter all adapted rows use (-1: none), None if several
    span: slice = field(default_factory=lambda: slice(None))  # rows holding every adapted row; others skip LoRA

    def set(self, adapter: torch.Tensor, scale: torch.Tensor, single: int | None = None, span: slice | None = None) -> None:
        """`single`: pass the adapter index when every row with adapter >= 0 uses it (fast path);
        `span`: rows outside it must have adapter -1 (CoLD's amateur rows come after the experts)."""
        self.adapter, self.scale = adapter, torch.where(adapter >= 0, scale, torch.zeros_like(scale))
        self.single = single
        self.span = slice(None) if span is None else span

    def clear(self) -> None:
        self.adapter = self.scale = self.single = None
        self.span = slice(None)


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


class RowLoRALinear(nn.Module):
    """A base `nn.Linear` (shared, untouched) plus stacked LoRA weights selected per row."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, rows: RowSelection):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a, persistent=False)  # [n, r_max, in]
        self.register_buffer("lora_b", lora_b, persistent=False)  # [n, out, r_max]
        self.rows = rows

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [R, T, in]
        y = self.base(x)
        rows = self.rows
        if rows.adapter is None or rows.single == -1:  # no adapted rows: the plain base layer
            return y
        if rows.single is not None:  # LoRA for the adapted span only (the expert rows of CoLD)
            span = rows.span
            y[span].add_(lora_delta_single(x[span], self.lora_a, self.lora_b, rows.single, rows.scale[span]))
            return y
        return y + lora_delta_gathered(x, self.lora_a, self.lora_b, rows.adapter, rows.scale)


def _stack(adapters: list[LoraAdapter], module_name: str, base: nn.Linear):
    """Stack every adapter's A and B for one module, zero-padded to the largest rank."""
    r_max = max(a.rank for a in adapters)
    dtype, device = base.weight.dtype, base.weight.device
    lora_a = torch.zeros(len(adapters), r_max, base.in_features, dtype=dtype, device=device)
    lora_b = torch.zeros(len(adapters), base.out_features, r_max, dtype=dtype, device=device)
    for slot, adapter in enumerate(adapters):
        if module_name in adapter.weights:
            a, b = adapter.weights[module_name]
            lora_a[slot, : adapter.rank] = a.to(device=device, dtype=dtype)
            lora_b[slot, :, : adapter.rank] = (b.float() * adapter.scale).to(device=device, dtype=dtype)
    return lora_a, lora_b


def _base_linear(module: nn.Module) -> nn.Linear:
    return module.base if isinstance(module, RowLoRALinear) else module


def install_adapters(model: nn.Module, adapters: list[LoraAdapter], rows: RowSelection) -> None:
    """Validate all adapters against `model`, then put row-indexed LoRA layers in place.

    Adapter k of `adapters` becomes stack index k. Calling again replaces the stacks (to add or
    remove adapters); the base weights are never copied or changed. Validation happens before any
    change, so a bad adapter leaves the model as it was.
    """
    if not adapters:
        raise ColdError("install_adapters needs at least one adapter")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ColdError(f"adapter names must be unique, got {names}")
    modules = {name: _base_linear(module) for name, module in model.named_modules()}
    for adapter in adapters:
        check_adapter_fits(adapter, modules)
    targets = sorted({m for a in adapters for m in a.weights})
    new_layers = {}
    for module_name in targets:
        base = modules[module_name]
        new_layers[module_name] = RowLoRALinear(base, *_stack(adapters, module_name, base), rows)
    uninstall_adapters(model)
    for module_name, layer in new_layers.items():
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)


def uninstall_adapters(model: nn.Module) -> None:
    """Put the plain base linear layers back."""
    for module_name, module in list(model.named_modules()):
        if isinstance(module, RowLoRALinear):
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)
