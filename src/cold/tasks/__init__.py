"""Tasks: the problems CoLD is evaluated and trained on, how they are worded, and how answers are read.

    readers.py     task files (the public sets, or any JSONL) -> one `Problem` per row; splits, sampling
    generators.py  the generated coin-flip and last-letters splits, with worked answers
    prompts.py     zero-shot / few-shot / chat prompts, and the built-in few-shot exemplars
    extract.py     answer extraction, strict and flexible, and answer comparison

Used by `cold.evaluation` and `cold.training`; imports neither (nor torch).
"""
