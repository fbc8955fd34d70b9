"""Incremental detokenization: new text per token without re-decoding the whole output.

Byte-level tokenizers can split one character over several tokens; text is held back while the
tail decodes to the replacement character, and a small window of previous tokens is re-decoded so
that tokenizers that merge spaces across tokens stay right.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start used as context
        self.read_offset = 0  # tokens already turned into emitted text
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        new = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += new
        return new


def find_stop(text: str, stops: tuple[str, ...], new_len: int) -> int | None:
    """Index where the earliest stop string begins, searching only where new text could match."""
    best = None
    for s in stops:
        i = text.find(s, max(0, len(text) - new_len - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
