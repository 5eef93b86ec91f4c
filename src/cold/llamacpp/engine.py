"""`LlamaCppEngine`: `Engine`'s API over llama.cpp, for the GGUF a CPU user already runs.

    engine = LlamaCppEngine.load("smollm2", adapters={"gsm8k": "adapters/smollm2-gsm8k"})
    for g in engine.generate(["2+2="], decoder="cold", alpha=0.1, beta=0.5, max_new_tokens=32):
        print(g.text, g.finish_reason)

The model runs in llama.cpp at its own precision (the GGUF's quantisation); adapters are PEFT
directories (converted once into GGUF LoRA files, `cold.llamacpp.lora`) or GGUF LoRA files. The
tokenizer, chat template and end-of-sequence tokens come from the GGUF through transformers, so
prompts, stop rules, sampling and beam search are exactly those of `Engine`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cold.decoding.engine import Engine
from cold.errors import ColdError
from cold.llamacpp.library import llama
from cold.llamacpp.lora import BaseShapes, adapter_gguf
from cold.llamacpp.runner import DEFAULT_COBATCH_STEPS, DEFAULT_CONTEXT_TOKENS, LlamaCppModel, LlamaCppRunner
from cold.load.gguf import gguf_metadata
from cold.load.models import DEFAULT_MODEL, eos_ids_of, resolve_gguf


@dataclass(frozen=True)
class GgufAdapter:
    """An adapter as llama.cpp applies it: its name, what the user gave, and the GGUF LoRA file."""

    name: str
    path: Path
    gguf: Path


class LlamaCppEngine(Engine):
    """A GGUF model on llama.cpp with LoRA adapters, decoding as `Engine` does."""

    def __init__(self, runner: LlamaCppRunner, gguf: Path, shapes: BaseShapes):
        self.runner, self.gguf, self._shapes = runner, gguf, shapes

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        adapters: Mapping[str, str | Path] | Sequence[str | Path] = (),
        threads: int | None = None,
        cobatch_steps: int = DEFAULT_COBATCH_STEPS,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    ) -> "LlamaCppEngine":
        """Load a GGUF model (a built-in name or a .gguf file) and adapters; every adapter is read,
        checked and converted before the model loads. `threads`: llama.cpp's (default: torch's);
        `context_tokens`: the KV cells of each llama.cpp context (its sequences share them)."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        llama()  # a missing llama-cpp-python fails first, naming the extra
        gguf = resolve_gguf(model)
        shapes = BaseShapes.read(gguf)
        items = adapters.items() if isinstance(adapters, Mapping) else [(None, p) for p in adapters]
        read = [_gguf_adapter(name, Path(path).expanduser(), gguf, shapes) for name, path in items]
        meta = gguf_metadata(gguf)
        tokenizer = AutoTokenizer.from_pretrained(meta, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = AutoConfig.from_pretrained(meta, local_files_only=True)
        generation = GenerationConfig.from_pretrained(meta, local_files_only=True)
        runner = LlamaCppRunner(LlamaCppModel.load(gguf), tokenizer, eos_ids_of(generation, config, tokenizer), read,
                                cobatch_steps=cobatch_steps, threads=threads, context_tokens=context_tokens)
        return cls(runner, gguf, shapes)

    @property
    def model(self):
        return self.runner.model

    def add_adapter(self, path: str | Path, name: str | None = None) -> GgufAdapter:
        adapter = _gguf_adapter(name, Path(path).expanduser(), self.gguf, self._shapes)
        self.set_adapters([*self.adapters, adapter])
        return adapter

    def close(self) -> None:
        """Free the llama.cpp contexts and model (the engine is unusable afterwards)."""
        self.runner.close()


def _gguf_adapter(name: str | None, path: Path, gguf: Path, shapes: BaseShapes) -> GgufAdapter:
    if path.suffix != ".gguf" and not path.is_dir():
        raise ColdError(f"adapter {path}: not a PEFT adapter directory or a GGUF LoRA file")
    return GgufAdapter(name or (path.stem if path.suffix == ".gguf" else path.name), path, adapter_gguf(path, gguf, shapes))
