"""CoLD on llama.cpp (`--engine llamacpp`): the user's GGUF run by llama-cpp-python, an expert
context with the LoRA applied and an amateur context without, decoded by the same loops as our
own engine. Needs the optional extra: pip install 'cold-decoding[llamacpp]'.

    library.py  llama-cpp-python imported once (clear error when missing), its CPU backends loaded
    lora.py     PEFT adapter -> GGUF LoRA file (cached), checked against the base GGUF
    runner.py   LlamaCppRunner: contexts per LoRA setting, prefill / step / scores as ModelRunner's
    engine.py   LlamaCppEngine: Engine's API over that runner
"""

from cold.llamacpp.engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
