"""Log-probabilities in the OpenAI response shapes.

    completion_logprobs(ids, chosen, alternatives, tokenizer, offset)   # a completion choice's "logprobs"
    chat_logprobs(entries, tokenizer)                                    # a chat choice's "logprobs"

Each token is shown as its own decoded text (`tokenizer.decode([id])`), as the OpenAI API shows it;
a token that is part of a multi-byte character decodes to U+FFFD on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from cold.types import TokenLogprob


def completion_logprobs(ids: Sequence[int], chosen: Sequence[float | None],
                        alternatives: Sequence[Sequence[tuple[int, float]] | None], tokenizer, offset: int = 0) -> dict:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} for tokens `ids`: each one's
    log-probability (None for a prompt's first token) and its best (id, log p) alternatives
    (None where there are none), the token itself among them; offsets count from `offset`."""
    pieces = [tokenizer.decode([t]) for t in ids]
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    tops = [None if best is None else {**{tokenizer.decode([t]): lp for t, lp in best}, piece: lp_chosen}
            for piece, lp_chosen, best in zip(pieces, chosen, alternatives)]
    return {"tokens": pieces, "token_logprobs": list(chosen), "top_logprobs": tops, "text_offset": offsets}


def generated_completion_logprobs(entries: Sequence[TokenLogprob], tokenizer, offset: int = 0) -> dict:
    """`completion_logprobs` of generated tokens."""
    return completion_logprobs([e.token_id for e in entries], [e.logprob for e in entries], [e.top for e in entries],
                               tokenizer, offset)


def chat_logprobs(entries: Sequence[TokenLogprob], tokenizer) -> dict:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...], "refusal": None} for generated tokens."""
    def token(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**token(e.token_id, e.logprob), "top_logprobs": [token(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}
