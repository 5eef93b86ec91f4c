"""Decoding parameters, validated once, with errors that name the bad value."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from enum import Enum

from cold.errors import ColdError

DECODERS = ("cold", "expert", "base")  # the only list of decoders
SCORING_FORMS = ("logit", "logprob")  # the only list of CoLD score forms (cold.sampling.scoring)
# how beta varies step by step (cold.sampling.scoring.contrast_weights): not at all, with the expert's
# entropy, or with the Jensen-Shannon divergence of the expert's and the amateur's distributions
BETA_SCHEDULES = ("constant", "entropy", "jsd")
LOGPROB_SCORES = ("expert", "cold")  # whose log-probabilities are reported: the decoding model's own, or CoLD's
MAX_LOGPROBS = 20  # the most alternatives reported per token (the OpenAI API's limit)
MAX_BETA = 100.0  # a larger contrast only amplifies rounding (and overflows in sampling)
MAX_SCALE = 10.0  # LoRA scale multipliers beyond this give garbage, not a stronger adapter
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


class EngineName(str, Enum):
    """What executes the decoding: this package's engine, llama.cpp (cold.llamacpp), or CoLD pairs inside vLLM (cold.vllm)."""

    cold = "cold"
    llamacpp = "llamacpp"
    vllm = "vllm"


@dataclass(frozen=True)
class DecodeParams:
    """How to decode one prompt.

    decoder: "cold" (expert contrasted with amateur), "expert" (the adapted model alone) or
             "base" (the base model alone).
    adapter: adapter name for the expert; None picks the only loaded adapter.
    expert_scale: multiplies the adapter's LoRA scale on the expert row (1 = as trained).
    amateur_adapter / amateur_scale: the amateur row is the bare base model by default
             (amateur_scale 0); give a scale > 0 to use an adapter (default: the expert's) at
             that scale instead.
    alpha, beta, scoring: the CoLD plausibility threshold, contrast strength and score form
             ("logit" = (1+beta)s_e - beta s_a; "logprob" = Li et al. log p_e - beta/(1+beta) log p_a).
    beta_schedule: "constant" (beta at every step), "entropy" (beta times the expert's entropy over
             log V) or "jsd" (beta times the Jensen-Shannon divergence of the expert's and the
             amateur's next-token distributions over log 2); both weights lie in [0, 1].
    do_sample, temperature, top_k, top_p, seed: sampling from the score (greedy if do_sample is False).
    num_beams, length_penalty: beam search over log-softmax(score) when num_beams > 1.
    max_new_tokens, stop: stop after this many tokens, at EOS, or at any of the stop strings.
    ignore_eos: do not stop at EOS (benchmarks: every request runs max_new_tokens steps).
    logprobs, logprob_score: report each generated token's log-probability and the `logprobs` most
             likely alternatives (None: report nothing); "expert": the decoding model's own
             log-softmax, "cold": CoLD's (`cold.sampling.scoring.score_log_probs`). Either is taken
             before temperature, top-k and top-p.
    """

    decoder: str = "cold"
    adapter: str | None = None
    expert_scale: float = 1.0
    amateur_adapter: str | None = None
    amateur_scale: float = 0.0
    alpha: float = 0.1
    beta: float = 0.5
    scoring: str = "logit"
    beta_schedule: str = "constant"
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    logprob_score: str = "expert"

    def with_(self, **changes) -> "DecodeParams":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ColdError(f"unknown decoding parameter(s): {', '.join(sorted(unknown))}")
        if "stop" in changes:
            changes["stop"] = _stop_tuple(changes["stop"])
        return replace(self, **changes)

    def validate(self) -> "DecodeParams":
        """Raise ColdError naming the first out-of-range value; return self."""
        if self.decoder not in DECODERS:
            raise ColdError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.scoring not in SCORING_FORMS:
            raise ColdError(f"scoring must be one of {', '.join(SCORING_FORMS)}, got {self.scoring!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ColdError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        _check(_finite(self.alpha) and 0 < self.alpha <= 1, f"alpha must be in (0, 1], got {self.alpha}")
        _check(_finite(self.beta) and 0 <= self.beta <= MAX_BETA, f"beta must be in [0, {MAX_BETA:g}], got {self.beta}")
        for name in ("expert_scale", "amateur_scale"):
            value = getattr(self, name)
            _check(_finite(value) and abs(value) <= MAX_SCALE, f"{name} must be in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {value}")
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(isinstance(self.num_beams, int) and self.num_beams >= 1, f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        _check(_finite(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty}")
        # checked with or without sampling: a bad value is refused, not silently ignored
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        if self.do_sample:
            _check(_finite(self.temperature) and self.temperature > 0,
                   f"temperature must be > 0 when sampling, got {self.temperature}")
            _check(self.num_beams == 1, "beam search (num_beams > 1) cannot be combined with sampling")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED),
               f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        _check(isinstance(self.ignore_eos, bool), f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (or None), got {self.logprobs!r}")
        if self.logprob_score not in LOGPROB_SCORES:
            raise ColdError(f"logprob_score must be one of {', '.join(LOGPROB_SCORES)}, got {self.logprob_score!r}")
        _check(self.logprobs is None or self.num_beams == 1, "logprobs cannot be combined with beam search (num_beams > 1)")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", f"stop strings must be non-empty strings, got {s!r}")
        return self

    @property
    def contrastive(self) -> bool:
        return self.decoder == "cold"


def amateur_fields(adapter: str | None, scale: float | None) -> dict:
    """The amateur row's DecodeParams fields from a user's amateur adapter and scale (either may be
    missing): a named adapter runs at scale 1 unless told; a scale alone applies to the expert's own
    adapter; neither leaves the bare base model (scale 0)."""
    return {"amateur_adapter": adapter, "amateur_scale": scale if scale is not None else (1.0 if adapter else 0.0)}


def _stop_tuple(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ColdError(message)
