"""Contrastive LoRA Decoding (CoLD): decode with a LoRA adapter contrasted against an amateur.

The core, in the order data flows (imports point only down): `load` (models, GGUF, adapters,
prompts) -> `lora` (row-indexed LoRA layers) -> `sampling` (scores, sampler, stopping,
detokeniser) -> `runner` (the model runner: prefill, step, scores) -> `decoding` (the decode
loops and `Engine`, the public facade: `from cold.decoding.engine import Engine`). The front-ends
import the core: `tasks`, `evaluation`, `training`, `bench`, `serve`, `vllm`, and `cli` on top.
"""
