"""Task accuracy: several decoders on the same problems (`cold eval`), compared, and tuned (`cold tune`).

    decoders.py  decoder specs: base, expert, expert@SCALE, cold@ALPHA/BETA, ...
    runner.py    generation with resumable per-decoder JSONL records
    stats.py     bootstrap intervals (single and paired), seeded
    report.py    summary: terminal table, Markdown, JSON, PNG plot
    tune.py      a grid of CoLD settings and LoRA scales, the best of each, a heat-map

The problems, prompts and answer extraction come from `cold.tasks`; the command lines are in
`cold.cli`. Nothing here imports torch at module level except through the engine the runner is given.
"""
