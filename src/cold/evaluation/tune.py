"""`cold tune`: a grid of CoLD settings and LoRA scales on a tuning split, the best of each, a heat-map.

The grid is a list of ordinary decoder specs (`expert`, `expert@S`, `cold@A/B`, `cold-logprob@A/B`),
so its generations are `cold eval` records: resumable, and reusable by an eval run on the same
problems. Every setting is compared with `expert` (the adapter's own greedy decoding) on the same
problems (paired bootstrap). The best setting maximises headline accuracy; ties go to fewer
generated tokens, then to the smaller change from `expert` (smaller beta / scale).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cold.errors import ColdError
from cold.evaluation.decoders import DecoderSpec
from cold.evaluation.stats import N_BOOT, bootstrap_mean, discordant, paired_difference
from cold.params import BETA_SCHEDULES

SCORINGS = {"logit": "cold", "logprob": "cold-logprob"}


def parse_grid(text: str, name: str, low: float, high: float | None = None) -> list[float]:
    """'0.05,0.1,0.2' -> [0.05, 0.1, 0.2]; ColdError for anything outside [low, high] or repeated."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ColdError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ColdError(f"--{name} needs at least one value")
    bad = [v for v in values if v < low or (high is not None and v > high) or v != v]
    if bad:
        limit = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ColdError(f"--{name} values must be {limit}, got {bad}")
    if len(set(values)) != len(values):
        raise ColdError(f"--{name} repeats a value: {text!r}")
    return values


def parse_schedules(text: str) -> list[str]:
    """'constant,jsd' -> ['constant', 'jsd']; ColdError for an unknown, repeated or missing schedule."""
    schedules = [s.strip() for s in text.split(",") if s.strip()]
    if not schedules or any(s not in BETA_SCHEDULES for s in schedules) or len(set(schedules)) != len(schedules):
        raise ColdError(f"--schedules must be distinct values among {', '.join(BETA_SCHEDULES)}, got {text!r}")
    return schedules


def grid_specs(alphas: Sequence[float], betas: Sequence[float], scales: Sequence[float],
               scorings: Sequence[str], vs_amateur: bool = False, schedules: Sequence[str] = ("constant",)) -> list[DecoderSpec]:
    """`expert` first (the reference), then the scaled experts, then every CoLD setting, per score
    form and beta schedule (contrasted with the run's amateur adapter when `vs_amateur`)."""
    specs = [DecoderSpec("expert")]
    specs += [DecoderSpec("expert", expert_scale=s) for s in scales if s != 1]
    for scoring in scorings:
        for schedule in schedules:
            specs += [DecoderSpec(SCORINGS[scoring], alpha=a, beta=b, beta_schedule=schedule, vs_amateur=vs_amateur)
                      for a in alphas for b in betas]
    return specs


def family(spec: DecoderSpec) -> str:
    """The family a setting competes in for "best": expert, cold, cold-logprob, or a CoLD kind with a
    beta schedule (cold/entropy, cold/jsd)."""
    if spec.kind == "expert" or spec.beta_schedule == "constant":
        return spec.kind
    return f"{spec.kind}/{spec.beta_schedule}"


def summarize(results: dict[str, list[dict]], specs: Sequence[DecoderSpec], headline: str,
              n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Per setting: accuracy (CI), paired difference to expert (CI), mean tokens; the best of each kind."""
    by_label = {s.label: s for s in specs}
    reference = [r["correct"][headline] for r in results["expert"]]
    rows = []
    for label, records in results.items():
        spec = by_label[label]
        correct = [r["correct"][headline] for r in records]
        only_this, only_expert = discordant(correct, reference)
        rows.append({
            "decoder": label, "kind": family(spec), "alpha": spec.alpha if spec.kind != "expert" else None,
            "beta": spec.beta if spec.kind != "expert" else None, "scale": spec.expert_scale if spec.kind == "expert" else None,
            "n": len(records),
            "accuracy": bootstrap_mean(correct, n_boot, seed).as_dict(),
            "vs_expert": {**paired_difference(correct, reference, n_boot, seed).as_dict(), "only_this": only_this, "only_expert": only_expert},
            "mean_tokens": sum(r["tokens"] for r in records) / len(records),
            "hit_max_fraction": sum(r["hit_max"] for r in records) / len(records),
        })
    best = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):  # in grid order: expert first
        best[kind] = min((r for r in rows if r["kind"] == kind), key=_rank)["decoder"]
    return {"headline": headline, "settings": rows, "best": best}


def best_contrast(summary: dict) -> dict:
    """The best CoLD setting's row of a summary, whatever its score form or beta schedule."""
    return min((r for r in summary["settings"] if r["kind"] != "expert"), key=_rank)


def _rank(row: dict) -> tuple:
    change = row["beta"] if row["beta"] is not None else abs((row["scale"] or 1) - 1)
    return (-row["accuracy"]["value"], row["mean_tokens"], change)


def chosen_decoders(summary: dict) -> str:
    """The decoder list an eval on the test split should run: base, expert, the best scale and CoLD settings."""
    labels = ["base", "expert"]
    for kind, label in summary["best"].items():
        if label not in labels:
            labels.append(label)
    return ",".join(labels)


# ---- outputs ---------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["decoder", "n", f"accuracy ({summary['headline']})", "95% CI", "vs expert (points)", "95% CI (paired)",
              "mean tokens", "hit max", "best"]
    best = set(summary["best"].values())
    rows = []
    for r in summary["settings"]:
        acc, diff = r["accuracy"], r["vs_expert"]
        rows.append([
            r["decoder"], str(r["n"]), _pct(acc["value"]), f"[{_pct(acc['low'])}, {_pct(acc['high'])}]",
            "—" if r["decoder"] == "expert" else f"{100 * diff['value']:+.1f}",
            "—" if r["decoder"] == "expert" else f"[{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]",
            f"{r['mean_tokens']:.1f}", _pct(r["hit_max_fraction"]), "★" if r["decoder"] in best else "",
        ])
    return header, rows


def markdown(summary: dict, title: str, facts: Sequence[tuple[str, str]]) -> str:
    header, rows = table(summary)
    lines = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in facts] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Best (★): " + ", ".join(f"{kind}: `{label}`" for kind, label in summary["best"].items()),
              "", "![grid](heatmap.png)", ""]
    return "\n".join(lines)


def heatmap(summary: dict, path: Path, title: str) -> None:
    """One panel per scoring form (alpha rows x beta columns, accuracy colour, difference to expert written
    in each cell), and one panel of accuracy against the LoRA scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = summary["settings"]
    kinds = [k for k in dict.fromkeys(r["kind"] for r in rows) if k != "expert"]
    experts = sorted((r for r in rows if r["kind"] == "expert"), key=lambda r: r["scale"])
    accuracies = [100 * r["accuracy"]["value"] for r in rows]
    low, high = min(accuracies), max(accuracies)
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.6 * (len(kinds) + 1), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        cells = [r for r in rows if r["kind"] == kind]
        alphas = sorted({r["alpha"] for r in cells})
        betas = sorted({r["beta"] for r in cells})
        grid = np.full((len(alphas), len(betas)), np.nan)
        for r in cells:
            grid[alphas.index(r["alpha"]), betas.index(r["beta"])] = 100 * r["accuracy"]["value"]
        image = ax.imshow(grid, cmap="viridis", vmin=low, vmax=max(high, low + 1e-9), aspect="auto")
        for r in cells:
            i, j = alphas.index(r["alpha"]), betas.index(r["beta"])
            star = "★ " if r["decoder"] in summary["best"].values() else ""
            ax.text(j, i, f"{star}{100 * r['accuracy']['value']:.1f}\n({100 * r['vs_expert']['value']:+.1f})",
                    ha="center", va="center", fontsize="small", color="white" if grid[i, j] < (low + high) / 2 else "black")
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("beta")
        ax.set_ylabel("alpha")
        versus = " against the amateur adapter" if cells[0]["decoder"].endswith(":amateur") else ""
        ax.set_title(f"{kind}{versus}: accuracy % (vs expert, points)", fontsize="medium")
        fig.colorbar(image, ax=ax, shrink=0.8)
    ax = axes[0][-1]
    scales = [r["scale"] for r in experts]
    values = [100 * r["accuracy"]["value"] for r in experts]
    errors = [[v - 100 * r["accuracy"]["low"] for v, r in zip(values, experts)],
              [100 * r["accuracy"]["high"] - v for v, r in zip(values, experts)]]
    ax.errorbar(scales, values, yerr=errors, fmt="o-", capsize=3)
    ax.set_xlabel("LoRA scale (expert@S)")
    ax.set_ylabel("accuracy, % (95% CI)")
    ax.set_title("scaled expert", fontsize="medium")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(summary: dict, out: Path, title: str, facts: Sequence[tuple[str, str]]) -> list[Path]:
    (out / "tune.json").write_text(json.dumps({**dict(facts), **summary}, indent=2) + "\n", encoding="utf-8")
    (out / "tune.md").write_text(markdown(summary, title, facts), encoding="utf-8")
    heatmap(summary, out / "heatmap.png", title)
    return [out / "tune.json", out / "tune.md", out / "heatmap.png"]
