"""What goes into and comes out of decoding: a checked request, a finished generation, a stream event."""

from __future__ import annotations

from dataclasses import dataclass

from cold.params import DecodeParams


@dataclass
class Request:
    """One prompt, tokenised, with validated parameters resolved against the loaded adapters."""

    prompt: str
    prompt_ids: list[int]
    params: DecodeParams
    expert_adapter: int = -1  # adapter stack index of the expert row (-1: the base model)
    amateur_adapter: int = -1  # of the amateur row (-1: the base model)


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the best (id, log p) at that step, best first (DecodeParams.logprobs of them)


@dataclass
class Generation:
    """The result for one prompt."""

    prompt: str
    text: str
    token_ids: list[int]  # generated ids only (an EOS that ended the text included)
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    amateur_steps: int | None = None  # CoLD: steps whose plausibility mask left more than one token (needed the amateur)
    logprobs: list[TokenLogprob] | None = None  # one per generated id, when DecodeParams.logprobs asks for them


@dataclass
class StreamEvent:
    """New output of one prompt after a decode step."""

    index: int  # which prompt of the call
    text: str  # text produced since the last event of this prompt
    token_ids: list[int]  # ids produced since the last event of this prompt
    finish_reason: str | None = None  # set on the prompt's last event
    amateur_steps: int | None = None  # on the last event of a CoLD prompt: steps that needed the amateur
    logprobs: list[TokenLogprob] | None = None  # one per id in token_ids, when DecodeParams.logprobs asks for them


@dataclass
class SequenceLogprobs:
    """How likely a decoder finds a token sequence (`Engine.logprobs`)."""

    token_ids: list[int]
    token_logprobs: list[float | None]  # [n]: log p(token i | the tokens before it); None for the first
    top_logprobs: list[list[tuple[int, float]]]  # [n + 1]: the best (id, log p) predicting token i ([] for
    #                                               the first), and last those for the token after the sequence
