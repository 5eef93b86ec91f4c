"""`cold bench`: decode-step speed of CoLD and its baselines, side by side, in one run.

    cold bench                                   # default model, its adapter, batch 1, 4, 16
    cold bench --batch-sizes 1 --decoders cold,expert --json bench/latest.json --plot bench/latest.png
    cold bench --e2e 200 --new-tokens 256        # end to end on GSM8K: expert greedy vs cold
    cold bench --e2e 100 --e2e-task coin_flip --cobatch-steps 0,4,always   # coin flip, three lazy-amateur policies

Step mode: `repeats` rounds; in each round every decoder at every batch size runs in its own
fresh process (so peak memory is per decoder), on the same seeded random prompts: load, an
untimed prefill and warm-up steps, then a timed prefill and `new_tokens` timed decode steps with
EOS ignored (every decoder does the same work). Rounds go round-robin over the decoders, so
the drift of a busy machine hits all of them alike. The copy bandwidth is measured before each
round and at the end, in the same kind of process. What each decoder is:
`cold.bench.cells.DECODERS`; the derived columns: `cold.bench.report`.

End-to-end mode (`--e2e N`): the first N problems of a task (`--e2e-task`, default GSM8K's test file)
as chat prompts, the way `cold eval` builds them, EOS honoured, batched like `cold generate`; total wall
time, time per generated token, tokens generated, how many runs hit max tokens, and the fraction of
CoLD's steps that needed the amateur.

`--cobatch-steps` lists lazy-amateur policies (`cold.sampling.amateur`): in both modes the `cold`
decoder runs once per policy, each its own row ("cold K=0", "cold always", ...; plain "cold" when
one policy is given), interleaved with the other decoders like they are with each other.

The command and its options: `cold.cli.bench`, which checks them and calls `measure`. torch, transformers
and the cells are imported inside the functions that measure, so that `cold --help` does not import them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import shlex
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from cold.errors import ColdError
from cold.load.demo import DEMO_ADAPTERS, demo_adapter_dir
from cold.tasks import readers as tasks
from cold.tasks.prompts import make_style

# Kept here (not imported from cold.bench.cells) so that `cold --help` does not import torch;
# tests check it matches bench_cells.DECODERS / DEFAULT_DECODERS.
DECODER_NAMES = ("base", "expert", "expert-merged", "cold", "cold-naive", "cold-peft-mixed", "expert-peft",
                 "expert-reference", "cold-reference", "llamacpp", "llamacpp-base", "llamacpp-cold")
LLAMACPP_DECODER_NAMES = ("llamacpp", "llamacpp-base", "llamacpp-cold")  # need the extra cold-decoding[llamacpp]
DEFAULT_DECODER_NAMES = ("base", "expert", "expert-merged", "cold", "cold-naive", "cold-peft-mixed")

E2E_DECODERS = ("expert", "cold", *LLAMACPP_DECODER_NAMES)
DEFAULT_E2E_DECODERS = ("expert", "cold")
E2E_TASKS = tuple(tasks.TASKS)  # built-in tasks; each has a demo adapter of the default model
DEFAULT_E2E_TASK = "gsm8k"
POLICY_DECODERS = ("cold", "llamacpp-cold")  # the decoders that --cobatch-steps runs once per lazy-amateur policy
ALWAYS = "always"  # the --cobatch-steps policy that keeps every amateur co-batched (cold.sampling.amateur.ALWAYS)
REFILL_GROUP = 4  # with --e2e-refill, each measuring process decodes 4 batches' worth of problems
MIN_GROUP = 16  # and at least this many problems (static batches of 1: 16 of them), as a long CLI run would
SCHEMA = "cold-bench/1"


# ---- running cells ---------------------------------------------------------------------------------


class Cells:
    """Runs measuring cells, each in a fresh child process (forked from a server that has already
    imported torch and transformers, so a cell starts in well under a second) or in-process."""

    PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "cold.decoding.engine", "cold.bench.cells"]

    def __init__(self, isolate: bool = True):
        self.isolate = isolate
        self.pool = None
        self.cpu_s = 0.0  # CPU time the cells' processes used (to tell other processes' load apart)
        if isolate:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(self.PRELOAD)
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1)
            self.pool.submit(os.getpid).result()  # start the server (its imports) before anything is measured

    def run(self, function, spec: dict, what: str) -> dict:
        if self.pool is None:
            return function(spec)
        try:
            result = self.pool.submit(function, spec).result()
        except BrokenProcessPool as exc:
            raise ColdError(f"the process measuring {what} died (out of memory?)") from exc
        self.cpu_s += result.get("cpu_s", 0.0)
        return result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ---- settings --------------------------------------------------------------------------------------


def command_line(s: dict) -> str:
    """The full command that reproduces a run (every setting explicit)."""
    parts = ["cold", "bench", "--model", s["model"]]
    if s["adapter_given"]:
        parts += ["--adapter", s["adapter_given"]]
    if s["e2e"]:
        parts += ["--e2e", str(s["e2e"]), "--e2e-task", s["e2e_task"], "--e2e-file", s["e2e_file"],
                  "--e2e-batch-size", str(s["e2e_batch_size"])]
        parts += ["--e2e-refill"] if s["e2e_refill"] else []
    else:
        parts += ["--batch-sizes", ",".join(map(str, s["batch_sizes"])), "--prompt-tokens", str(s["prompt_tokens"]),
                  "--repeats", str(s["repeats"]), "--warmup", str(s["warmup"]), "--seed", str(s["seed"])]
    parts += ["--new-tokens", str(s["new_tokens"]), "--decoders", ",".join(s["decoders"]),
              "--alpha", str(s["alpha"]), "--beta", str(s["beta"]), "--device", s["device"], "--dtype", s["dtype"]]
    if any(d in POLICY_DECODERS for d in s["decoders"]) and s["cobatch_steps"] != [None]:
        parts += ["--cobatch-steps", ",".join(map(str, s["cobatch_steps"]))]
    if s["kv_dtype"]:
        parts += ["--kv-dtype", s["kv_dtype"]]
    if s["threads"]:
        parts += ["--threads", str(s["threads"])]
    return shlex.join(parts)


def machine_info(decoders=()) -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    memory_gb = None
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory_gb = kb / 2**20
    except (OSError, StopIteration):
        pass
    return {
        "hostname": platform.node(), "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
        "memory_gb": memory_gb or 0.0, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_start": list(os.getloadavg()),
        "llamacpp": _llamacpp_build() if set(decoders) & set(LLAMACPP_DECODER_NAMES) else None,
    }


def _llamacpp_build() -> dict:
    from cold.llamacpp.library import build_info

    return build_info()


class LoadMeter:
    """How busy the machine was with *other* work during a run: all CPU time the kernel counted
    (/proc/stat) minus what this process and its cells used, per second of wall time, in cores
    (0 = quiet; the forkserver's imports count as other work, a few CPU seconds)."""

    def __init__(self, cells: Cells):
        self.cells = cells
        self.start_busy, self.start_wall, self.start_ours = self._busy(), time.perf_counter(), self._ours()

    def _ours(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime + self.cells.cpu_s

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def other_cores(self) -> float | None:
        end = self._busy()
        if end is None or self.start_busy is None:
            return None
        ours = self._ours() - self.start_ours
        return max(0.0, (end - self.start_busy - ours) / (time.perf_counter() - self.start_wall))


def _resolve_adapter(model: str, adapter: str | None, tmp: Path, task: str = "") -> tuple[str | None, str | None]:
    """(adapter dir, directory to write a random LoRA into): the given one, the demo one (of `task`, else the
    model's default), or a random one for a model without demo adapters. A built-in model without a demo
    adapter for `task` is refused (a random LoRA would not decode the task)."""
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ColdError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json)")
        return adapter, None
    demo = demo_adapter_dir(model, task)
    if demo is not None:
        return str(demo), None
    if task and model in DEMO_ADAPTERS:
        raise ColdError(f"--e2e-task {task}: model {model!r} has no demo adapter for it (it has: "
                        f"{', '.join(DEMO_ADAPTERS[model])}); give --adapter DIR")
    random_dir = tmp / "random-lora-r8"
    return str(random_dir), str(random_dir)


def policy_runs(decoders: list[str], policies: list) -> list[dict]:
    """One entry per row to measure: {"label", "decoder", "cobatch_steps"}. Each decoder of POLICY_DECODERS
    once per policy (labelled "cold K=0", "cold always"; just "cold" when there is one policy), the others
    once with cobatch_steps None (the engine's default, which they do not use)."""
    runs = []
    for decoder in decoders:
        if decoder not in POLICY_DECODERS:
            runs.append({"label": decoder, "decoder": decoder, "cobatch_steps": None})
            continue
        for policy in policies:
            label = decoder if len(policies) == 1 else f"{decoder} {policy_name(policy)}"
            runs.append({"label": label, "decoder": decoder, "cobatch_steps": policy})
    return runs


def policy_name(policy) -> str:
    """'K=4' for an integer policy, 'always' for ALWAYS, 'default' for the engine's (None)."""
    return ALWAYS if policy == ALWAYS else "default" if policy is None else f"K={policy}"


def _tagged(result: dict, run: dict) -> dict:
    """A cell's result named by its row: decoder = the row's label, kind = the decoder it ran, its policy."""
    return {**result, "decoder": run["label"], "kind": run["decoder"], "cobatch_steps": run["cobatch_steps"]}


# ---- the two modes ---------------------------------------------------------------------------------


def run_bench(settings: dict, cells: Cells, progress=None) -> dict:
    """Step mode: every decoder x batch size; returns the report (settings, machine, rows, targets)."""
    from cold.bench import cells as bench_cells  # torch-bound: not at `cold --help`
    from cold.bench import report as bench_report

    s = settings
    common = {k: s[k] for k in ("model", "device", "dtype", "kv_dtype", "threads", "alpha", "beta", "prompt_tokens", "new_tokens", "seed")}
    machine = machine_info(s["decoders"])
    meter = LoadMeter(cells)
    say = progress or (lambda text: None)
    say("reading the model, drawing prompts")
    info = cells.run(bench_cells.info_cell, {**common, "adapter": s["adapter"], "make_adapter": s["make_adapter"],
                                             "max_batch": max(s["batch_sizes"])}, "the model")
    prompts = info.pop("prompts")
    bandwidth_spec = {**common, "bandwidth_mb": s["bandwidth_mb"]}
    bandwidth, parts = [], {}
    runs = policy_runs(s["decoders"], s["cobatch_steps"])
    total, done = s["repeats"] * len(s["batch_sizes"]) * len(runs), 0
    for round_ in range(s["repeats"]):  # round-robin: drift of a busy machine hits every decoder alike
        say(f"round {round_ + 1}/{s['repeats']}: measuring copy bandwidth")
        bandwidth.append(cells.run(bench_cells.bandwidth_cell, bandwidth_spec, "copy bandwidth"))
        shift = round_ % len(runs)
        order = runs[shift:] + runs[:shift]  # rotate, so no decoder always runs first
        for b in s["batch_sizes"]:
            for run in order:
                done += 1
                say(f"round {round_ + 1}/{s['repeats']}, batch {b}: {run['label']} ({done}/{total})")
                spec = {**common, "decoder": run["decoder"], "cobatch_steps": run["cobatch_steps"], "adapter": s["adapter"],
                        "prompts": prompts[:b], "repeats": 1, "warmup": s["warmup"]}
                result = cells.run(bench_cells.decoder_cell, spec, f"{run['label']} at batch {b}")
                parts.setdefault((run["label"], b), []).append(_tagged(result, run))
    say("measuring copy bandwidth")
    bandwidth.append(cells.run(bench_cells.bandwidth_cell, bandwidth_spec, "copy bandwidth"))
    results = [merge_cells(parts[(r["label"], b)]) for b in s["batch_sizes"] for r in runs]
    machine["load_average_end"] = list(os.getloadavg())
    machine["other_cores_busy"] = meter.other_cores()
    machine["threads"] = results[0]["threads"] if results else bandwidth[0]["threads"]
    best = max(b["copy_gbps"] for b in bandwidth)
    rows = bench_report.summarize(results, info, best)
    return {
        "schema": SCHEMA,
        "mode": "steps",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(s),
        "machine": machine,
        "settings": _public(s),
        "info": info,
        "bandwidth": {"copy_gbps": best, "measurements": [b["copy_gbps"] for b in bandwidth], "bytes": bandwidth[0]["bytes"],
                      "method": "dst.copy_(src) of a float32 tensor; (read + write) bytes / median time; best of the "
                                "measurements before each round and at the end"},
        "memory": {"isolated": cells.isolate,
                   "method": "VmHWM of the measuring process, reset after loading (peak_rss_mb: prefill + decode incl. the "
                             "loaded weights) and before (load_peak_rss_mb); the largest over the repeats"},
        "timing": "each repeat is one fresh process per decoder and batch size, round-robin over decoders (order rotated "
                  "per round): load, untimed prefill + warm-up steps, then a timed prefill and new_tokens timed steps",
        "decoders": {d: bench_cells.DECODERS[d] for d in s["decoders"]},
        "rows": rows,
        "targets": bench_report.targets(rows),
    }


def merge_cells(parts: list[dict]) -> dict:
    """One decoder and batch size measured in several processes: pool the timings, keep the worst peak."""
    merged = dict(parts[-1])
    for key in ("prefill_ms", "step_ms"):
        merged[key] = [v for p in parts for v in p[key]]
    bodies = [p["body_ms"] for p in parts]
    merged["body_ms"] = None if any(f is None for f in bodies) else [v for f in bodies for v in f]
    for key in ("peak_rss_mb", "load_peak_rss_mb", "peak_gpu_mb"):
        values = [p[key] for p in parts if p[key] is not None]
        merged[key] = max(values) if values else None
    merged["load_s"] = sorted(p["load_s"] for p in parts)[len(parts) // 2]
    merged["processes"] = len(parts)
    return merged


def e2e_source(task: str | None, file: str | Path | None) -> tuple[str, str]:
    """(task name, file to read) of end-to-end mode: a built-in task (default gsm8k) and the given file,
    else the task's default split (test; commonsenseqa: dev) under the data directory."""
    task = task or DEFAULT_E2E_TASK
    if task not in E2E_TASKS:
        raise ColdError(f"--e2e-task {task}: not a built-in task; choose from {', '.join(E2E_TASKS)}")
    if file is not None:
        if not Path(file).is_file():
            raise ColdError(f"--e2e-file {file}: file not found")
        return task, str(file)
    the_task = tasks.get_task(task)
    return task, str(the_task.path(the_task.default_split))


def e2e_prompts(task: str, path: str | Path, count: int) -> list[str]:
    """The first `count` problems of `path` as chat prompts (the user message), as `cold eval --prompt chat`
    renders them. gsm8k reads any JSONL with a 'question' field (its prompt is the question); other tasks
    read their own format."""
    path = Path(path)
    if task == "gsm8k":
        return load_questions(path, count)
    the_task = tasks.get_task(task)
    problems = the_task.read(path)
    if len(problems) < count:
        raise ColdError(f"--e2e {count}: {path} has only {len(problems)} problems")
    style = make_style("chat", the_task.family)
    return [style.render(p) for p in problems[:count]]


def load_questions(path: Path, count: int) -> list[str]:
    """The 'question' field of the first `count` rows of a JSONL file, stripped."""
    if not path.is_file():
        raise ColdError(f"--e2e-file {path}: file not found")
    questions = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    questions.append(json.loads(line)["question"].strip())
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise ColdError(f"{path}:{number}: expected a JSON object with a string field 'question'") from None
            if len(questions) == count:
                break
    if len(questions) < count:
        raise ColdError(f"--e2e {count}: {path} has only {len(questions)} problems")
    return questions


def run_e2e(settings: dict, cells: Cells, progress=None) -> dict:
    """End-to-end mode: the first N problems, expert greedy and cold (once per policy), same prompts and max tokens."""
    from cold.bench import cells as bench_cells  # torch-bound: not at `cold --help`
    from cold.bench import report as bench_report

    s = settings
    say = progress or (lambda text: None)
    machine = machine_info(s["decoders"])
    meter = LoadMeter(cells)
    questions = e2e_prompts(s["e2e_task"], Path(s["e2e_file"]), s["e2e"])
    common = {k: s[k] for k in ("model", "device", "dtype", "kv_dtype", "threads", "alpha", "beta", "new_tokens")}
    if s["make_adapter"]:
        say("making a random LoRA")
        cells.run(bench_cells.info_cell, {**common, "adapter": None, "make_adapter": s["make_adapter"], "max_batch": 1,
                                          "prompt_tokens": 1, "seed": 0}, "the model")
    # problems per measuring process: the engine's running estimates (the lazy amateur's NeedShare) see several
    size = max(s["e2e_batch_size"] * (REFILL_GROUP if s["e2e_refill"] else 1), MIN_GROUP)
    batches = [questions[i : i + size] for i in range(0, len(questions), size)]
    runs = policy_runs(s["decoders"], s["cobatch_steps"])
    parts: dict[str, list[dict]] = {r["label"]: [] for r in runs}
    for number, batch in enumerate(batches):  # interleaved, order flipped per batch: drift hits all alike
        order = runs if number % 2 == 0 else runs[::-1]
        for run in order:
            say(f"end to end, group {number + 1}/{len(batches)}: {run['label']}")
            spec = {**common, "decoder": run["decoder"], "cobatch_steps": run["cobatch_steps"], "adapter": s["adapter"],
                    "questions": batch, "batch_size": s["e2e_batch_size"], "refill": s["e2e_refill"]}
            parts[run["label"]].append(_tagged(cells.run(bench_cells.e2e_cell, spec, f"{run['label']} end to end"), run))
    results = [
        {
            "decoder": d,
            "kind": ps[0]["kind"],
            "cobatch_steps": ps[0]["cobatch_steps"],
            "threads": ps[0]["threads"],
            "wall_s": sum(p["wall_s"] for p in ps),
            "batch_wall_s": [p["wall_s"] for p in ps],
            "prefill_s": None if any(p["prefill_s"] is None for p in ps) else sum(p["prefill_s"] for p in ps),
            "lengths": [n for p in ps for n in p["lengths"]],
            "finish_reasons": [r for p in ps for r in p["finish_reasons"]],
            "amateur_steps": [a for p in ps for a in p["amateur_steps"]],
            "steps": sum(p["steps"] for p in ps),
            "peak_rss_mb": max(p["peak_rss_mb"] for p in ps),
        }
        for d, ps in parts.items()
    ]
    machine["load_average_end"] = list(os.getloadavg())
    machine["other_cores_busy"] = meter.other_cores()
    machine["threads"] = results[0]["threads"]
    rows = bench_report.summarize_e2e(results)
    return {
        "schema": SCHEMA, "mode": "e2e", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(s),
        "machine": machine, "settings": _public(s), "info": {"adapter": s["adapter"], "task": s["e2e_task"]},
        "memory": {"isolated": cells.isolate, "method": "VmHWM of the measuring process from after the warm-up to the "
                                                           "end; the largest over the batches"},
        "timing": "one fresh process per group of problems (a batch; 4 batches with --e2e-refill; at least 16 problems) and decoder, decoders "
                  "interleaved (order flipped every group); wall_s sums the groups' decode times (after loading and a "
                  "short warm-up); prefill_s the part of it spent in ModelRunner.prefill",
        "rows": rows, "paired": bench_report.e2e_paired(rows),
        "targets": bench_report.e2e_targets(rows, s["e2e_task"], s["e2e_batch_size"]),
    }


def _public(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("make_adapter", "adapter_given")}


def measure(settings: dict, isolate: bool, progress=None) -> dict:
    """The whole run, step or end-to-end mode: the adapter (the given one, the model's demo one, or a random LoRA
    made for this run in a temporary directory), a GGUF converted once before the measuring processes start,
    then the cells; returns the report."""
    from cold.load.models import resolve_model_dir

    cells = None
    try:
        with tempfile.TemporaryDirectory(prefix="cold-bench-") as tmp:
            task = settings["e2e_task"] if settings["e2e"] else ""
            settings["adapter"], settings["make_adapter"] = _resolve_adapter(settings["model"], settings["adapter_given"],
                                                                             Path(tmp), task)
            resolve_model_dir(settings["model"], settings["dtype"])  # convert a GGUF once, before the measuring processes start
            cells = Cells(isolate)
            report = (run_e2e if settings["e2e"] else run_bench)(settings, cells, progress)
            if settings["make_adapter"]:
                report["info"]["adapter"] = "random rank-8 LoRA on all linear layers (made for this run)"
            return report
    finally:
        if cells is not None:
            cells.close()
