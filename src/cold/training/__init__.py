"""LoRA training: fine-tune a base model's adapter with PEFT and a plain PyTorch loop (`cold train`).

    data.py      a task's train file -> (question, answer) pairs; each task's default file
    encoding.py  pairs -> tokenised examples (prompt masked out of the labels) and padded batches
    recipe.py    the fixed recipe: LoRA via PEFT, loss on labelled tokens, warm-up/decay schedule
    trainer.py   `train_lora`: the seeded loop, saving the adapter (and snapshots) in `save_dtype`
    card.py      the model card, the loss plot and the reproduce command written beside the adapter
    __main__.py  `python -m cold.training`, the command line of the model cards' Reproduce sections

Imports point one way: data and encoding use `cold.tasks`; recipe uses encoding; card uses data,
encoding and recipe; trainer uses all of them and `cold.load`.
"""
