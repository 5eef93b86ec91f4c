"""Incremental detokenisation with stop strings, for one generated sequence.

Each new token costs a decode of a short window of ids, not of the whole sequence: the window
starts at the ids that produced the previous piece of text (their decoding gives the context a
tokenizer needs, e.g. a SentencePiece word-start space) and grows only while a token ends inside
a multi-byte character. The concatenated pieces equal `tokenizer.decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a partial UTF-8 character to


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
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._context = 0  # ids[_context:_decoded] decode to the end of `text`: the next window's start
        self._decoded = 0  # ids before this index are in `text`

    def fork(self) -> "TextTracker":
        """An independent copy (a beam that branches off this one)."""
        other = object.__new__(TextTracker)
        other.__dict__.update(self.__dict__)
        other.ids = list(self.ids)
        return other

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text. Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        if self.stopped:  # the text ended at the stop string
            return ""
        searched_from = max(0, self.emitted - self._longest_stop)
        self._decode_pending(final=False)
        cut = self._stop_position(searched_from)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        safe = len(self.text) - self._held_back(self.text)
        return self._emit(max(safe, self.emitted))

    def flush(self) -> str:
        """Everything not yet handed out (call when the sequence ends), a trailing partial character included."""
        if not self.stopped:
            self._decode_pending(final=True)
        return self._emit(len(self.text))

    def _decode_pending(self, final: bool) -> None:
        """Append the text of the ids not yet decoded, unless it ends inside a character (and not `final`)."""
        if self._decoded == len(self.ids):
            return
        decode = self.tokenizer.decode
        known = decode(self.ids[self._context : self._decoded], skip_special_tokens=True)
        window = decode(self.ids[self._context :], skip_special_tokens=True)
        if len(window) <= len(known) and not final:
            return  # nothing new yet (a special token, or bytes that start a character)
        if window.endswith(INCOMPLETE) and not final:
            return
        self.text += window[len(known) :]
        self._context, self._decoded = self._decoded, len(self.ids)

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return delta

    def _stop_position(self, start: int) -> int | None:
        hits = [pos for s in self.stop if (pos := self.text.find(s, start)) >= 0]
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
