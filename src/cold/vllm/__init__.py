"""CoLD inside vLLM (optional extra `cold-decoding[vllm]`): see docs/vllm.md.

    pairs.py      the pair tag in SamplingParams.extra_args; per-row bookkeeping (no vLLM import)
    processor.py  ColdPairProcessor: the vLLM batch-level logits processor (V1 model runner)
    processor_v2.py  ColdPairProcessorV2: the same for Model Runner V2
    generate.py   make_llm (an LLM configured for pairs) and generate (prompts -> Generations)
    online.py     OnlinePairs: pairs on vLLM's async engine, admitted as they arrive (cold serve --engine vllm)

Importing `cold.vllm` does not import vLLM; `make_llm` / `generate` do (with a clear error
when it is missing).
"""

from cold.vllm.generate import PROCESSOR, generate, make_llm, require_vllm

__all__ = ["PROCESSOR", "generate", "make_llm", "require_vllm"]
