"""Token ids in, text out: the part of a completion that is final, with stop strings cut.

Decoding the whole id list each time keeps multi-byte characters whole (a byte-level BPE token can
end inside a character: the decoder then ends in U+FFFD until the next token completes it). Text
that could still become the start of a stop string is held back until it cannot."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextAssembler:
    def __init__(self, tok, stops=(), eos_id: int | None = None):
        self.tok, self.stops, self.eos_id = tok, tuple(s for s in stops if s), eos_id
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.finished = False  # a stop string or EOS ended the completion
        self.text: str | None = None  # the final text, once finished (or after finish())

    def push(self, t: int) -> str:
        """Add one generated token; returns the text that became final with it."""
        if self.finished:
            return ""
        self.ids.append(int(t))
        if self.eos_id is not None and t == self.eos_id:
            return self._end(self.tok.decode(self.ids))
        text = self.tok.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return self._end(text[:cut])
        end = len(text.rstrip(REPLACEMENT))
        hold = max((k for s in self.stops for k in range(1, min(len(s), end + 1))
                    if text.endswith(s[:k], 0, end)), default=0)  # may begin a stop string: wait
        safe = end - hold
        if safe <= len(self.sent):
            return ""
        delta = text[len(self.sent):safe]
        self.sent = text[:safe]
        return delta

    def _end(self, text: str) -> str:
        self.finished = True
        self.text = text
        delta = text[len(self.sent):]
        self.sent = text
        return delta

    def finish(self) -> str:
        """The completion ended (max_tokens or an abort): the rest of the text, as decoded."""
        if self.finished:
            return ""
        return self._end(self.tok.decode(self.ids))
