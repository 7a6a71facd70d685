"""Tokens to streamed text: incremental detokenization and stop strings.

Decoding token by token breaks multi-byte characters and merges (a token may only make sense with
the next one), so the whole answer is decoded each step and only the new, settled suffix is sent.
Text that could still turn into a stop string is held back until it cannot; a stop string ends the
answer and is not part of it (OpenAI's behaviour).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = 0  # characters of the answer already returned
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text this token settles (maybe empty). After a stop string, `stopped` is set."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                self.stopped = True
                return self._emit(text[:at])
        hold = max((len(s) - 1 for s in self.stops), default=0)
        settled = len(text)
        for size in range(min(hold, len(text)), 0, -1):  # a tail that may begin a stop string waits
            if any(s.startswith(text[-size:]) for s in self.stops):
                settled = len(text) - size
                break
        return self._emit(text[:settled])

    def finish(self) -> str:
        """Whatever was held back, once no more tokens will come."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _emit(self, text: str) -> str:
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new
