"""Summaries of an evaluation: numbers (summary.json), a terminal table, Markdown, a PNG plot.

Accuracy is reported under both extraction rules; one of them is the headline (the first
accuracy column, the paired differences and the plot's filled markers), and every output says
which. Intervals: 95% percentile bootstrap over problems; differences paired on the same problems.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cold.evaluation.stats import LEVEL, N_BOOT, bootstrap_mean, discordant, paired_difference
from cold.tasks.extract import RULES

BOOTSTRAP_SEED = 0

RULE_TEXT = {
    "number": {"strict": "first number after `####` or `The answer is`", "flexible": "last number in the output"},
    "yesno": {"strict": "`The answer is yes/no`", "flexible": "last yes/no in the output"},
    "choice": {"strict": "`The answer is (X)`", "flexible": "last (X) or standalone letter, else the choice text mentioned last"},
    "text": {"strict": "first word after `The answer is`", "flexible": "last word in the output"},
}


def summarize(results: dict[str, list[dict]], headline: str = "flexible", n_boot: int = N_BOOT,
              seed: int = BOOTSTRAP_SEED, info: dict | None = None) -> dict:
    """The numbers of every output: per decoder, and for each pair (later decoder minus earlier)."""
    labels = list(results)
    correct = {label: {rule: [r["correct"][rule] for r in records] for rule in RULES} for label, records in results.items()}
    decoders = []
    for label, records in results.items():
        n = len(records)
        seconds = sum(r["time_s"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        decoders.append({
            "decoder": label,
            "n": n,
            "accuracy": {rule: bootstrap_mean(correct[label][rule], n_boot, seed).as_dict() for rule in RULES},
            "answered": {rule: sum(r["answer"][rule] is not None for r in records) / n if n else float("nan") for rule in RULES},
            "mean_tokens": tokens / n if n else float("nan"),
            "hit_max_fraction": sum(r["hit_max"] for r in records) / n if n else float("nan"),
            "time_per_problem_s": seconds / n if n else float("nan"),
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
            "amateur_fraction": mean_amateur_fraction(records),
        })
    pairs = []
    for i, first in enumerate(labels):
        for second in labels[i + 1 :]:
            pair = {"a": second, "b": first}
            for rule in RULES:
                a, b = correct[second][rule], correct[first][rule]
                only_a, only_b = discordant(a, b)
                pair[rule] = {**paired_difference(a, b, n_boot, seed).as_dict(), "only_a": only_a, "only_b": only_b}
            pairs.append(pair)
    return {
        **(info or {}),
        "headline": headline,
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": LEVEL},
        "decoders": decoders,
        "pairs": pairs,
    }


def mean_amateur_fraction(records: Sequence[dict]) -> float | None:
    """The mean over problems of the fraction of a CoLD answer's steps that needed the amateur; None for
    other decoders (and for records of older runs, which lack the field)."""
    fractions = [r["amateur_fraction"] for r in records if r.get("amateur_fraction") is not None]
    return sum(fractions) / len(fractions) if fractions else None


# ---- text ------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def _ci(d: dict) -> str:
    return "n/a" if d["low"] != d["low"] else f"[{100 * d['low']:.1f}, {100 * d['high']:.1f}]"


def _points(d: dict) -> str:
    return "n/a" if d["value"] != d["value"] else f"{100 * d['value']:+.1f}"


def _ci_points(d: dict) -> str:
    return "n/a" if d["low"] != d["low"] else f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _has_amateur(summary: dict) -> bool:
    """Whether any decoder has an amateur fraction (a CoLD decoder whose records carry it)."""
    return any(d.get("amateur_fraction") is not None for d in summary["decoders"])


def decoder_rows(summary: dict, amateur: bool = False) -> tuple[list[str], list[list[str]]]:
    """The per-decoder table; with `amateur`, an `amateur steps` column when a CoLD decoder has a fraction
    ("-" for the others; the terminal, short of width, prints `amateur_line` instead)."""
    head, other = summary["headline"], _other(summary["headline"])
    amateur = amateur and _has_amateur(summary)
    header = [
        "decoder", "n", f"accuracy ({head}, headline)", "95% CI", f"accuracy ({other})", "95% CI",
        "mean tokens", "hit max tokens", "s / problem", *(["amateur steps"] if amateur else []),
    ]
    rows = [
        [
            d["decoder"], str(d["n"]), _pct(d["accuracy"][head]["value"]), _ci(d["accuracy"][head]),
            _pct(d["accuracy"][other]["value"]), _ci(d["accuracy"][other]), f"{d['mean_tokens']:.1f}",
            _pct(d["hit_max_fraction"]), f"{d['time_per_problem_s']:.2f}",
            *([_pct(d["amateur_fraction"]) if d.get("amateur_fraction") is not None else "-"] if amateur else []),
        ]
        for d in summary["decoders"]
    ]
    return header, rows


def pair_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    head = summary["headline"]
    header = ["comparison", f"difference ({head}, points)", "95% CI (paired)", "only first right", "only second right"]
    rows = [
        [f"{p['a']} − {p['b']}", _points(p[head]), _ci_points(p[head]), str(p[head]["only_a"]), str(p[head]["only_b"])]
        for p in summary["pairs"]
    ]
    return header, rows


def _other(rule: str) -> str:
    return next(r for r in RULES if r != rule)


def print_tables(summary: dict, console) -> None:
    """The summary tables on a rich console."""
    from rich.markup import escape
    from rich.table import Table

    header, rows = decoder_rows(summary)
    table = Table(title=escape(_title(summary)), title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*map(escape, row))
    console.print(table)
    if summary["pairs"]:
        header, rows = pair_rows(summary)
        table = Table(title="Paired differences on the same problems (bootstrap over problems)", title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)
    console.print(_rules_line(summary), markup=False)
    if _has_amateur(summary):
        console.print(amateur_line(summary), markup=False)


AMATEUR_TEXT = ("amateur steps: mean over problems of the share of a CoLD answer's steps whose plausibility mask left "
                "more than one token, the steps that needed the amateur's logits.")


def amateur_line(summary: dict) -> str:
    """The CoLD decoders' amateur fractions in one sentence (the terminal's stand-in for the column)."""
    shares = ", ".join(f"{d['decoder']} {_pct(d['amateur_fraction'])}" for d in summary["decoders"]
                       if d.get("amateur_fraction") is not None)
    return (f"Steps that needed the amateur (mean over problems of the share of a CoLD answer's steps whose plausibility "
            f"mask left more than one token): {shares}.")


def _title(summary: dict) -> str:
    task = summary.get("task", "?")
    split = f" ({summary['split']})" if summary.get("split") else ""
    n = summary["decoders"][0]["n"] if summary["decoders"] else 0
    return f"cold eval: {task}{split}, n = {n}, prompt {summary.get('prompt', '?')}, max {summary.get('max_new_tokens', '?')} new tokens"


def _rules_line(summary: dict) -> str:
    rules = RULE_TEXT.get(summary.get("answer_type", "number"), RULE_TEXT["number"])
    b = summary["bootstrap"]
    return (f"Headline: {summary['headline']} extraction. strict = {rules['strict']}; flexible = {rules['flexible']}. "
            f"Intervals: {100 * b['level']:.0f}% percentile bootstrap over problems ({b['resamples']} resamples, seed {b['seed']}).")


def markdown(summary: dict) -> str:
    lines = [f"# {_title(summary)}", ""]
    facts = [
        ("command", f"`{summary['command']}`" if summary.get("command") else None),
        ("data", summary.get("data")),
        ("problems", summary.get("selection")),
        ("model", summary.get("model")),
        ("adapter", summary.get("adapter")),
        ("prompt", summary.get("prompt")),
        ("max new tokens", summary.get("max_new_tokens")),
        ("device / dtype", f"{summary.get('device')} / {summary.get('dtype')}"
         + (f" (KV cache {summary['kv_dtype']})" if summary.get("kv_dtype") else "") if summary.get("device") else None),
        ("batch size", summary.get("batch_size")),
    ]
    lines += [f"- {name}: {value}" for name, value in facts if value is not None]
    lines += [f"- {_rules_line(summary)}", "- s / problem: wall time of a batch divided by its size (end to end: prefill and decoding)."]
    lines += [f"- {AMATEUR_TEXT}"] if _has_amateur(summary) else []
    lines += [""]
    lines += _md_table(*decoder_rows(summary, amateur=True))
    if summary["pairs"]:
        lines += ["", f"## Paired differences ({summary['headline']})", ""]
        lines += _md_table(*pair_rows(summary))
    lines += ["", "![accuracy, tokens and time per decoder](plot.png)", ""]
    return "\n".join(lines)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


# ---- files -----------------------------------------------------------------------------------


def write_outputs(summary: dict, out: Path) -> list[Path]:
    """summary.json, summary.md and plot.png in OUT; returns the paths written."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    plot(summary, out / "plot.png")
    return [out / "summary.json", out / "summary.md", out / "plot.png"]


def plot(summary: dict, path: Path) -> None:
    """Three panels per decoder: accuracy with 95% intervals, mean generated tokens, time per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decoders = summary["decoders"]
    labels = [d["decoder"] for d in decoders]
    y = list(range(len(labels)))
    head, other = summary["headline"], _other(summary["headline"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.2 + 0.5 * len(labels)), sharey=True)

    ax = axes[0]
    for rule, offset, style in ((head, -0.12, dict(fmt="o", color="C0")), (other, 0.12, dict(fmt="o", mfc="white", color="C7"))):
        acc = [100 * d["accuracy"][rule]["value"] for d in decoders]
        low = [100 * (d["accuracy"][rule]["value"] - d["accuracy"][rule]["low"]) for d in decoders]
        high = [100 * (d["accuracy"][rule]["high"] - d["accuracy"][rule]["value"]) for d in decoders]
        ax.errorbar(acc, [v + offset for v in y], xerr=[low, high], capsize=3, label=rule + (" (headline)" if rule == head else ""), **style)
    top = max([100 * d["accuracy"][r]["high"] for d in decoders for r in RULES if d["accuracy"][r]["high"] == d["accuracy"][r]["high"]] + [0])
    right = min(100, top + 5) if top < 95 else 100
    ax.set_xlim(-0.03 * right, right * 1.03)  # points at 0% or 100% stay visible
    ax.set_xlabel("accuracy, % (95% bootstrap CI)")
    ax.legend(loc="best", fontsize="small")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()

    ax = axes[1]
    tokens = [d["mean_tokens"] for d in decoders]
    ax.barh(y, tokens, color="C1")
    for v, t, d in zip(y, tokens, decoders):
        ax.annotate(f" {t:.0f} ({100 * d['hit_max_fraction']:.0f}% hit max)", (t, v), va="center", fontsize="small")
    ax.set_xlabel("mean generated tokens")
    ax.set_xlim(0, max(tokens + [1]) * 1.6)

    ax = axes[2]
    seconds = [d["time_per_problem_s"] for d in decoders]
    ax.barh(y, seconds, color="C2")
    ax.set_xlabel("seconds per problem (end to end)")

    fig.suptitle(_title(summary), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
