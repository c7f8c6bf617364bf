"""IncrementalDetokenizer: an answer's text, token by token, without re-decoding the whole answer
and without ever sending half a character.

A token may end inside a multi-byte character (an emoji, an umlaut, CJK): decoded alone, its tail is
U+FFFD. Each step decodes only a short window of recent tokens (from `prefix` on) and emits what the
window adds beyond its already-emitted part (`prefix:read`), holding the text back while it ends in
U+FFFD, as vLLM's incremental detokenizer does; `finish` decodes what is held back once the answer
ends. Invariant: the concatenation of every piece returned equals `tokenizer.decode(ids)`, except
that U+FFFD of a sequence cut mid-character by the end of the answer appears only in `finish`.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: a few tokens of context so spacing decodes as in the whole
        self.read = 0  # tokens whose text has been returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; returns the text that became certain (may be empty)."""
        self.ids.append(token)
        done = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(done) or text.endswith(REPLACEMENT) or not text.startswith(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]

    def finish(self) -> str:
        """The text still held back (a character cut by the end of the answer comes out as U+FFFD)."""
        done = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :] if text.startswith(done) else ""
