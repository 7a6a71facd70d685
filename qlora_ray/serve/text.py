"""Tokens to streamed text: incremental detokenization and stop strings.

Decoding token by token breaks multi-byte characters and merges (a token may only make sense with
the next one). So, as TGI and vLLM do, each step decodes the tokens since a settled prefix twice,
with and without the new token, and the difference is the new text; it is kept back while it ends
in an incomplete character. Decoding never "cleans up" spaces (" ," to ","): a tokenizer that does
would rewrite text already sent, and the stream would no longer add up to the answer.

Text that could still turn into a stop string is held back until it cannot; the earliest stop
string in the text ends the answer and is not part of it (OpenAI's behaviour).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.hold = max((len(stop) - 1 for stop in self.stops), default=0)
        self.tokens: list[int] = []
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] decode to the text's settled tail
        self.read_offset = 0
        self.text = ""  # the answer decoded so far
        self.sent = 0  # characters of it already returned
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text this token settles (maybe empty). After a stop string, `stopped` is set."""
        self.tokens.append(token)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):  # part of a character, or of a merge
            return ""
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._release()

    def finish(self) -> str:
        """Whatever was held back, once no more tokens will come."""
        if self.stopped:
            return ""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        self.text += self._decode(self.tokens[self.prefix_offset:])[len(prefix):]
        self.read_offset = self.prefix_offset = len(self.tokens)
        new, self.sent = self.text[self.sent:], len(self.text)
        return new

    def _release(self) -> str:
        # No stop string starts before `sent`: text that may begin one is never sent.
        found = [at for stop in self.stops if (at := self.text.find(stop, self.sent)) != -1]
        if found:
            self.stopped = True
            return self._emit(min(found))
        settled = len(self.text)
        for size in range(min(self.hold, settled - self.sent), 0, -1):  # a tail that may begin a stop waits
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                settled -= size
                break
        return self._emit(settled)

    def _emit(self, end: int) -> str:
        new = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return new

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
