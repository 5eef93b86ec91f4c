"""`cold bench`'s llama.cpp decoders, measured beside our own engine on the same GGUF and threads.

    llamacpp        llama.cpp greedy with the LoRA applied: the expert as a llama.cpp user runs it
                    (one context, one llama_decode per step over every sequence, argmax in numpy)
    llamacpp-base   the same loop without the LoRA
    llamacpp-cold   CoLD on llama.cpp (`cold.llamacpp`): our decode loop over an expert context
                    and an amateur context, the lazy amateur deciding when the second one runs

The runners have `cold.bench.cells`' three calls (prefill, step, finish); `e2e_greedy` is the
plain loop end to end (EOS honoured, finished sequences leave, static batches).
"""

from __future__ import annotations

from cold.bench.batch import BatchRunner
from cold.bench.policies import cobatch_kwargs
from cold.llamacpp.engine import LlamaCppEngine
from cold.llamacpp.lora import adapter_gguf
from cold.llamacpp.runner import Context, LlamaCppModel
from cold.load.models import resolve_gguf
from cold.params import DecodeParams

GREEDY = ("llamacpp", "llamacpp-base")  # the plain llama.cpp loop, with and without the LoRA
DECODERS = (*GREEDY, "llamacpp-cold")


def context_tokens(batch: int, prompt: int, new: int) -> int:
    """KV cells a context needs for `batch` sequences of `prompt` + `new` tokens (and some spare)."""
    return batch * (prompt + new + 8)


class GreedyRunner:
    """The plain llama.cpp greedy loop: all sequences in one context, one llama_decode per step."""

    module = None  # no torch module to time (cold.bench.cells.ForwardClock)

    def __init__(self, spec: dict):
        gguf = resolve_gguf(spec["model"])
        self.model = LlamaCppModel.load(gguf)
        lora = self.model.lora(adapter_gguf(spec["adapter"], gguf)) if spec["decoder"] == "llamacpp" else None
        batch, prompt = len(spec["prompts"]), len(spec["prompts"][0])
        self.context = Context(self.model, lora, 1.0, context_tokens(batch, prompt, spec["new_tokens"] + spec["warmup"]),
                               batch, spec["threads"])
        self.tokens: list[list[int]] = []

    def prefill(self, prompts: list[list[int]]) -> None:
        self.slots = [self.context.take(0) for _ in prompts]
        self.positions = [len(p) for p in prompts]
        self.logits = self.context.decode([(s, p, 0) for s, p in zip(self.slots, prompts)])
        self.tokens = [[] for _ in prompts]

    def step(self) -> None:
        picks = self.logits.argmax(axis=1).tolist()
        self.logits = self.context.decode([(s, [t], pos) for s, t, pos in zip(self.slots, picks, self.positions)])
        for row, token in enumerate(picks):
            self.tokens[row].append(token)
            self.positions[row] += 1

    def finish(self) -> None:
        self.context.clear()


class ColdRunner(BatchRunner):
    """CoLD on llama.cpp through our decode loop (`RunningBatch` over `LlamaCppRunner`)."""

    module = None

    def __init__(self, spec: dict):
        batch, prompt = len(spec["prompts"]), len(spec["prompts"][0])
        self.engine = LlamaCppEngine.load(
            spec["model"], [spec["adapter"]], threads=spec["threads"], **cobatch_kwargs(spec.get("cobatch_steps")),
            context_tokens=context_tokens(batch, prompt, spec["new_tokens"] + spec["warmup"]))
        self.params = DecodeParams(decoder="cold", alpha=spec["alpha"], beta=spec["beta"],
                                   max_new_tokens=spec["new_tokens"] + 1, ignore_eos=True)


def make_runner(spec: dict):
    return GreedyRunner(spec) if spec["decoder"] in GREEDY else ColdRunner(spec)


def e2e_engine(spec: dict):
    """(engine, decode params) of a llama.cpp decoder end to end: `GreedyE2E` and None for the plain
    loop. Each context is sized for a batch of the group's longest prompt."""
    greedy = spec["decoder"] in GREEDY
    adapters = [spec["adapter"]] if spec["decoder"] != "llamacpp-base" else []
    engine = LlamaCppEngine.load(spec["model"], adapters, threads=spec["threads"], **cobatch_kwargs(spec.get("cobatch_steps")))
    longest = max(len(engine.encode(q, chat=True)[1]) for q in spec["questions"])
    engine.runner.resize(context_tokens(spec["batch_size"], longest, spec["new_tokens"]))
    if greedy:
        return GreedyE2E(engine, spec["decoder"] == "llamacpp", spec["new_tokens"]), None
    return engine, DecodeParams(decoder="cold", alpha=spec["alpha"], beta=spec["beta"], max_new_tokens=spec["new_tokens"])


class GreedyE2E:
    """The plain llama.cpp greedy loop end to end: static batches, a sequence leaves at EOS or after
    `max_new` tokens, the others go on. Chat prompts are encoded as our engine encodes them."""

    def __init__(self, engine: LlamaCppEngine, adapted: bool, max_new: int):
        self.engine, self.max_new = engine, max_new
        self.context = engine.runner.context((0, 1.0) if adapted else (-1, 0.0))

    def encode(self, questions: list[str]) -> list[list[int]]:
        return [self.engine.encode(q, chat=True)[1] for q in questions]

    def generate(self, prompts: list[list[int]], max_new: int | None = None) -> tuple[list[int], list[str]]:
        """Greedy decoding of one static batch: (tokens generated, finish reason) per prompt."""
        eos, max_new = self.engine.eos_ids, max_new or self.max_new
        slots, kept = zip(*[self.context.start(p, len(p) + max_new) for p in prompts])
        positions = [len(p) for p in prompts]
        lengths, reasons = [0] * len(prompts), ["length"] * len(prompts)
        logits = self.context.decode([(s, p[k:], k) for s, p, k in zip(slots, prompts, kept)])
        live = list(range(len(prompts)))
        while live:
            going = []
            for seq, token in zip(live, logits.argmax(axis=1).tolist()):
                lengths[seq] += 1
                if token in eos:
                    reasons[seq] = "stop"
                elif lengths[seq] < max_new:
                    going.append((seq, token))
            if not going:
                break
            logits = self.context.decode([(slots[s], [t], positions[s]) for s, t in going])
            live = [s for s, _ in going]
            for s in live:
                positions[s] += 1
        for slot in slots:
            self.context.release(slot)
        return lengths, reasons
