"""The text of a growing output, decoding a few tokens per new token instead of all of them.

Decoding every output token again at every step (for stop strings, or to stream text) costs time
that grows with the output: quadratic per request. vLLM's offsets avoid it: tokens before
`read_offset` are text already; `prefix_offset..read_offset` are decoded again only as context,
since a tokenizer renders a token differently after others (SentencePiece's leading space, the
bytes of one character split over byte-level tokens). The new text is decode(prefix_offset:n) less
decode(prefix_offset:read_offset); while it ends in U+FFFD (a character whose bytes have not all
arrived) nothing is emitted and the window grows.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalText:
    """`update(ids, n)` returns the text of `ids[:n]`; `ids` only grows (tokens are appended)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def update(self, token_ids: list[int], n: int) -> str:
        if n > self.read_offset:
            decode = self.tokenizer.decode
            prefix = decode(token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
            full = decode(token_ids[self.prefix_offset:n], skip_special_tokens=True)
            if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, n
        return self.text
