"""Task accuracy: `cold eval` runs several decoders on the same problems and compares them.

    tasks.py     readers for the public task files (and any JSONL), one `Problem` per row
    prompts.py   zero-shot / few-shot / chat prompt templates
    extract.py   answer extraction, strict and flexible, and answer comparison
    decoders.py  decoder specs: base, expert, expert@SCALE, cold@ALPHA/BETA, ...
    stats.py     bootstrap intervals (single and paired), seeded
    runner.py    generation with resumable per-decoder JSONL records
    report.py    summary: terminal table, Markdown, JSON, PNG plot
    cli.py       the `cold eval` command

Nothing here imports torch at module level except through the engine the runner is given.
"""
