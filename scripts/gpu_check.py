"""The engine on a CUDA GPU: tokens against the CPU float32 run, and step times on a 7-8B Llama shape.

    python scripts/gpu_check.py reference --out ref.json          # here, on the CPU: prompts + float32 tokens
    python scripts/gpu_check.py smollm2 --reference ref.json --out DIR [--gguf F --adapter D]
    python scripts/gpu_check.py llama8b --out DIR [--shape tiny]

`reference` decodes the first `--problems` GSM8K test questions (chat prompts) greedily with the
GSM8K demo adapter, as the expert and as CoLD (alpha 0.1, beta 0.5), in float32 on the CPU, and
writes the prompts' token ids and the tokens. `smollm2` decodes the same prompts on `--device`
(cuda, bfloat16) with the fused decode step and with transformers' forward, and in float32 on that
machine's CPU, and compares each with the reference: identical sequences, and for a sequence that
differs the CPU float32 score margin at its first differing token (how near a tie it was; the
log-probability of the reference's token minus that of the other, under the decoder's own scores).
`llama8b` builds a randomly initialised Llama of Llama-3-8B shape in bfloat16 on the device with a
random rank-16 LoRA on every linear layer and times the expert's and CoLD's decode steps at batch
1, 16 and 64 (random 128-token prompts, medians after warm-up). Every part writes JSON into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

from cold.bench.cells import peak_gpu_mb, reset_peak_memory, sync
from cold.decoding.engine import Engine
from cold.decoding.running import RunningBatch
from cold.load.adapters import LoraAdapter, read_adapter
from cold.load.models import BaseModel, load_base
from cold.params import DecodeParams

DECODERS = {"expert": {}, "cold": {"alpha": 0.1, "beta": 0.5}}
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, rope_theta=10000.0)


def environment(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=1))


# ---- tokens against the CPU float32 run --------------------------------------------------------


def decode_all(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, list[list[int]]]:
    """Greedy tokens of every decoder for every prompt, all prompts in one batch."""
    return {name: [g.token_ids for g in engine.generate(prompts, decoder=name, max_new_tokens=new_tokens, **kw)]
            for name, kw in DECODERS.items()}


def margins(engine: Engine, prompts, reference: dict, other: dict) -> dict:
    """Per decoder: how many sequences equal the reference, and at each first differing token the
    reference engine's margin log p(reference token) - log p(other token) (under that decoder's scores)."""
    report = {}
    for name, kw in DECODERS.items():
        equal, gaps = 0, []
        for prompt, mine, theirs in zip(prompts, reference[name], other[name]):
            if mine == theirs:
                equal += 1
                continue
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            if at >= min(len(mine), len(theirs)):
                gaps.append({"at": at, "margin": None, "note": "one stopped earlier"})
                continue
            seq = prompt + mine[:at]
            top = dict(engine.logprobs([seq], decoder=name, top=20, **kw)[0].top_logprobs[-1])
            ref_lp, other_lp = top.get(mine[at]), top.get(theirs[at])
            margin = None if ref_lp is None or other_lp is None else ref_lp - other_lp
            gaps.append({"at": at, "margin": margin, "other_in_top20": other_lp is not None})
        report[name] = {"sequences": len(prompts), "identical": equal, "first_differences": gaps}
    return report


def reference_part(args) -> None:
    from cold.bench.run import e2e_prompts, e2e_source
    from cold.load.demo import demo_adapter_dir

    torch.set_num_threads(args.threads)
    questions = e2e_prompts("gsm8k", e2e_source("gsm8k", None)[1], args.problems)
    engine = Engine(load_base("smollm2", dtype="float32"), [read_adapter(demo_adapter_dir("smollm2", "gsm8k"))])
    prompts = [engine.encode(q, chat=True)[1] for q in questions]
    started = time.perf_counter()
    tokens = decode_all(engine, prompts, args.new_tokens)
    Path(args.out).write_text(json.dumps({"machine": environment(torch.device("cpu")), "new_tokens": args.new_tokens,
                                          "seconds": time.perf_counter() - started, "prompts": prompts, "tokens": tokens}))


def smollm2_part(args) -> None:
    out, device = Path(args.out), torch.device(args.device)
    ref = json.loads(Path(args.reference).read_text())
    prompts, new_tokens = ref["prompts"], ref["new_tokens"]
    adapter = read_adapter(args.adapter)
    cpu = Engine(load_base(args.gguf, device="cpu", dtype="float32"), [adapter])
    report = {"machine": environment(device), "reference_machine": ref["machine"], "new_tokens": new_tokens,
              "prompts": len(prompts)}
    started = time.perf_counter()
    local = decode_all(cpu, prompts, new_tokens)
    report["cpu_float32_seconds"] = time.perf_counter() - started
    report["cpu_float32_vs_reference"] = margins(cpu, prompts, ref["tokens"], local)
    write(out, "smollm2.json", report)
    base = load_base(args.gguf, device=str(device), dtype=args.dtype)
    for lean in (True, False):
        label = f"{device.type}_{args.dtype}_{'lean' if lean else 'reference_forward'}"
        try:
            engine = Engine(base, [adapter], lean=lean)
            decode_all(engine, prompts[:2], 4)  # warm-up
            sync(device)
            started = time.perf_counter()
            tokens = decode_all(engine, prompts, new_tokens)
            sync(device)
            report[label] = {"seconds": time.perf_counter() - started,
                             "vs_reference": margins(cpu, prompts, ref["tokens"], tokens),
                             "vs_cpu_float32_here": margins(cpu, prompts, local, tokens),
                             "steps": step_table(engine, [prompts[:1], [prompts[i % len(prompts)] for i in range(16)]],
                                                 device, 32)}
        except Exception:
            report[label] = {"error": traceback.format_exc()}
        write(out, "smollm2.json", report)


# ---- step times ---------------------------------------------------------------------------------


def time_steps(engine: Engine, prompts: list[list[int]], decoder: str, steps: int, device: torch.device,
               warmup: int = 4) -> dict:
    """Prefill `prompts` as one running batch, then time `steps` decode steps after `warmup` (never stopping)."""
    params = DecodeParams(decoder=decoder, max_new_tokens=steps + warmup + 2, ignore_eos=True, **DECODERS[decoder])
    requests = [engine.make_request(p, params) for p in prompts]
    reset_peak_memory(device)
    with torch.inference_mode():
        batch = RunningBatch(engine.runner)
        sync(device)
        started = time.perf_counter()
        batch.join(requests, list(range(len(requests))))
        sync(device)
        prefill_ms = (time.perf_counter() - started) * 1e3
        for _ in range(warmup):
            list(batch.step())
        times = []
        for _ in range(steps):
            sync(device)
            started = time.perf_counter()
            list(batch.step())
            sync(device)
            times.append((time.perf_counter() - started) * 1e3)
        batch.drop(range(len(requests)))
    return {"prefill_ms": prefill_ms, "step_ms": statistics.median(times), "step_ms_all": times,
            "peak_gpu_mb": peak_gpu_mb(device)}


def step_table(engine: Engine, batches: list[list[list[int]]], device: torch.device, steps: int) -> dict:
    """time_steps of every decoder over each batch of prompts: {"b<N>": {decoder: ..., "cold_over_expert": r}}."""
    table = {}
    for prompts in batches:
        row = {name: time_steps(engine, prompts, name, steps, device) for name in DECODERS}
        row["cold_over_expert"] = row["cold"]["step_ms"] / row["expert"]["step_ms"]
        table[f"b{len(prompts)}"] = row
    return table


def random_lora(model: torch.nn.Module, rank: int, seed: int = 0) -> LoraAdapter:
    """A random rank-`rank` LoRA (alpha = 2 rank) on every linear layer but the LM head, like a trained one's size."""
    gen = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings()
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            a = torch.randn(rank, module.in_features, generator=gen) / module.in_features ** 0.5
            b = torch.randn(module.out_features, rank, generator=gen) * 0.02
            weights[name] = (a, b)
    return LoraAdapter(name="random", path=Path("random"), rank=rank, scale=2.0, weights=weights)


def llama8b_part(args) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out, device = Path(args.out), torch.device(args.device)
    shape = LLAMA_8B if args.shape == "8b" else TINY
    config = LlamaConfig(**shape, tie_word_embeddings=False, attn_implementation="sdpa")
    started = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    base = BaseModel(model=model, tokenizer=tokenizer, source=f"random llama {args.shape}", path=Path(args.tokenizer))
    report = {"machine": environment(device), "shape": shape, "dtype": "bfloat16", "lora_rank": 16,
              "build_s": time.perf_counter() - started, "prompt_tokens": 128}
    adapter = random_lora(model, 16)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1000, 40000, (max(args.batch_sizes), 128), generator=gen).tolist()
    for lean in (True, False):
        label = "lean" if lean else "reference_forward"
        try:
            engine = Engine(base, [adapter], lean=lean)
            time_steps(engine, prompts[:1], "cold", 4, device)  # warm-up
            report[label] = step_table(engine, [prompts[:b] for b in args.batch_sizes], device, args.steps)
        except Exception:
            report[label] = {"error": traceback.format_exc()}
        write(out, "llama8b.json", report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("reference", "smollm2", "llama8b"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", help="smollm2: the JSON `reference` wrote")
    parser.add_argument("--gguf", default="smollm2", help="smollm2: the model (a built-in name or a .gguf file)")
    parser.add_argument("--adapter", default="src/cold/demo_adapters/smollm2-gsm8k")
    parser.add_argument("--tokenizer", help="llama8b: a directory with a tokenizer (token ids are random)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", default="8b", choices=("8b", "tiny"))
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    {"reference": reference_part, "smollm2": smollm2_part, "llama8b": llama8b_part}[args.part](args)


if __name__ == "__main__":
    main()
