"""Incremental detokenization with stop strings.

Text is released only when it is final: not ending in an incomplete UTF-8 sequence (the byte-level BPE decodes a
split character as U+FFFD) and not possibly the start of a stop string. A stop string ends the request and is not
part of the text (OpenAI semantics).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, decode, stop: list[str]):
        self.decode = decode  # list[int] -> str
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Add one generated token. Returns (newly final text, whether a stop string was hit)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        self.text = text
        if self.stop:
            hits = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = text[:cut]
                delta = text[self.sent:cut] if cut > self.sent else ""
                self.sent = max(self.sent, cut)
                return delta, True
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:  # keep back a tail that may grow into a stop string
            for n in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, False

    def flush(self) -> str:
        """The text held back, released when the request ends for another reason than a stop string."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta
