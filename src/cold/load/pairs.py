"""CoLD pairs: an expert adapter and the anti-expert tuned to be its amateur.

A pair is the anti-expert's PEFT adapter directory with `cold-pair.json` beside its weights, as
`cold anti-expert` writes it (two are shipped in `cold/demo_adapters`):

    {"schema": "cold-pair/1", "expert": "smollm2-coin_flip-step-50", "expert_sha1": "...",
     "base_model": "smollm2", "task": "coin_flip", "alpha": 0.3, "beta": 1.0, "scoring": "logit",
     "beta_schedule": "constant", "tuning": {...}}

`expert` is the expert's directory name (a shipped adapter's name) or its path; `expert_sha1` the
fingerprint of its adapter files (`cold.load.paths.fingerprint`), which is what identifies it.
The setting is what CoLD uses against this amateur unless the user sets its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cold.errors import ColdError
from cold.load.demo import DEMO_DIR
from cold.load.paths import fingerprint
from cold.params import DecodeParams

PAIR_FILE = "cold-pair.json"
PAIR_SCHEMA = "cold-pair/1"
SETTING_FIELDS = ("alpha", "beta", "scoring", "beta_schedule")  # the DecodeParams fields a pair sets


@dataclass(frozen=True)
class Pair:
    """An anti-expert (`amateur_dir`) and the CoLD setting tuned for it beside `expert`."""

    amateur_dir: Path
    expert: str  # the expert's directory name or path, as recorded
    expert_sha1: str | None
    base_model: str | None
    setting: dict  # alpha, beta, scoring, beta_schedule
    info: dict  # the whole pair file (task, tuning grid, test result, ...)

    def is_for(self, expert_dir: Path) -> bool:
        """Whether `expert_dir` is this pair's expert: the same adapter files (or, with no fingerprint
        recorded, the same directory name)."""
        if self.expert_sha1:
            return (Path(expert_dir) / "adapter_config.json").is_file() and fingerprint(expert_dir) == self.expert_sha1
        return Path(expert_dir).name == Path(self.expert).name


def read_pair(directory: str | Path) -> Pair | None:
    """The pair whose amateur is `directory` (None when it has no pair file); ColdError when the file is malformed."""
    path = Path(directory) / PAIR_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        setting = {"scoring": "logit", "beta_schedule": "constant", **{k: data[k] for k in SETTING_FIELDS if k in data}}
        DecodeParams(decoder="cold", **setting).validate()
        return Pair(Path(directory), str(data["expert"]), data.get("expert_sha1"), data.get("base_model"), setting, data)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, ColdError) as exc:
        raise ColdError(f"{path}: not a valid CoLD pair file ({exc})") from None


def write_pair(directory: Path, expert_dir: Path, base_model: str, setting: dict, **info) -> Pair:
    """Write `directory`/cold-pair.json naming `expert_dir` as the expert and `setting` as the tuned one."""
    data = {"schema": PAIR_SCHEMA, "expert": str(expert_dir), "expert_sha1": fingerprint(expert_dir),
            "base_model": base_model, **{k: setting[k] for k in SETTING_FIELDS}, **info}
    (Path(directory) / PAIR_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return read_pair(directory)


def shipped_pair(expert_dir: str | Path | None) -> Pair | None:
    """The shipped anti-expert tuned for `expert_dir`, when the expert is a shipped adapter that has one."""
    if expert_dir is None or Path(expert_dir).resolve().parent != DEMO_DIR:
        return None
    for candidate in sorted(DEMO_DIR.glob(f"*/{PAIR_FILE}")):
        pair = read_pair(candidate.parent)
        if pair is not None and pair.is_for(Path(expert_dir)):
            return pair
    return None


def check_base_model(pair: Pair, model: str) -> None:
    """ColdError when the pair was made on another base model than `model`."""
    if pair.base_model is not None and pair.base_model != model:
        raise ColdError(f"the anti-expert {pair.amateur_dir} was trained on base model {pair.base_model!r}, "
                        f"not {model!r}: give --model {pair.base_model}")
