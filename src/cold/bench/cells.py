"""What `cold bench` runs in each measuring process: one decoder, one batch size, timed.

Every function named `*_cell` takes a plain dict and returns a plain dict (JSON-able), so it can
run in a fresh child process (`cold.bench.run` runs each cell in its own process, which keeps peak
memory per cell separate) or in-process.

A decoder runner has three calls, all under `torch.inference_mode()`:

    runner.prefill(prompts)   # [B][P] token ids -> caches and the first logits
    runner.step()             # pick one token per prompt (greedy), forward it; the timed unit
    runner.finish()           # drop caches

Every decoder does the same work: `new_tokens` steps after the prefill, EOS ignored.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from cold.bench.batch import BatchRunner
from cold.bench.policies import cobatch_kwargs
from cold.decoding.engine import Engine
from cold.decoding.running import RunningBatch
from cold.errors import ColdError
from cold.load.adapters import read_adapter
from cold.load.models import load_base
from cold.params import DecodeParams

ENGINE_DECODERS = ("base", "expert", "cold", "expert-reference", "cold-reference")
REFERENCE_SUFFIX = "-reference"  # our engine without the lean decode step (cold.runner.llama_step)

DECODERS = {
    "base": "base model alone, greedy (our engine, no adapter loaded)",
    "expert": "LoRA unmerged, greedy (our engine, decoder=expert)",
    "expert-merged": "LoRA merged into the weights (PEFT merge_and_unload), plain HF greedy loop",
    "cold": "CoLD, our engine: expert and amateur rows in one pass over shared weights (the lazy amateur: its rows "
            "only where the plausibility mask leaves more than one token, policy --cobatch-steps)",
    "cold-naive": "CoLD, two forward passes per step, two caches (PEFT; amateur under disable_adapter())",
    "cold-peft-mixed": "CoLD, PEFT mixed batch: one pass on 2N rows, adapter_names=[default, __base__]*N",
    "expert-peft": "LoRA unmerged, PEFT model, plain HF greedy loop (not run by default)",
    "expert-reference": "like expert, without the lean decode step: transformers' forward (not run by default)",
    "cold-reference": "like cold, without the lean decode step: transformers' forward (not run by default)",
    "llamacpp": "llama.cpp greedy with the LoRA applied (the GGUF as a llama.cpp user runs it; not run by default)",
    "llamacpp-base": "llama.cpp greedy, no LoRA (not run by default)",
    "llamacpp-cold": "CoLD on llama.cpp: an expert context with the LoRA, an amateur context without, the lazy amateur "
                     "(cold.llamacpp; not run by default)",
}
LLAMACPP_DECODERS = ("llamacpp", "llamacpp-base", "llamacpp-cold")  # cold.bench.llamacpp: need llama-cpp-python
DEFAULT_DECODERS = ("base", "expert", "expert-merged", "cold", "cold-naive", "cold-peft-mixed")
USES_LORA = {"expert", "expert-peft", "cold", "cold-naive", "cold-peft-mixed", "expert-reference", "cold-reference",
             "llamacpp", "llamacpp-cold"}  # reads LoRA weights per step
CONTRASTIVE = {"cold", "cold-naive", "cold-peft-mixed", "cold-reference", "llamacpp-cold"}


# ---- process-level helpers ---------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the process's peak resident set (Linux VmHWM); False where that is not possible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set since the last reset (VmHWM), else since the process started (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_gpu_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardClock:
    """Adds up the wall time spent inside `module.__call__` (hooks; nothing if the module is bypassed).

    Runners hand it the transformer body (`get_decoder()`: embeddings, layers, final norm), the
    part every decoder runs alike; the LM head and the pick stay outside, in `step - body`.
    """
    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total = 0.0
        self.calls = 0
        self._start = 0.0
        self._device = device
        self._handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, *_):
        sync(self._device)
        self._start = time.perf_counter()

    def _after(self, *_):
        sync(self._device)
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---- decoder runners ---------------------------------------------------------------------------


class EngineRunner(BatchRunner):
    """Our engine (`base`, `expert`, `cold`)."""

    def __init__(self, spec: dict):
        decoder = spec["decoder"].removesuffix(REFERENCE_SUFFIX)
        base = load_base(spec["model"], device=spec["device"], dtype=spec["dtype"])
        adapters = [] if decoder == "base" else [read_adapter(spec["adapter"])]
        self.engine = Engine(base, adapters, lean=not spec["decoder"].endswith(REFERENCE_SUFFIX), kv_dtype=spec.get("kv_dtype"),
                             **cobatch_kwargs(spec.get("cobatch_steps")))
        # the transformer body, timed by ForwardClock: the lean decode step where it replaces it
        self.module = self.engine.lean or self.engine.model.get_decoder()
        self.params = DecodeParams(
            decoder=decoder, alpha=spec["alpha"], beta=spec["beta"], max_new_tokens=spec["new_tokens"] + 1,
            ignore_eos=True,  # never stop early: every decoder does `new_tokens` steps
        )


class HFRunner:
    """Baselines on a plain Hugging Face forward with `DynamicCache`, the same loop for each."""
    def __init__(self, spec: dict):
        from peft import PeftModel  # peft is imported only by the baselines that use it

        self.decoder = spec["decoder"]
        self.device = torch.device(spec["device"])
        self.alpha, self.beta = spec["alpha"], spec["beta"]
        base = load_base(spec["model"], device=spec["device"], dtype=spec["dtype"]).model
        self.config = base.config
        self.module = base.get_decoder()  # the transformer body (PEFT and merging keep this module)
        dtype = next(base.parameters()).dtype
        peft_model = PeftModel.from_pretrained(base, spec["adapter"]).to(dtype).eval()
        if self.decoder == "expert-merged":
            self.model = peft_model.merge_and_unload()  # in place: this process holds one copy
        else:
            self.model = peft_model
        self.tokens: list[list[int]] = []
        self.logits = self.caches = self.names = None

    def _forward(self, ids: torch.Tensor, cache, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1].float()

    def _new_cache(self):
        return DynamicCache(config=self.config)

    def prefill(self, prompts: list[list[int]]) -> None:
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # [B, P], no padding
        self.tokens = [[] for _ in prompts]
        if self.decoder == "cold-naive":
            self.caches = (self._new_cache(), self._new_cache())
            expert = self._forward(ids, self.caches[0])
            with self.model.disable_adapter():
                amateur = self._forward(ids, self.caches[1])
            self.logits = (expert, amateur)
        elif self.decoder == "cold-peft-mixed":
            self.names = ["default", "__base__"] * len(prompts)  # row 2i expert, row 2i+1 amateur
            self.caches = (self._new_cache(),)
            self.logits = self._forward(ids.repeat_interleave(2, dim=0), self.caches[0], adapter_names=self.names)
        else:
            self.caches = (self._new_cache(),)
            self.logits = self._forward(ids, self.caches[0])

    def _cold_pick(self, expert: torch.Tensor, amateur: torch.Tensor) -> torch.Tensor:
        """The CoLD score written out plainly: mask, combine, argmax."""
        valid = expert >= math.log(self.alpha) + expert.max(dim=-1, keepdim=True).values
        score = torch.where(valid, (1 + self.beta) * expert - self.beta * amateur, float("-inf"))
        return score.argmax(dim=-1)

    def step(self) -> None:
        if self.decoder == "cold-naive":
            tokens = self._cold_pick(*self.logits)
            expert = self._forward(tokens[:, None], self.caches[0])
            with self.model.disable_adapter():
                amateur = self._forward(tokens[:, None], self.caches[1])
            self.logits = (expert, amateur)
        elif self.decoder == "cold-peft-mixed":
            tokens = self._cold_pick(self.logits[0::2], self.logits[1::2])
            rows = tokens.repeat_interleave(2)[:, None]
            self.logits = self._forward(rows, self.caches[0], adapter_names=self.names)
        else:
            tokens = self.logits.argmax(dim=-1)
            self.logits = self._forward(tokens[:, None], self.caches[0])
        for row, token in enumerate(tokens.tolist()):
            self.tokens[row].append(token)

    def finish(self) -> None:
        self.logits = self.caches = None


def make_runner(spec: dict):
    if spec["decoder"] in LLAMACPP_DECODERS:
        from cold.bench import llamacpp

        return llamacpp.make_runner(spec)
    return EngineRunner(spec) if spec["decoder"] in ENGINE_DECODERS else HFRunner(spec)


# ---- cells -------------------------------------------------------------------------------------


def decoder_cell(spec: dict) -> dict:
    """Load one decoder, warm up, then time `repeats` x (prefill + `new_tokens` steps)."""
    threads = set_threads(spec["threads"])
    device = torch.device(spec["device"])
    prompts = spec["prompts"]
    new_tokens, repeats = spec["new_tokens"], spec["repeats"]
    reset_peak_memory(device)
    started = time.perf_counter()
    runner = make_runner({**spec, "threads": threads})
    load_s = time.perf_counter() - started
    load_peak = peak_rss_mb()
    clock = ForwardClock(runner.module, device) if runner.module is not None else None
    peak_reset = reset_peak_memory(device)  # the decode peak below starts from the loaded model
    prefill_ms, step_ms, body_ms = [], [], []
    with torch.inference_mode():
        runner.prefill(prompts)
        for _ in range(min(new_tokens, spec["warmup"])):
            runner.step()
        runner.finish()
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            runner.prefill(prompts)
            sync(device)
            prefill_ms.append((time.perf_counter() - t) * 1e3)
            for _ in range(new_tokens):
                before, calls = (clock.total, clock.calls) if clock else (0.0, 0)
                t = time.perf_counter()
                runner.step()
                sync(device)
                step_ms.append((time.perf_counter() - t) * 1e3)
                body_ms.append((clock.total - before) * 1e3 if clock and clock.calls > calls else None)
            tokens = runner.tokens
            runner.finish()
    if clock:
        clock.remove()
    bodies = [f for f in body_ms if f is not None]
    return {
        "decoder": spec["decoder"],
        "batch_size": len(prompts),
        "threads": threads,
        "load_s": load_s,
        "load_peak_rss_mb": load_peak,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_reset": peak_reset,
        "peak_gpu_mb": peak_gpu_mb(device),
        "cpu_s": cpu_seconds(),
        "prefill_ms": prefill_ms,
        "step_ms": step_ms,
        "body_ms": bodies if len(bodies) == len(step_ms) else None,
        "tokens": tokens,
    }


def bandwidth_cell(spec: dict) -> dict:
    """Copy bandwidth: dst.copy_(src) of a large float32 tensor, (read + write) bytes / median time."""
    threads = set_threads(spec["threads"])
    device = torch.device(spec["device"])
    n = int(spec["bandwidth_mb"] * 2**20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    times = []
    for i in range(2 + spec.get("bandwidth_repeats", 7)):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:  # two warm-up copies
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {"copy_gbps": 2 * n * 4 / seconds / 1e9, "bytes": n * 4, "threads": threads, "seconds": times,
            "cpu_s": cpu_seconds()}


def info_cell(spec: dict) -> dict:
    """Model facts, weight bytes read per step, the seeded prompts; writes a random LoRA if asked."""
    set_threads(spec["threads"])
    base = load_base(spec["model"], device=spec["device"], dtype=spec["dtype"])
    model, tokenizer = base.model, base.tokenizer
    adapter = spec["adapter"]
    if spec.get("make_adapter"):
        adapter = make_random_lora(model, Path(spec["make_adapter"]), rank=8, seed=spec["seed"])
    dtype = next(model.parameters()).dtype
    element = torch.empty((), dtype=dtype).element_size()
    lora = read_adapter(adapter) if adapter else None
    lora_params = sum(a.numel() + b.numel() for a, b in lora.weights.values()) if lora else 0
    context = base.context_length
    needed = spec["prompt_tokens"] + spec["new_tokens"] + 1
    if needed > context:
        raise ColdError(
            f"--prompt-tokens {spec['prompt_tokens']} + --new-tokens {spec['new_tokens']} (+1) exceeds "
            f"the model's context of {context} tokens"
        )
    return {
        "model_path": str(base.path),
        "architecture": type(model).__name__,
        "config": {k: getattr(model.config, k, None) for k in
                   ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
        "context_length": context,
        "dtype": str(dtype).removeprefix("torch."),
        **weight_bytes(model),
        "adapter": str(adapter) if adapter else None,
        "adapter_rank": lora.rank if lora else None,
        "adapter_modules": len(lora.weights) if lora else 0,
        "lora_params": lora_params,
        "lora_bytes": lora_params * element,
        "prompts": random_prompts(tokenizer, model.config, spec["max_batch"], spec["prompt_tokens"], spec["seed"]),
        "cpu_s": cpu_seconds(),
    }


def weight_bytes(model: torch.nn.Module) -> dict:
    """Bytes of base weights one decode step reads: every parameter once (shared storage once), but
    not an untied input embedding, of which a step reads only one row per token."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    seen, total, params = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        params += p.numel()
        if p is embedding and not tied:
            continue
        total += p.numel() * p.element_size()
    return {"params": params, "weight_bytes": total, "tied_embeddings": tied}


def random_prompts(tokenizer, config, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` token ids drawn uniformly from the vocabulary (no special tokens)."""
    vocab = min(len(tokenizer), int(getattr(config, "vocab_size", len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (count, length), generator=gen)
    return allowed[picks].tolist()


def make_random_lora(model: torch.nn.Module, path: Path, rank: int = 8, seed: int = 0) -> Path:
    """A random PEFT LoRA of `rank` on every linear layer but the LM head, saved at `path`."""
    import copy

    from peft import LoraConfig, get_peft_model

    output = model.get_output_embeddings()
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and m is not output})
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # a small, non-zero delta, like a trained adapter
    peft_model.save_pretrained(str(path))
    return path


def _time_calls(obj, name: str, device: torch.device) -> list[float]:
    """Wrap the bound method `obj.name` (if it exists) to record the seconds of each call."""
    seconds: list[float] = []
    method = getattr(obj, name, None)
    if method is None:
        return seconds

    def timed(*args, **kwargs):
        sync(device)
        t = time.perf_counter()
        result = method(*args, **kwargs)
        sync(device)
        seconds.append(time.perf_counter() - t)
        return result

    setattr(obj, name, timed)
    return seconds


def decode_refilling(engine, questions: list[str], params, batch_size: int) -> tuple[list[int], list[str], list, int]:
    """Continuous batching: keep `batch_size` sequences running, a new problem joins as soon as
    one finishes (`RunningBatch.join` between steps, as the server does). Lengths, reasons, the
    steps that needed the amateur (None but for CoLD), steps."""
    requests = [engine.make_request(q, params, chat=True) for q in questions]
    lengths, reasons, amateur = [0] * len(requests), [""] * len(requests), [None] * len(requests)
    batch, joined, steps = RunningBatch(engine.runner), 0, 0
    while joined < len(requests) or len(batch):
        free = min(batch_size - len(batch), len(requests) - joined)
        if free > 0:
            batch.join(requests[joined : joined + free], list(range(joined, joined + free)))
            joined += free
        steps += 1
        for key, event in batch.step():
            lengths[key] += len(event.token_ids)
            reasons[key] = event.finish_reason or reasons[key]
            if event.amateur_steps is not None:  # on a CoLD sequence's last event
                amateur[key] = event.amateur_steps
    return lengths, reasons, amateur, steps


def _e2e_engine(spec: dict):
    """(engine, decode params) of an end-to-end decoder; (GreedyE2E, None) for the plain llama.cpp loop."""
    if spec["decoder"] in LLAMACPP_DECODERS:
        from cold.bench import llamacpp

        return llamacpp.e2e_engine(spec)
    engine = Engine(load_base(spec["model"], device=spec["device"], dtype=spec["dtype"]), [read_adapter(spec["adapter"])],
                    kv_dtype=spec.get("kv_dtype"), **cobatch_kwargs(spec.get("cobatch_steps")))
    return engine, DecodeParams(decoder=spec["decoder"], alpha=spec["alpha"], beta=spec["beta"], max_new_tokens=spec["new_tokens"])


def e2e_cell(spec: dict) -> dict:
    """End to end on a group of problems: chat prompts, EOS honoured. Static batches (finished rows
    leave, as in `cold generate`) or, with `refill`, continuous batching; wall time after a short
    warm-up, generated lengths, and per problem the steps that needed the amateur (None but for CoLD)."""
    threads = set_threads(spec["threads"])
    device = torch.device(spec["device"])
    questions, size = spec["questions"], spec["batch_size"]
    engine, params = _e2e_engine({**spec, "threads": threads})
    greedy = params is None  # the plain llama.cpp loop (cold.bench.llamacpp.GreedyE2E)
    if greedy:
        prompts = engine.encode(questions)
        engine.generate(prompts[:2], max_new=min(4, spec["new_tokens"]))  # warm-up
    else:
        engine.generate(questions[:2], params.with_(max_new_tokens=min(4, spec["new_tokens"])), chat=True)  # warm-up
    prefill = [] if greedy else _time_calls(engine.runner, "prefill", device)
    reset_peak_memory(device)
    sync(device)
    started = time.perf_counter()
    if greedy:
        lengths, reasons, amateur, steps = [], [], [None] * len(questions), 0
        for start in range(0, len(questions), size):
            batch_lengths, batch_reasons = engine.generate(prompts[start : start + size])
            lengths, reasons, steps = lengths + batch_lengths, reasons + batch_reasons, steps + max(batch_lengths)
    elif spec.get("refill"):
        lengths, reasons, amateur, steps = decode_refilling(engine, questions, params, size)
    else:
        lengths, reasons, amateur, steps = [], [], [], 0
        for start in range(0, len(questions), size):
            generations = engine.generate(questions[start : start + size], params, chat=True)
            lengths += [len(g.token_ids) for g in generations]
            reasons += [g.finish_reason for g in generations]
            amateur += [g.amateur_steps for g in generations]
            steps += max(len(g.token_ids) for g in generations)  # a static batch runs until its longest row ends
    sync(device)
    return {
        "decoder": spec["decoder"],
        "threads": threads,
        "wall_s": time.perf_counter() - started,
        "prefill_s": sum(prefill) if prefill else None,
        "lengths": lengths,
        "finish_reasons": reasons,
        "amateur_steps": amateur,
        "steps": steps,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(device),
        "cpu_s": cpu_seconds(),
    }
