"""Tokenised training examples: (question, answer) pairs as prompt + completion tokens with the
prompt masked out of the labels, and the seeded, right-padded batches the training loop draws.

Two prompt formats: `chat`, the tokenizer's chat template (user = question, assistant = answer
ending in ``<|im_end|>``), and `zero-shot`, `cold eval --prompt zero-shot`'s text prompt
``Question: ...\\nAnswer:`` then `` <answer><eos>``, for models without a chat template.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cold.errors import ColdError
from cold.tasks.prompts import plain_prompt

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"
PROMPT_FORMATS = ("auto", "chat", "zero-shot")  # zero-shot: `cold eval --prompt zero-shot`'s text prompt


@dataclass
class Example:
    """One tokenised training example: prompt tokens are masked out of the labels."""

    input_ids: list[int]
    labels: list[int]


def has_chat_format(tokenizer) -> bool:
    """Whether the tokenizer has a chat template that ends turns with SmolLM2's END_OF_TURN."""
    return bool(getattr(tokenizer, "chat_template", None)) and END_OF_TURN in tokenizer.get_vocab()


def resolve_prompt_format(tokenizer, requested: str, model_name: str) -> str:
    """`auto` -> chat where the tokenizer has the chat format, else zero-shot text."""
    if requested == "auto":
        return "chat" if has_chat_format(tokenizer) else "zero-shot"
    if requested == "chat" and not has_chat_format(tokenizer):
        raise ColdError(f"{model_name}: the chat format needs a chat template ending turns in {END_OF_TURN} "
                        "(SmolLM2's); this model's tokenizer has none: train with --prompt zero-shot")
    return requested


def prompt_ids(tokenizer, question: str, prompt_format: str = "chat") -> list[int]:
    """Chat-template tokens up to and including the assistant header, or the zero-shot text prompt
    tokenised as the engine tokenises it at inference (with the tokenizer's special tokens)."""
    if prompt_format == "zero-shot":
        return list(tokenizer(plain_prompt(question)).input_ids)
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def completion_ids(tokenizer, answer: str, prompt_format: str = "chat") -> list[int]:
    """The answer and its end: END_OF_TURN (chat), or ` answer` and the EOS token (zero-shot)."""
    if prompt_format == "zero-shot":
        return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, question: str, answer: str, max_length: int, prompt_format: str = "chat") -> Example | None:
    """Prompt + answer + its end; loss only on answer and end. None if too long."""
    prompt = prompt_ids(tokenizer, question, prompt_format)
    completion = completion_ids(tokenizer, answer, prompt_format)
    if len(prompt) + len(completion) > max_length:
        return None
    return Example(input_ids=prompt + completion, labels=[IGNORE_INDEX] * len(prompt) + completion)


def encode_dataset(tokenizer, pairs, max_length: int, prompt_format: str = "chat") -> tuple[list[Example], int]:
    """Tokenise every pair; return the examples that fit and how many were skipped."""
    examples = [encode_example(tokenizer, q, a, max_length, prompt_format) for q, a in pairs]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


class BatchStream:
    """Endless batches over the examples, reshuffled each epoch with a seeded RNG."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.epoch = 0

    def next_indices(self) -> list[int]:
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            batch.append(self.order.pop())
        return batch

    def next_batch(self, pad_id: int) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in self.next_indices()], pad_id)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in the batch."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
