"""Prompt encoding: text (optionally in the model's chat template) or given token ids -> ids, and the
check that a prompt plus its new tokens fits the model's context."""

from __future__ import annotations

from collections.abc import Sequence

from cold.errors import ColdError

Prompt = str | Sequence[int]  # text, or already tokenised ids


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template applied to `messages`, ending with the assistant's turn (unless not `add_generation_prompt`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ColdError("this model's tokenizer has no chat template: give it plain text "
                        "(cold generate without --chat; cold eval / cold tune --prompt zero-shot or few-shot)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of text that already holds the chat template's special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = False) -> tuple[str, list[int]]:
    """(prompt text, token ids): token ids are taken as given; text gets the chat template when `chat`."""
    if not isinstance(prompt, str):
        ids = [int(t) for t in prompt]
        return tokenizer.decode(ids), ids
    if chat:
        return prompt, chat_ids(tokenizer, chat_text(tokenizer, [{"role": "user", "content": prompt}]))
    return prompt, tokenizer(prompt).input_ids


def check_fits(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """Refuse an empty prompt, or one whose new tokens would run past the model's context."""
    if prompt_tokens == 0:
        raise ColdError("a prompt is empty (no tokens)")
    if prompt_tokens + max_new_tokens > context:
        raise ColdError(
            f"prompt of {prompt_tokens} tokens plus max_new_tokens {max_new_tokens} "
            f"exceeds the model's context of {context} tokens"
        )
