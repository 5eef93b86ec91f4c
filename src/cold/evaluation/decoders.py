"""Decoder specs: which decoders `cold eval` compares, written as short strings.

    SPEC     := KIND [ "@" ARGS ] [ ":amateur" ] [ ":beam" N ]
    base                     the base model alone (no adapter), greedy
    expert                   the adapted model alone, greedy
    expert@S                 the adapted model with the LoRA scaled by S (expert@1 = expert)
    cold                     CoLD, logit form, alpha 0.1, beta 0.5 (O'Brien & Lewis defaults)
    cold@A/B                 CoLD, logit form:  (1+B) s_e - B s_a  on tokens with p_e >= A max p_e
    cold-logprob@A/B         CoLD, log-probability form (Li et al.): log p_e - B/(1+B) log p_a
    cold@A/B/SCHEDULE        beta B scaled at every step by a schedule's weight in [0, 1]: entropy
                             (the expert's entropy over log V) or jsd (the Jensen-Shannon divergence
                             of the expert's and the amateur's distributions over log 2)
    cold...:amateur          CoLD whose amateur is the run's --amateur-adapter (for example an earlier
                             snapshot of the same training) instead of the bare base model
    ...:beamN                beam search with N beams instead of greedy (N >= 2), on any of the above

Several specs are separated by commas: `base,expert,expert@1.5,cold@0.1/0.5,cold-logprob@0.1/0.5`.
Numbers are written back in canonical form (`cold@0.10/0.50` -> `cold@0.1/0.5`), which is the
decoder's label in tables and its record file's name; two specs with the same label are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cold.errors import ColdError
from cold.params import BETA_SCHEDULES, DecodeParams

KINDS = ("base", "expert", "cold", "cold-logprob")
SYNTAX = ("base | expert | expert@SCALE | cold | cold@ALPHA/BETA[/entropy|/jsd] | cold-logprob@ALPHA/BETA[/...], each optionally followed by "
          ":beamN; a cold spec may also end in :amateur (before :beamN) to contrast with --amateur-adapter")
DEFAULT_DECODERS = "base,expert,cold@0.1/0.5"

_SPEC_RE = re.compile(r"^(?P<kind>[a-z-]+)(?:@(?P<args>[^:]*))?(?P<amateur>:amateur)?(?::beam(?P<beams>[^:]*))?$")


@dataclass(frozen=True)
class DecoderSpec:
    """One decoder of a comparison, with the `Engine.generate` keyword arguments it stands for."""

    kind: str  # one of KINDS
    alpha: float = 0.1
    beta: float = 0.5
    beta_schedule: str = "constant"
    expert_scale: float = 1.0
    num_beams: int = 1
    vs_amateur: bool = False  # cold kinds: the amateur row is the run's amateur adapter, not the bare base

    def __post_init__(self) -> None:
        """ColdError for values out of the ranges every front-end shares (`DecodeParams.validate`)."""
        DecodeParams().with_(**{k: v for k, v in self.generate_kwargs().items() if k != "vs_amateur"}).validate()

    @property
    def label(self) -> str:
        if self.kind == "base":
            text = "base"
        elif self.kind == "expert":
            text = "expert" if self.expert_scale == 1 else f"expert@{_num(self.expert_scale)}"
        else:
            schedule = "" if self.beta_schedule == "constant" else f"/{self.beta_schedule}"
            text = f"{self.kind}@{_num(self.alpha)}/{_num(self.beta)}{schedule}" + (":amateur" if self.vs_amateur else "")
        return text + (f":beam{self.num_beams}" if self.num_beams > 1 else "")

    @property
    def filename(self) -> str:
        """Record file name: the label with `/` and `:` made safe for every file system."""
        return self.label.replace("/", "_").replace(":", "-") + ".jsonl"

    def generate_kwargs(self) -> dict:
        """Keyword arguments of `Engine.generate` (decoding parameters) for this decoder."""
        kwargs: dict = {"decoder": "cold" if self.kind.startswith("cold") else self.kind, "num_beams": self.num_beams}
        if self.kind == "expert":
            kwargs["expert_scale"] = self.expert_scale
        if self.kind.startswith("cold"):
            kwargs.update(alpha=self.alpha, beta=self.beta, scoring="logprob" if self.kind == "cold-logprob" else "logit")
            if self.beta_schedule != "constant":
                kwargs["beta_schedule"] = self.beta_schedule
        if self.vs_amateur:
            kwargs["vs_amateur"] = True  # the eval engine turns this into its amateur adapter and scale
        return kwargs

    @property
    def needs_adapter(self) -> bool:
        return self.kind != "base"


def parse_decoder(spec: str) -> DecoderSpec:
    """One spec string -> DecoderSpec; ColdError naming the spec and the expected syntax."""
    text = spec.strip()
    match = _SPEC_RE.match(text)
    if not match or match.group("kind") not in KINDS:
        raise ColdError(f"bad decoder spec {spec!r}: expected {SYNTAX}")
    kind, args, beams = match.group("kind"), match.group("args"), match.group("beams")
    fields: dict = {}
    if match.group("amateur"):
        if not kind.startswith("cold"):
            raise ColdError(f"bad decoder spec {spec!r}: ':amateur' applies to cold and cold-logprob only")
        fields["vs_amateur"] = True
    if beams is not None:
        if not beams.isdigit() or int(beams) < 2:
            raise ColdError(f"bad decoder spec {spec!r}: ':beamN' needs a whole number N >= 2")
        fields["num_beams"] = int(beams)
    if args is not None:
        if kind == "base":
            raise ColdError(f"bad decoder spec {spec!r}: 'base' takes no arguments")
        if kind == "expert":
            scale = _float(args, spec, "SCALE")
            fields["expert_scale"] = scale
        else:
            parts = args.split("/")
            if len(parts) not in (2, 3):
                raise ColdError(f"bad decoder spec {spec!r}: expected {kind}@ALPHA/BETA or {kind}@ALPHA/BETA/SCHEDULE, "
                                f"e.g. {kind}@0.1/0.5 or {kind}@0.1/4/jsd")
            if len(parts) == 3:
                if parts[2] not in BETA_SCHEDULES:
                    raise ColdError(f"bad decoder spec {spec!r}: the beta schedule must be one of {', '.join(BETA_SCHEDULES)}")
                fields["beta_schedule"] = parts.pop()
            alpha, beta = (_float(p, spec, name) for p, name in zip(parts, ("ALPHA", "BETA")))
            fields.update(alpha=alpha, beta=beta)
    try:
        return DecoderSpec(kind, **fields)
    except ColdError as exc:
        raise ColdError(f"bad decoder spec {spec!r}: {exc}") from None


def parse_decoders(specs: str) -> list[DecoderSpec]:
    """A comma-separated list of specs; refuses an empty list and duplicates."""
    parsed = [parse_decoder(s) for s in specs.split(",") if s.strip()]
    if not parsed:
        raise ColdError(f"--decoders is empty; expected a comma-separated list of {SYNTAX}")
    seen: set[str] = set()
    for d in parsed:
        if d.label in seen:
            raise ColdError(f"--decoders: {d.label!r} is given twice")
        seen.add(d.label)
    return parsed


def _float(text: str, spec: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ColdError(f"bad decoder spec {spec!r}: {name} must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ColdError(f"bad decoder spec {spec!r}: {name} must be a finite number, got {text!r}")
    return value


def _num(x: float) -> str:
    """Shortest exact form: 0.10 -> 0.1, 2.0 -> 2."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text
