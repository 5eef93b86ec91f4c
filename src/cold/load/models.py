"""Load base models: a Hugging Face model directory, a GGUF file (`cold.load.gguf`), or a built-in name.

Also the dtype the weights are computed in: `pick_dtype` turns a name into a torch dtype, and "auto"
(or None) into `default_dtype(device)`, the automatic choice that `COLD_DTYPE` overrides.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cold.errors import ColdError
from cold.load.gguf import BUILTIN_MODELS, builtin_gguf, convert_gguf

DEFAULT_MODEL = "smollm2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ENV = "COLD_DTYPE"  # a DTYPES name that replaces the automatic choice (tests pin float32 with it)
# /proc/cpuinfo flags of the instructions that multiply bfloat16 natively (AVX512-BF16, AMX-BF16)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass
class BaseModel:
    """A loaded causal LM, its tokenizer and where it came from."""

    model: torch.nn.Module  # a transformers *ForCausalLM in eval mode
    tokenizer: object
    source: str  # what the user asked for: builtin name, directory or GGUF path
    path: Path  # the Hugging Face directory actually loaded

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def resolve_model_dir(source: str, dtype: str | torch.dtype | None = None) -> Path:
    """Turn a model argument into a Hugging Face directory, converting a GGUF file if needed.

    `source` is a built-in name, a directory with config.json, a `.gguf` file, or
    `DIR::FILE.gguf` for a GGUF inside a directory. A GGUF is converted into a copy whose weights
    are in `dtype` (`pick_dtype`: None or "auto" is the default dtype); a directory is returned as it is.
    """
    if source in BUILTIN_MODELS:
        return convert_gguf(builtin_gguf(source), pick_dtype(dtype))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, pick_dtype(dtype))
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0], pick_dtype(dtype))
            raise ColdError(f"model directory {path} has no config.json (and not exactly one .gguf file)")
        return path
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ColdError(f"model {source!r} is not a built-in name ({known}), a directory or a .gguf file")


def resolve_gguf(source: str) -> Path:
    """The GGUF file of a model argument, for an engine that runs GGUF files itself (llama.cpp):
    a built-in name, a `.gguf` file, or a directory holding exactly one."""
    if source in BUILTIN_MODELS:
        return builtin_gguf(source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ColdError(f"model directory {path} does not hold exactly one .gguf file; the llama.cpp engine runs GGUF "
                        "files (convert a Hugging Face model with llama.cpp's convert_hf_to_gguf.py)")
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ColdError(f"model {source!r} is not a built-in name ({known}) or a .gguf file")


def pick_device(device: str | torch.device | None) -> torch.device:
    """A torch device; None or "auto" is CUDA where available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ColdError(f"--device {device!r} is not a device; give cpu, cuda, cuda:N or auto") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ColdError(f"--device {device!r}: cold runs on cpu or cuda (cuda:N), or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ColdError("--device cuda was asked for but no CUDA device is available")
    return dev


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype to compute in when none is given: `$COLD_DTYPE` if set, else bfloat16 on CUDA and on a
    CPU that multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16), else float32.

    torch 2.13 does not report these instructions (`torch.backends.cpu.get_cpu_capability()` says
    only "AVX512"), so the CPU's flags are read from /proc/cpuinfo. Without them bfloat16 matmuls
    are emulated and slower than float32, which is why float32 stays the default there.
    """
    pinned = os.environ.get(DTYPE_ENV, "").strip()
    if pinned and pinned != "auto":
        if pinned not in DTYPES:
            raise ColdError(f"{DTYPE_ENV}={pinned!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[pinned]
    if pick_device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_flags() & set(BF16_CPU_FLAGS) else torch.float32


def pick_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """A torch dtype from a name in DTYPES, or a torch dtype as it is; None or "auto" is `default_dtype(device)`."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ColdError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The DTYPES name of a torch dtype ("bfloat16" for torch.bfloat16)."""
    return str(dtype).removeprefix("torch.")


def load_base(source: str = DEFAULT_MODEL, device: str | None = "cpu", dtype: str | torch.dtype | None = None) -> BaseModel:
    """Load a base model and its tokenizer, read-only and in eval mode, from local files only.

    `dtype` is what `pick_dtype` takes (None or "auto": the default for `device`); a GGUF source is
    read from its converted copy in that dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    path = resolve_model_dir(source, torch_dtype)
    hf_logging.disable_progress_bar()  # the "Loading weights" bar; conversion above keeps its own
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except Exception as exc:
        raise ColdError(f"cannot load model from {path}: {exc}") from exc
    model.to(torch_device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=model, tokenizer=tokenizer, source=str(source), path=path)


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id the model's configs or tokenizer name as end-of-sequence."""
    return eos_ids_of(getattr(model, "generation_config", None), model.config, tokenizer)


def eos_ids_of(generation_config, config, tokenizer) -> set[int]:
    """Every token id a generation config, a model config or a tokenizer names as end-of-sequence."""
    ids = set()
    for source in (getattr(generation_config, "eos_token_id", None), config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    if not ids:
        raise ColdError("the model defines no end-of-sequence token")
    return ids
