"""Token ids to text deltas, one token at a time, and stop strings that are never shown.

Decoding each token alone is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece (a token's leading space depends on its neighbours). ``IncrementalDecoder`` uses
the prefix/read-offset method of TGI and vLLM: decode a short window before the new tokens and
with them, emit the difference, and hold back while the text ends in an incomplete character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class _Decodes(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDecoder:
    def __init__(self, tokenizer: _Decodes) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: a few tokens before the unread ones, for context
        self._read = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""  # an incomplete UTF-8 character, or nothing visible yet
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back, at the end of the sequence."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]


class StopFilter:
    """Cut the text at the first stop string; hold back a tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        hold = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back tail, when the sequence ended without completing a stop string."""
        tail, self._pending = ("" if self.stopped else self._pending), ""
        return tail
