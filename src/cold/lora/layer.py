"""Row-indexed LoRA layers: one copy of the base weights, a LoRA delta only for the rows that ask for it.

In every adapted linear layer

    y[r] = x[r] W^T + row_scale[r] * (x[r] A[k]^T) B[k]^T      with k = row_adapter[r]

where the adapters are stacked (A: [n_adapters, r_max, in], B: [n_adapters, out, r_max], each
B pre-multiplied by its adapter's lora_alpha/r scale) and `row_scale` is 0 for rows that run the
bare base model (the amateur rows of CoLD), 1 for a plain expert row, or any other factor.
The rows' adapters and scales come from the model's shared `RowSelection` (`cold.lora.routing`);
the delta is one of the ops of `cold.lora.ops`: `lora_delta_single` on the run of rows that holds
every adapted row when they share one adapter (CoLD's amateur rows, laid out after the experts,
skip the LoRA), `lora_delta_gathered` otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from cold.errors import ColdError
from cold.load.adapters import LoraAdapter, check_adapter_fits
from cold.lora.ops import lora_delta_gathered, lora_delta_single
from cold.lora.routing import RowSelection


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
