"""Read and validate PEFT LoRA adapter directories.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, as written by
`PeftModel.save_pretrained`. Everything the engine cannot reproduce exactly is refused with an
error that names the feature; nothing is ever silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cold.errors import ColdError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# `base_model.model.<module path>.lora_A.weight` (PEFT strips the adapter name when saving).
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")

# Config entries that change the maths; each must have its neutral value.
_UNSUPPORTED = {
    "use_dora": ("DoRA (use_dora=true)", lambda v: bool(v)),
    "modules_to_save": ("modules_to_save (fully trained extra modules)", lambda v: bool(v)),
    "bias": ("LoRA bias (bias != 'none')", lambda v: v not in (None, "none")),
    "lora_bias": ("LoRA bias (lora_bias=true)", lambda v: bool(v)),
    "fan_in_fan_out": ("fan_in_fan_out=true (Conv1D layers)", lambda v: bool(v)),
    "rank_pattern": ("per-module ranks (rank_pattern)", lambda v: bool(v)),
    "alpha_pattern": ("per-module alphas (alpha_pattern)", lambda v: bool(v)),
    "target_parameters": ("target_parameters (LoRA on raw parameters)", lambda v: bool(v)),
    "trainable_token_indices": ("trainable_token_indices", lambda v: bool(v)),
    "use_qalora": ("QALoRA", lambda v: bool(v)),
}


@dataclass
class LoraAdapter:
    """One LoRA adapter: per module, A [r, in_features] and B [out_features, r], and its scale."""

    name: str
    path: Path
    rank: int
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rslora
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # module -> (A, B)

    @property
    def modules(self) -> list[str]:
        return sorted(self.weights)


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise ColdError(f"adapter {path}: directory not found")
    if not config_path.is_file():
        raise ColdError(f"adapter {path}: missing {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ColdError(f"adapter {path}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ColdError(f"adapter {path}: {CONFIG_FILE} must hold a JSON object")
    return config


def _check_config(path: Path, config: dict) -> tuple[int, float]:
    """Refuse unsupported features; return (rank, scale)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ColdError(f"adapter {path}: PEFT type {peft_type!r} is not supported; only LORA adapters are")
    for key, (feature, is_used) in _UNSUPPORTED.items():
        if is_used(config.get(key)):
            raise ColdError(f"adapter {path}: {feature} is not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ColdError(f"adapter {path}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ColdError(f"adapter {path}: lora_alpha must be a finite number, got {alpha!r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scale)


def _read_weights(path: Path, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        if (path / "adapter_model.bin").is_file():
            raise ColdError(
                f"adapter {path}: only {WEIGHTS_FILE} is read (adapter_model.bin is a pickle); "
                "re-save it with PeftModel.save_pretrained(safe_serialization=True)"
            )
        raise ColdError(f"adapter {path}: missing {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ColdError(f"adapter {path}: {WEIGHTS_FILE} is corrupt or unreadable ({exc})") from exc
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ColdError(
                f"adapter {path}: tensor {key!r} is not a LoRA A/B weight of a linear layer "
                "(embedding LoRA, magnitude vectors, biases and extra modules are not supported)"
            )
        pieces.setdefault(match["module"], {})[match["which"]] = tensor
    if not pieces:
        raise ColdError(f"adapter {path}: {WEIGHTS_FILE} holds no LoRA weights")
    weights = {}
    for module, pair in pieces.items():
        if set(pair) != {"A", "B"}:
            raise ColdError(f"adapter {path}: module {module} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ColdError(
                f"adapter {path}: module {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"which do not match rank r={rank}"
            )
        for which, tensor in (("A", a), ("B", b)):
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                problem = "is not a floating-point tensor" if not tensor.is_floating_point() else "holds NaN or infinite values"
                raise ColdError(f"adapter {path}: module {module}'s lora_{which} {problem}")
        weights[module] = (a, b)
    return weights


def read_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read and validate one PEFT LoRA adapter directory (not yet checked against a model)."""
    path = Path(path).expanduser()
    config = _read_config(path)
    rank, scale = _check_config(path, config)
    weights = _read_weights(path, rank)
    return LoraAdapter(name=name or path.name, path=path, rank=rank, scale=scale, weights=weights)


def check_adapter_fits(adapter: LoraAdapter, modules: dict[str, torch.nn.Module]) -> None:
    """Every adapted module must be a linear layer of the base model with matching shapes.

    `modules` maps module names (as in `model.named_modules()`) to the base model's modules.
    """
    for module_name, (a, b) in adapter.weights.items():
        module = modules.get(module_name)
        if module is None:
            raise ColdError(
                f"adapter {adapter.name}: module {module_name} does not exist in the base model "
                "(an adapter for a different base model?)"
            )
        if not isinstance(module, torch.nn.Linear):
            raise ColdError(f"adapter {adapter.name}: module {module_name} is a {type(module).__name__}, not a linear layer")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise ColdError(
                f"adapter {adapter.name}: module {module_name} expects in/out features "
                f"{module.in_features}/{module.out_features} but the adapter has "
                f"{a.shape[1]}/{b.shape[0]} (an adapter for a different base model?)"
            )
