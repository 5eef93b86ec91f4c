"""Answer extraction from a completion, strict and flexible, and answer comparison.

Conventions of `../shared/data/README.md` (those of lm-evaluation-harness `gsm8k`):

- numbers are compared after removing `,` and `$` and a trailing `.`; `18.0` equals `18`;
- strict: the first number after `#### ` or after `The answer is` (the announced answer);
- flexible: the last number anywhere in the completion.

The same two rules for the other answer types:

| type   | strict (first announced answer)          | flexible (fallback on anything)                     |
|--------|------------------------------------------|-----------------------------------------------------|
| number | `#### N` or `The answer is N`            | last number                                         |
| yesno  | `The answer is yes/no`                   | last word `yes` / `no`                              |
| choice | `The answer is (B)` / `The answer is B`  | last `(B)` / standalone capital `B`; else the choice text mentioned last |
| text   | `The answer is WORD` (one word)          | last word                                           |

Every extracted answer is normalised (numbers canonical, words lower-case), so correctness is
plain string equality with the normalised gold answer. None means nothing was found.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

ANSWER_TYPES = ("number", "yesno", "choice", "text")
RULES = ("strict", "flexible")

# A number as written in text: optional sign and $, thousands groups or plain digits, decimals.
# "1,2,3" is three numbers (commas only group thousands); "7." ends before the period; the "-"
# of "16-4" or "x - 4" is a minus, not a sign.
_NUMBER = r"(?:(?<![\w)])-)?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANNOUNCE = r"(?:####|\b(?i:the (?:final )?answer is)\b)"
_AFTER = r"[\s:*\"'`]*"  # what may sit between the announcement and the answer ("is: **18**")

_NUMBER_RE = re.compile(_NUMBER)
_STRICT_NUMBER_RE = re.compile(_ANNOUNCE + _AFTER + r"(" + _NUMBER + r")", re.IGNORECASE)
_STRICT_YESNO_RE = re.compile(_ANNOUNCE + _AFTER + r"\(?(yes|no)\b", re.IGNORECASE)
_YESNO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_STRICT_CHOICE_RE = re.compile(_ANNOUNCE + _AFTER + r"(?:\(([A-Za-z])\)|([A-Z])\b)")  # a bare letter: capital
_PAREN_CHOICE_RE = re.compile(r"\(([A-Z])\)")
_BARE_CHOICE_RE = re.compile(r"\b([A-Z])\b")
_STRICT_WORD_RE = re.compile(_ANNOUNCE + _AFTER + r"([A-Za-z]+)", re.IGNORECASE)
_WORD_RE = re.compile(r"[A-Za-z]+")


def normalize_number(text: str | float | int) -> str | None:
    """Canonical form of a number: `$1,234.00` -> `1234`, `18.0` -> `18`, `-0.50` -> `-0.5`.

    None when `text` is not a number.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        text = repr(text)
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_text(text: str) -> str:
    """Lower case, surrounding quotes, punctuation and whitespace removed."""
    return text.strip().strip(".,;:!?\"'`*()[]").strip().lower()


def normalize_gold(value, answer_type: str, labels: Sequence[str] = ()) -> str | None:
    """The gold answer in the normalised form the extractors produce (None if unusable)."""
    if answer_type == "number":
        if isinstance(value, str) and "####" in value:
            value = value.rsplit("####", 1)[1]
        return normalize_number(value) if isinstance(value, (str, int, float)) else None
    if not isinstance(value, str):
        return None
    if answer_type == "yesno":
        word = normalize_text(value)
        return word if word in ("yes", "no") else None
    if answer_type == "choice":
        letter = normalize_text(value).upper()
        return letter if letter and (letter in labels if labels else len(letter) == 1) else None
    return normalize_text(value) or None


def extract(text: str, answer_type: str, rule: str, choices: Sequence[tuple[str, str]] = ()) -> str | None:
    """The answer of `text` under `rule` ("strict" or "flexible"), normalised; None if none found."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    strict = rule == "strict"
    if answer_type == "number":
        if strict:
            match = _STRICT_NUMBER_RE.search(text)
            return normalize_number(match.group(1)) if match else None
        numbers = _NUMBER_RE.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
    if answer_type == "yesno":
        return _word_answer(text, strict, _STRICT_YESNO_RE, _YESNO_RE)
    if answer_type == "choice":
        return _extract_choice(text, strict, choices)
    if answer_type == "text":
        return _word_answer(text, strict, _STRICT_WORD_RE, _WORD_RE)
    raise ValueError(f"answer type must be one of {ANSWER_TYPES}, got {answer_type!r}")


def _extract_choice(text: str, strict: bool, choices: Sequence[tuple[str, str]]) -> str | None:
    labels = {label.upper() for label, _ in choices} or set("ABCDE")
    if strict:
        for match in _STRICT_CHOICE_RE.finditer(text):
            letter = (match.group(1) or match.group(2)).upper()
            if letter in labels:
                return letter
        return None
    found = [m for m in _PAREN_CHOICE_RE.finditer(text) if m.group(1) in labels]
    if not found:  # a bare capital letter; "A" followed by a lower-case word is the article
        found = [
            m for m in _BARE_CHOICE_RE.finditer(text)
            if m.group(1) in labels and not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():]))
        ]
    if found:
        return found[-1].group(1)
    lowered = text.lower()  # no letter at all: the choice whose text is mentioned last
    best, best_at = None, -1
    for label, choice in choices:
        at = lowered.rfind(choice.lower()) if choice else -1
        if at > best_at:
            best, best_at = label.upper(), at
    return best


def is_correct(answer: str | None, gold: str | None) -> bool:
    """Both normalised: correct when an answer was found and equals the gold answer."""
    return answer is not None and gold is not None and answer == gold


def _word_answer(text: str, strict: bool, strict_re, loose_re) -> str | None:
    """Strict: the word the strict pattern marks; flexible: the last matching word. Lower-cased."""
    if strict:
        match = strict_re.search(text)
        return match.group(1).lower() if match else None
    words = loose_re.findall(text)
    return words[-1].lower() if words else None
