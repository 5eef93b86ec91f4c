"""When a sequence ends: at an end-of-sequence token, at a stop string, or after max_new_tokens."""

from __future__ import annotations

from collections.abc import Container

from cold.params import DecodeParams


def finish_reason(token: int, generated: int, params: DecodeParams, eos_ids: Container[int], stopped: bool) -> str | None:
    """"stop" (EOS unless ignored, or a stop string seen), "length" (`generated` reached max_new_tokens), else None."""
    if (token in eos_ids and not params.ignore_eos) or stopped:
        return "stop"
    if generated >= params.max_new_tokens:
        return "length"
    return None
