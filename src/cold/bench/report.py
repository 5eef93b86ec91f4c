"""Turn `cold bench` measurements into rows, targets, a terminal table, Markdown and a PNG chart."""

from __future__ import annotations

import statistics

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cold.bench.cells import USES_LORA

# Whose tokens each decoder should reproduce (greedy): `agreement` compares against these.
REFERENCE = {"cold": "cold-naive", "cold-peft-mixed": "cold-naive", "cold-reference": "cold-naive",
             "expert": "expert-merged", "expert-peft": "expert-merged", "expert-reference": "expert-merged"}

# Issue 4's goals for the engine (only those whose decoders and batch sizes were measured are checked).
STEP_RATIO_LIMITS = {1: 1.15, 16: 1.30}  # cold step / expert step, by batch size
MIN_SPEEDUP = 1.6  # cold vs cold-naive and vs cold-peft-mixed, every batch size
MAX_MEMORY_RATIO = 1.1  # cold peak RSS / expert peak RSS
MIN_FLOOR_FRACTION = 0.6  # cold at batch 1
# Issue 19's goals against llama.cpp greedy with the LoRA ("llamacpp"): total tokens/s of the best CoLD
# path in step mode, by batch size; tokens/s end to end at batch 1, by task.
LLAMACPP_THROUGHPUT = {16: 1.3}
LLAMACPP_E2E = {"coin_flip": 0.9, "gsm8k": 0.75}


def kind(row: dict) -> str:
    """The decoder a row ran: its label without the lazy-amateur policy ("cold K=0" -> "cold")."""
    return row.get("kind") or row["decoder"]


def _median(values):
    return statistics.median(values) if values else None


def _prefix_agreement(mine: list[list[int]], theirs: list[list[int]]) -> float:
    """Mean over prompts of (length of the common prefix) / (tokens generated)."""
    shares = []
    for a, b in zip(mine, theirs):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / max(len(a), 1))
    return sum(shares) / max(len(shares), 1)


def summarize(cells: list[dict], info: dict, bandwidth_gbps: float) -> list[dict]:
    """One row per (decoder, batch size) with medians, rates, floors and ratios; a decoder run under several
    lazy-amateur policies has a row per policy (`decoder` its label, `kind` the decoder)."""
    rows = []
    for cell in cells:
        step = _median(cell["step_ms"])
        forward = _median(cell["body_ms"]) if cell.get("body_ms") else None
        batch = cell["batch_size"]
        read = info["weight_bytes"] + (info["lora_bytes"] if kind(cell) in USES_LORA else 0)
        floor_ms = read / (bandwidth_gbps * 1e9) * 1e3
        per_repeat = len(cell["step_ms"]) // max(len(cell["prefill_ms"]), 1)
        rows.append({
            "decoder": cell["decoder"],
            "kind": kind(cell),
            "cobatch_steps": cell.get("cobatch_steps"),
            "batch_size": batch,
            "prefill_ms": _median(cell["prefill_ms"]),
            "step_ms": step,
            "step_p90_ms": float(np.percentile(cell["step_ms"], 90)),
            "body_ms": forward,
            "outside_body_ms": step - forward if forward is not None else None,
            "tokens_per_s_per_prompt": 1e3 / step,
            "tokens_per_s_total": batch * 1e3 / step,
            "peak_rss_mb": cell["peak_rss_mb"],
            "load_peak_rss_mb": cell["load_peak_rss_mb"],
            "peak_gpu_mb": cell.get("peak_gpu_mb"),
            "load_s": cell["load_s"],
            "weight_bytes_per_step": read,
            "floor_ms": floor_ms,
            "floor_fraction": floor_ms / step,
            "step_ms_repeat_medians": [
                statistics.median(cell["step_ms"][i : i + per_repeat]) for i in range(0, len(cell["step_ms"]), per_repeat)
            ],
            "threads": cell["threads"],
            "processes": cell.get("processes", 1),
        })
    by_key = {(r["decoder"], r["batch_size"]): r for r in rows}
    tokens = {(c["decoder"], c["batch_size"]): c["tokens"] for c in cells}
    for r in rows:
        b = r["batch_size"]
        expert, naive = by_key.get(("expert", b)), by_key.get(("cold-naive", b))
        greedy = by_key.get(("llamacpp", b))
        r["vs_expert"] = r["step_ms"] / expert["step_ms"] if expert else None
        r["vs_llamacpp"] = r["step_ms"] / greedy["step_ms"] if greedy else None
        r["vs_cold_naive"] = r["step_ms"] / naive["step_ms"] if naive else None
        r["memory_vs_expert"] = r["peak_rss_mb"] / expert["peak_rss_mb"] if expert else None
        ref = REFERENCE.get(r["kind"])
        if ref and (ref, b) in tokens:
            r["agreement_with"] = ref
            r["agreement"] = _prefix_agreement(tokens[(r["decoder"], b)], tokens[(ref, b)])
        else:
            r["agreement_with"] = r["agreement"] = None
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """Issue 4's goals checked on these rows (only the measurable ones); every cold row (one per
    lazy-amateur policy) is checked, named by its label."""
    by_key = {(r["decoder"], r["batch_size"]): r for r in rows}
    batches = sorted({r["batch_size"] for r in rows})
    colds = [r for r in rows if kind(r) == "cold"]
    found = []

    def add(name, value, limit, ok):
        found.append({"target": name, "value": value, "limit": limit, "ok": bool(ok)})

    def cold_at(b):
        return [r for r in colds if r["batch_size"] == b]

    for b, limit in STEP_RATIO_LIMITS.items():
        for cold in cold_at(b):
            if cold["vs_expert"] is not None:
                add(f"{cold['decoder']} step / expert step, batch {b}", cold["vs_expert"], f"<= {limit}",
                    cold["vs_expert"] <= limit)
    for other in ("cold-naive", "cold-peft-mixed"):
        for b in batches:
            slow = by_key.get((other, b))
            for cold in cold_at(b) if slow else []:
                speedup = slow["step_ms"] / cold["step_ms"]
                add(f"{other} step / {cold['decoder']} step, batch {b}", speedup, f">= {MIN_SPEEDUP}", speedup >= MIN_SPEEDUP)
    for b in batches:
        for cold in cold_at(b):
            if cold["memory_vs_expert"] is not None:
                ratio = cold["memory_vs_expert"]
                add(f"{cold['decoder']} peak RSS / expert peak RSS, batch {b}", ratio, f"<= {MAX_MEMORY_RATIO}",
                    ratio <= MAX_MEMORY_RATIO)
    for cold in cold_at(1):
        add(f"{cold['decoder']} fraction of the bandwidth floor, batch 1", cold["floor_fraction"], f">= {MIN_FLOOR_FRACTION}",
            cold["floor_fraction"] >= MIN_FLOOR_FRACTION)
    for b, limit in LLAMACPP_THROUGHPUT.items():
        greedy = by_key.get(("llamacpp", b))
        paths = [r for r in rows if kind(r) in COLD_KINDS and r["batch_size"] == b]
        if greedy and paths:
            best = max(paths, key=lambda r: r["tokens_per_s_total"])
            ratio = best["tokens_per_s_total"] / greedy["tokens_per_s_total"]
            add(f"best CoLD ({best['decoder']}) tokens/s / llamacpp greedy tokens/s, batch {b}", ratio, f">= {limit}", ratio >= limit)
    return found


def e2e_targets(rows: list[dict], task: str, batch_size: int) -> list[dict]:
    """Issue 19's end-to-end goal: the best CoLD path's tokens/s against llama.cpp greedy with the
    LoRA, at batch 1 (coin flip >= 0.9x, GSM8K >= 0.75x); none unless both were measured."""
    greedy = next((r for r in rows if r["decoder"] == "llamacpp"), None)
    paths = [r for r in rows if kind(r) in COLD_KINDS]
    limit = LLAMACPP_E2E.get(task)
    if greedy is None or not paths or limit is None or batch_size != 1:
        return []
    best = max(paths, key=lambda r: r["tokens_per_s"])
    ratio = best["tokens_per_s"] / greedy["tokens_per_s"]
    return [{"target": f"best CoLD ({best['decoder']}, amateur {best['amateur_fraction'] or 0:.0%} of steps) tokens/s / "
                       f"llamacpp tokens/s, {task}, batch 1", "value": ratio, "limit": f">= {limit}", "ok": ratio >= limit}]


# ---- text ----------------------------------------------------------------------------------------

COLUMNS = [  # (header, key, format)
    ("decoder", "decoder", "{}"),
    ("B", "batch_size", "{}"),
    ("prefill ms", "prefill_ms", "{:.0f}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("p90 ms", "step_p90_ms", "{:.1f}"),
    ("body ms", "body_ms", "{:.1f}"),
    ("tok/s/prompt", "tokens_per_s_per_prompt", "{:.1f}"),
    ("tok/s total", "tokens_per_s_total", "{:.1f}"),
    ("peak MB", "peak_rss_mb", "{:.0f}"),
    ("vs expert", "vs_expert", "{:.2f}x"),
    ("vs naive", "vs_cold_naive", "{:.2f}x"),
    ("vs llama.cpp", "vs_llamacpp", "{:.2f}x"),
    ("floor %", "floor_fraction", "{:.0%}"),
    ("same tokens", "agreement", "{:.0%}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def _quiet(machine: dict) -> str:
    other = machine.get("other_cores_busy")
    busy = "unknown" if other is None else f"{other:.2f} cores"
    return (f"load average {machine['load_average_start'][0]:.2f} at start (1 min); "
            f"other processes kept {busy} busy on average during the run")


def _kv(settings: dict) -> str:
    """' (KV cache bfloat16)' when the engine's cache is stored narrower than the weights."""
    return f" (KV cache {settings['kv_dtype']})" if settings.get("kv_dtype") else ""


POLICY_KINDS = ("cold", "llamacpp-cold")  # decoders measured once per lazy-amateur policy
COLD_KINDS = ("cold", "llamacpp-cold")  # the CoLD paths whose best row the llama.cpp targets take


def policy_lines(report: dict) -> list[str]:
    """A line naming the lazy-amateur policy of each CoLD row (none without CoLD rows)."""
    colds = list(dict.fromkeys((kind(r), r.get("cobatch_steps")) for r in report["rows"] if kind(r) in POLICY_KINDS))
    if not colds:
        return []
    name = {None: "the engine's default (ours K=16, llama.cpp's K=0)", "always": "always"}
    shown = ", ".join(f"{k} " + name.get(p, f"K={p}") for k, p in colds)
    return [f"lazy amateur (--cobatch-steps): {shown}; K = steps an amateur stays co-batched with its expert after it "
            "was needed (0 = fully lazy), always = every step"]


def llamacpp_lines(report: dict) -> list[str]:
    """The llama.cpp build the llamacpp rows ran (none without them)."""
    build = report["machine"].get("llamacpp")
    if not build:
        return []
    return [f"llama.cpp: llama-cpp-python {build['version']}, {build['cpu_build']}; in use: {build['features']}; "
            "its rows run the same GGUF (the model's own quantisation), our engine's the dequantised copy"]


def header_lines(report: dict) -> list[str]:
    m, s, i, bw = report["machine"], report["settings"], report["info"], report["bandwidth"]
    lora = f"LoRA r={i['adapter_rank']} on {i['adapter_modules']} modules, {i['lora_bytes'] / 2**20:.1f} MiB" if i["adapter"] else "no adapter"
    return policy_lines(report) + llamacpp_lines(report) + [
        f"machine: {m['cpu']} ({m['cores']} cores), {m['memory_gb']:.0f} GB RAM, torch {m['torch']} on {s['device']}, "
        f"threads {m['threads']}, {_quiet(m)}",
        f"model: {s['model']} ({i['architecture']}, {i['params'] / 1e6:.0f}M params, {s['dtype']}{_kv(s)}, "
        f"{i['weight_bytes'] / 2**20:.0f} MiB read per step); {lora}",
        f"prompts: {s['prompt_tokens']} random tokens (seed {s['seed']}); {s['new_tokens']} decode steps, EOS ignored; "
        f"median over {s['repeats']} rounds (a fresh process per decoder each, after a prefill and {s['warmup']} warm-up steps); alpha={s['alpha']} beta={s['beta']}",
        f"copy bandwidth: {bw['copy_gbps']:.1f} GB/s (best of {', '.join(f'{g:.1f}' for g in bw['measurements'])}); "
        f"floor = weight bytes per step / bandwidth",
    ]


def print_report(report: dict, console: Console) -> None:
    for line in header_lines(report):
        console.print(f"[dim]{escape(line)}")
    table = Table(show_lines=False, header_style="bold")
    for header, key, _ in COLUMNS:
        table.add_column(header, justify="left" if key == "decoder" else "right")
    last = None
    for row in report["rows"]:
        if last is not None and row["batch_size"] != last:
            table.add_section()
        last = row["batch_size"]
        table.add_row(*[_cell(row, key, fmt) for _, key, fmt in COLUMNS])
    console.print(table)
    print_targets(report, console)


def print_targets(report: dict, console: Console) -> None:
    if report.get("targets"):
        t = Table(title="speed targets", header_style="bold")
        for name in ("target", "value", "limit", "ok"):
            t.add_column(name, justify="left" if name == "target" else "right")
        for goal in report["targets"]:
            t.add_row(escape(goal["target"]), f"{goal['value']:.2f}", goal["limit"], "[green]yes" if goal["ok"] else "[red]no")
        console.print(t)


def markdown_targets(report: dict) -> list[str]:
    if not report.get("targets"):
        return []
    lines = ["", "| target | value | limit | met |", "|---|---|---|---|"]
    return lines + [f"| {g['target']} | {g['value']:.2f} | {g['limit']} | {'yes' if g['ok'] else 'no'} |" for g in report["targets"]]


def _markdown_table(report: dict, header: list[str], columns) -> list[str]:
    """The command, the header bullets and the rows of `report` as Markdown lines."""
    lines = [f"Command: `{report['command']}`", ""]
    lines += [f"- {line}" for line in header]
    lines += ["", "| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in columns) + " |")
    return lines


def markdown(report: dict) -> str:
    lines = _markdown_table(report, header_lines(report), COLUMNS) + markdown_targets(report)
    return "\n".join(lines) + "\n"


# ---- chart ---------------------------------------------------------------------------------------


def plot(report: dict, path) -> None:
    """Median step time (p90 whisker) per decoder and batch size, the bandwidth floor, and ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    by_key = {(r["decoder"], r["batch_size"]): r for r in rows}
    width = 0.8 / len(decoders)
    x = np.arange(len(batches))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for k, d in enumerate(decoders):
        med = [by_key[(d, b)]["step_ms"] if (d, b) in by_key else np.nan for b in batches]
        p90 = [by_key[(d, b)]["step_p90_ms"] if (d, b) in by_key else np.nan for b in batches]
        pos = x - 0.4 + width * (k + 0.5)
        left.bar(pos, med, width, label=d, yerr=[np.zeros(len(med)), np.subtract(p90, med)], capsize=2)
        ratio = [by_key[(d, b)]["vs_expert"] if (d, b) in by_key and by_key[(d, b)]["vs_expert"] else np.nan for b in batches]
        right.bar(pos, ratio, width, label=d)
    floor = report["info"]["weight_bytes"] + report["info"]["lora_bytes"]
    floor_ms = floor / (report["bandwidth"]["copy_gbps"] * 1e9) * 1e3
    left.axhline(floor_ms, color="black", linestyle="--", linewidth=1, label=f"bandwidth floor {floor_ms:.1f} ms")
    right.axhline(1.0, color="black", linewidth=1)
    for ax, title, ylabel in ((left, "decode step time (median, whisker = p90)", "ms per step"),
                              (right, "step time relative to expert (LoRA unmerged, our engine)", "x expert")):
        ax.set_xticks(x, [f"batch {b}" for b in batches])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8)
    s, m = report["settings"], report["machine"]
    fig.suptitle(f"cold bench: {s['model']} {s['dtype']}, {s['prompt_tokens']}-token prompts, {s['new_tokens']} steps, "
                 f"threads {m['threads']}, {m['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- end to end ------------------------------------------------------------------------------------

E2E_COLUMNS = [
    ("decoder", "decoder", "{}"),
    ("problems", "problems", "{}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("ms/token", "ms_per_token", "{:.1f}"),
    ("amateur %", "amateur_fraction", "{:.0%}"),
    ("prefill s", "prefill_s", "{:.1f}"),
    ("tokens", "tokens", "{}"),
    ("tokens/problem", "tokens_per_problem", "{:.1f}"),
    ("steps", "steps", "{}"),
    ("hit max %", "hit_max_fraction", "{:.0%}"),
    ("tok/s", "tokens_per_s", "{:.1f}"),
    ("tok/s x llama.cpp", "tokens_per_s_vs_llamacpp", "{:.2f}x"),
    ("s/token x expert", "per_token_vs_expert", "{:.2f}x"),
    ("decode s/token x expert", "decode_per_token_vs_expert", "{:.2f}x"),
    ("wall x expert", "wall_vs_expert", "{:.2f}x"),
    ("peak MB", "peak_rss_mb", "{:.0f}"),
]


def amateur_fraction(amateur_steps: list, lengths: list[int]) -> tuple[int | None, float | None]:
    """(steps that needed the amateur, their fraction of all generated tokens) over the problems;
    (None, None) unless every problem has a count (only CoLD's do)."""
    if not amateur_steps or len(amateur_steps) != len(lengths) or any(a is None for a in amateur_steps):
        return None, None
    return sum(amateur_steps), sum(amateur_steps) / max(sum(lengths), 1)


def summarize_e2e(cells: list[dict]) -> list[dict]:
    """One row per decoder (per lazy-amateur policy for cold): totals, rates, time per token and the
    fraction of CoLD's steps that needed the amateur; ratios against expert."""
    rows = []
    for c in cells:
        tokens = sum(c["lengths"])
        amateur, fraction = amateur_fraction(c.get("amateur_steps"), c["lengths"])
        rows.append({
            "decoder": c["decoder"], "kind": kind(c), "cobatch_steps": c.get("cobatch_steps"),
            "problems": len(c["lengths"]), "wall_s": c["wall_s"], "tokens": tokens,
            "ms_per_token": c["wall_s"] * 1e3 / max(tokens, 1), "amateur_steps": amateur, "amateur_fraction": fraction,
            "amateur_steps_per_problem": c.get("amateur_steps"),
            "tokens_per_problem": tokens / max(len(c["lengths"]), 1),
            "hit_max_fraction": sum(r == "length" for r in c["finish_reasons"]) / max(len(c["lengths"]), 1),
            "tokens_per_s": tokens / c["wall_s"], "peak_rss_mb": c["peak_rss_mb"], "lengths": c["lengths"],
            "finish_reasons": c["finish_reasons"], "batch_wall_s": c.get("batch_wall_s"), "prefill_s": c.get("prefill_s"),
            "steps": c.get("steps"),
            "decode_s": c["wall_s"] - c["prefill_s"] if c.get("prefill_s") is not None else None,
        })
    expert = next((r for r in rows if r["decoder"] == "expert"), None)
    greedy = next((r for r in rows if r["decoder"] == "llamacpp"), None)
    for r in rows:
        r["tokens_per_s_vs_llamacpp"] = r["tokens_per_s"] / greedy["tokens_per_s"] if greedy else None
        r["wall_vs_expert"] = r["wall_s"] / expert["wall_s"] if expert else None
        r["per_token_vs_expert"] = (r["wall_s"] / max(r["tokens"], 1)) / (expert["wall_s"] / max(expert["tokens"], 1)) if expert else None
        timed = expert and r["decode_s"] is not None and expert["decode_s"] is not None
        r["decode_per_token_vs_expert"] = (
            (r["decode_s"] / max(r["tokens"], 1)) / (expert["decode_s"] / max(expert["tokens"], 1)) if timed else None
        )
    return rows


def e2e_paired(rows: list[dict]) -> dict | None:
    """Per-problem comparison of cold (the first cold row, when there is one per policy) with expert:
    where do the saved tokens come from?"""
    e = next((r for r in rows if r["decoder"] == "expert"), None)
    c = next((r for r in rows if kind(r) == "cold"), None)
    if e is None or c is None:
        return None
    runaway = [i for i, r in enumerate(e["finish_reasons"]) if r == "length"]
    saved_runaway = sum(e["lengths"][i] - c["lengths"][i] for i in runaway)
    saved = sum(e["lengths"]) - sum(c["lengths"])
    return {
        "cold": c["decoder"],
        "tokens_saved": saved,
        "expert_hit_max": len(runaway),
        "of_which_cold_stopped": sum(c["finish_reasons"][i] == "stop" for i in runaway),
        "cold_hit_max_where_expert_stopped": sum(
            c["finish_reasons"][i] == "length" and e["finish_reasons"][i] == "stop" for i in range(len(e["lengths"]))
        ),
        "tokens_saved_on_expert_runaways": saved_runaway,
        "cold_shorter": sum(cl < el for cl, el in zip(c["lengths"], e["lengths"])),
        "cold_longer": sum(cl > el for cl, el in zip(c["lengths"], e["lengths"])),
    }


def e2e_header_lines(report: dict) -> list[str]:
    m, s = report["machine"], report["settings"]
    return policy_lines(report) + llamacpp_lines(report) + [
        f"machine: {m['cpu']} ({m['cores']} cores), {m['memory_gb']:.0f} GB RAM, torch {m['torch']} on {s['device']}, "
        f"threads {m['threads']}, {_quiet(m)}",
        f"model: {s['model']} {s['dtype']}{_kv(s)}, adapter {report['info']['adapter']}",
        f"task: {s.get('e2e_task', 'gsm8k')}, the first {s['e2e']} problems of {s['e2e_file']}, chat prompt (as cold eval), "
        + (f"continuous batching of {s['e2e_batch_size']} (a problem joins as one finishes; groups of "
           f"{4 * s['e2e_batch_size']} problems per process)" if s.get("e2e_refill") else
           f"static batches of {s['e2e_batch_size']} (finished rows leave, no refill; at least 16 problems per process)")
        + f", EOS honoured, max {s['new_tokens']} new tokens, alpha={s['alpha']} beta={s['beta']}; decoders interleaved",
        "ms/token = wall time / tokens generated; amateur % = CoLD steps that needed the amateur (the plausibility "
        "mask left more than one token) / tokens generated",
    ]


def _paired_sentence(paired: dict) -> str:
    return (
        f"{paired.get('cold', 'cold')} vs expert: {paired['tokens_saved']} tokens fewer in all; expert ran to max tokens on "
        f"{paired['expert_hit_max']} problems, cold stopped on {paired['of_which_cold_stopped']} of them "
        f"({paired['tokens_saved_on_expert_runaways']} tokens saved there); cold ran to max where expert stopped on "
        f"{paired['cold_hit_max_where_expert_stopped']}; cold shorter on {paired['cold_shorter']}, longer on {paired['cold_longer']} problems"
    )


def print_e2e(report: dict, console: Console) -> None:
    for line in e2e_header_lines(report):
        console.print(f"[dim]{escape(line)}")
    table = Table(header_style="bold")
    for header, key, _ in E2E_COLUMNS:
        table.add_column(header, justify="left" if key == "decoder" else "right")
    for row in report["rows"]:
        table.add_row(*[_cell(row, key, fmt) for _, key, fmt in E2E_COLUMNS])
    console.print(table)
    if report.get("paired"):
        console.print(_paired_sentence(report["paired"]))
    print_targets(report, console)


def markdown_e2e(report: dict) -> str:
    lines = _markdown_table(report, e2e_header_lines(report), E2E_COLUMNS)
    if report.get("paired"):
        lines += ["", _paired_sentence(report["paired"]) + "."]
    return "\n".join(lines + markdown_targets(report)) + "\n"


def plot_e2e(report: dict, path) -> None:
    """Histogram of generated lengths per decoder (runaway generations pile up at max tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = report["rows"]
    top = report["settings"]["new_tokens"]
    bins = np.linspace(0, top, 33)
    for r in rows:
        left.hist(r["lengths"], bins=bins, alpha=0.5, label=f"{r['decoder']} ({r['hit_max_fraction']:.0%} hit max)")
    left.set_xlabel("generated tokens per problem")
    left.set_ylabel("problems")
    left.legend(fontsize=8)
    names = [f"{r['decoder']}\n{r['ms_per_token']:.1f} ms/token" + (f"\namateur {r['amateur_fraction']:.0%}"
             if r.get("amateur_fraction") is not None else "") for r in rows]
    right.bar(np.arange(len(rows)) - 0.2, [r["wall_s"] for r in rows], 0.4, label="wall s")
    twin = right.twinx()
    twin.bar(np.arange(len(rows)) + 0.2, [r["tokens"] for r in rows], 0.4, color="tab:orange", label="tokens")
    right.set_xticks(np.arange(len(rows)), names)
    right.set_ylabel("wall s")
    twin.set_ylabel("tokens generated")
    right.set_title("wall time (blue) and tokens generated (orange)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
