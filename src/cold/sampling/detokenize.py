"""Incremental detokenisation with stop strings, for one generated sequence."""

from __future__ import annotations


class TextTracker:
    """Follows one sequence's generated ids; hands out new text and finds stop strings.

    Text that might be the start of a stop string, or an incomplete UTF-8 character, is held
    back until it is known, so streamed text never contains a stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # final text once stopped, else everything decoded so far
        self.emitted = 0  # characters of text already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text. Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_position(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._emit(len(self.text))
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe = len(text.rstrip("\ufffd"))
        safe -= self._held_back(text[:safe])
        return self._emit(max(safe, self.emitted))

    def flush(self) -> str:
        """Everything not yet handed out (call when the sequence ends)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return delta

    def _stop_position(self, text: str) -> int | None:
        if not self.stop:
            return None
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest)
        hits = [pos for s in self.stop if (pos := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
