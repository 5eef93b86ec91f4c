"""Load base models: a Hugging Face model directory, a GGUF file (`cold.load.gguf`), or a built-in name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cold.errors import ColdError
from cold.load.gguf import BUILTIN_MODELS, builtin_gguf, convert_gguf

DEFAULT_MODEL = "smollm2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def resolve_model_dir(source: str) -> Path:
    """Turn a model argument into a Hugging Face directory, converting a GGUF file if needed.

    `source` is a built-in name, a directory with config.json, a `.gguf` file, or
    `DIR::FILE.gguf` for a GGUF inside a directory.
    """
    if source in BUILTIN_MODELS:
        return convert_gguf(builtin_gguf(source))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0])
            raise ColdError(f"model directory {path} has no config.json (and not exactly one .gguf file)")
        return path
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ColdError(f"model {source!r} is not a built-in name ({known}), a directory or a .gguf file")


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ColdError("--device cuda was asked for but no CUDA device is available")
    return dev


def pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ColdError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_base(source: str = DEFAULT_MODEL, device: str | None = "cpu", dtype: str | torch.dtype | None = None) -> BaseModel:
    """Load a base model and its tokenizer, read-only and in eval mode, from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype, torch_device = pick_dtype(dtype), pick_device(device)
    path = resolve_model_dir(source)
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
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    if not ids:
        raise ColdError("the model defines no end-of-sequence token")
    return ids
