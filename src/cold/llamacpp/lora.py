"""LoRA adapters for llama.cpp: a PEFT directory converted once into a GGUF LoRA file (cached), or
a GGUF LoRA file given as it is; either checked against the base GGUF before llama.cpp sees it.

The file is what llama.cpp's own `convert_lora_to_gguf.py` writes: `general.type = adapter`,
`adapter.type = lora`, the base model's architecture, and per adapted weight `<gguf name>.lora_a`
[r, in] and `.lora_b` [out, r] (numpy order; ggml's is reversed), named by gguf's tensor map.
Two conventions of that converter are kept:
- Llama's q and k weights are stored with their rows permuted for llama.cpp's rotary embedding
  (the base GGUF's too), so lora_b of q_proj / k_proj gets the same permutation;
- llama.cpp scales a LoRA by `adapter.lora.alpha / r`; it is written as PEFT's scale times r, so
  rsLoRA's alpha / sqrt(r) comes out right too. The tensors are PEFT's, in float32.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cold.errors import ColdError
from cold.load.adapters import LoraAdapter, read_adapter
from cold.load.paths import building, cache_dir

# Architectures whose GGUF conversion is checked against PEFT (tests/test_llamacpp.py), with
# whether llama.cpp's converter permutes their q/k rows.
PERMUTES_QK = {"llama": True, "gemma3": False}
# The adapted weights llama.cpp applies a LoRA to in these architectures (gguf names, per block).
ADAPTABLE = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# GGML tensor types (gguf.GGMLQuantizationType values) whose data is checked for NaN and infinities.
_FLOAT_TYPES = (0, 1, 30)  # F32, F16, BF16


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter is checked against: the base GGUF's architecture, heads and weight shapes."""

    architecture: str
    blocks: int
    heads: int
    kv_heads: int
    shapes: dict[str, tuple[int, int]]  # gguf weight name (without ".weight") -> (out, in)

    @classmethod
    def read(cls, gguf_path: Path) -> "BaseShapes":
        from gguf import GGUFReader

        try:
            reader = GGUFReader(gguf_path)
        except Exception as exc:
            raise ColdError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
        fields = reader.fields
        arch = str(fields["general.architecture"].contents())
        value = lambda key, default=None: fields[key].contents() if key in fields else default  # noqa: E731
        shapes = {t.name.removesuffix(".weight"): (int(t.shape[1]), int(t.shape[0]))
                  for t in reader.tensors if t.name.endswith(".weight") and len(t.shape) == 2}
        heads = int(value(f"{arch}.attention.head_count", 0))
        return cls(arch, int(value(f"{arch}.block_count", 0)), heads,
                   int(value(f"{arch}.attention.head_count_kv", heads)), shapes)


def adapter_gguf(source: str | Path | LoraAdapter, base_gguf: Path, base: BaseShapes | None = None) -> Path:
    """A GGUF LoRA file for `source` (a PEFT directory, a read adapter, or a GGUF LoRA file)
    that llama.cpp can apply to `base_gguf`: converted once and cached, keyed by the adapter's
    files and the base model's architecture and shapes."""
    base = base or BaseShapes.read(base_gguf)
    if not isinstance(source, LoraAdapter) and Path(source).suffix == ".gguf":
        return _check_gguf_adapter(Path(source).expanduser(), base)
    adapter = source if isinstance(source, LoraAdapter) else read_adapter(source)
    tensors = _gguf_tensors(adapter, base)
    target = cache_dir() / "gguf-lora" / f"{adapter.path.name}-{_key(adapter, base)}.gguf"
    if target.is_file():
        return target
    with building(target):
        if target.is_file():  # another process converted it meanwhile
            return target
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        try:
            _write(partial, base.architecture, adapter.scale * adapter.rank, tensors)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _gguf_tensors(adapter: LoraAdapter, base: BaseShapes) -> dict[str, np.ndarray]:
    """{gguf tensor name: float32 array} of the adapter, checked against the base model."""
    import gguf

    if base.architecture not in PERMUTES_QK:
        raise ColdError(f"adapter {adapter.name}: LoRA on llama.cpp supports the architectures "
                        f"{', '.join(PERMUTES_QK)}; this GGUF is {base.architecture!r}")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == base.architecture)
    names = gguf.get_tensor_name_map(arch, base.blocks)
    out = {}
    for module, (a, b) in sorted(adapter.weights.items()):
        name = names.get_name(module)
        if name is None or name.split(".")[-1] not in ADAPTABLE:
            raise ColdError(f"adapter {adapter.name}: module {module} has no LoRA in llama.cpp "
                            f"(it adapts {', '.join(ADAPTABLE)} of each block)")
        shape = base.shapes.get(name)
        if shape is None:
            raise ColdError(f"adapter {adapter.name}: module {module} ({name}) is not in the base model "
                            "(an adapter for a different base model?)")
        if shape != (b.shape[0], a.shape[1]):
            raise ColdError(f"adapter {adapter.name}: module {module} is {b.shape[0]}x{a.shape[1]} but the base "
                            f"model's {name} is {shape[0]}x{shape[1]} (an adapter for a different base model?)")
        b = b.float().numpy()
        if PERMUTES_QK[base.architecture] and name.endswith(("attn_q", "attn_k")):
            b = _permute_rows(b, base.heads if name.endswith("attn_q") else base.kv_heads)
        out[f"{name}.weight.lora_a"] = np.ascontiguousarray(a.float().numpy())
        out[f"{name}.weight.lora_b"] = np.ascontiguousarray(b)
    return out


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives Llama's q/k weights: within each head, the two
    rotary halves interleaved ([out, r] -> [out, r])."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _write(path: Path, architecture: str, alpha: float, tensors: dict[str, np.ndarray]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _key(adapter: LoraAdapter, base: BaseShapes) -> str:
    """The cache key: the adapter's two files and the base model's architecture and shapes."""
    digest = hashlib.sha256(repr((base.architecture, base.heads, base.kv_heads, sorted(base.shapes.items()))).encode())
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter.path / file).read_bytes())
    return digest.hexdigest()[:16]


def _check_gguf_adapter(path: Path, base: BaseShapes) -> Path:
    """A GGUF LoRA file the user gave: it must be a LoRA adapter for this architecture, of
    weights the base model has, with matching shapes (llama.cpp's own checks, as clear errors)."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ColdError(f"adapter {path}: file not found")
    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise ColdError(f"adapter {path}: not a readable GGUF file ({exc})") from exc
    fields = reader.fields
    field = lambda key: str(fields[key].contents()) if key in fields else None  # noqa: E731
    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise ColdError(f"adapter {path}: not a GGUF LoRA adapter (general.type {field('general.type')!r}, "
                        f"adapter.type {field('adapter.type')!r})")
    if field("general.architecture") != base.architecture:
        raise ColdError(f"adapter {path}: made for architecture {field('general.architecture')!r}, "
                        f"the base model is {base.architecture!r}")
    alpha = fields["adapter.lora.alpha"].contents() if "adapter.lora.alpha" in fields else None
    if alpha is not None and not math.isfinite(float(alpha)):
        raise ColdError(f"adapter {path}: adapter.lora.alpha is {alpha}, not a finite number")
    for tensor in reader.tensors:
        if tensor.tensor_type in _FLOAT_TYPES and not bool(np.isfinite(tensor.data).all()):
            raise ColdError(f"adapter {path}: {tensor.name} holds NaN or infinite values")
        name, _, part = tensor.name.rpartition(".weight.lora_")
        if part == "b" and name in base.shapes and int(tensor.shape[1]) != base.shapes[name][0]:
            raise ColdError(f"adapter {path}: {tensor.name} does not fit the base model's {name}")
        if part and name not in base.shapes:
            raise ColdError(f"adapter {path}: {name} is not in the base model (an adapter for a different base model?)")
    return path
