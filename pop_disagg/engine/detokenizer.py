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


class OutputText:
    """One request's output text as its tokens arrive: the one place stop strings are applied.

    Incremental detokenization; the earliest stop string ends the text where it begins (the stop
    string is not part of it); and until the request finishes, ``take`` holds back a tail that could
    still turn out to be the start of a stop string, so streamed text never includes what the final
    text cuts. The engine (library use) and the server's router (the workers get no stop strings)
    both use it.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), skip_special_tokens: bool = True, min_tokens: int = 0):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stops = tuple(stops)
        self.min_tokens = min_tokens  # no stop string ends the output before this many tokens (vLLM)
        self._hold = max(map(len, self.stops), default=1) - 1
        self.cut: int | None = None  # where the stop string begins, once one matched
        self.emitted = 0  # characters already handed out by take()

    @classmethod
    def for_params(cls, tokenizer, params) -> OutputText:
        """The output text a request's ``SamplingParams`` ask for (stop strings, special tokens, min_tokens)."""
        return cls(tokenizer, params.stop, params.skip_special_tokens, params.min_tokens)

    @property
    def is_stopped(self) -> bool:
        return self.cut is not None

    @property
    def text(self) -> str:
        """The text so far, ending before the stop string once one matched."""
        return self.detok.text if self.cut is None else self.detok.text[: self.cut]

    def add(self, token_id: int) -> bool:
        """Append one token; True when it completes a stop string (the output ends here)."""
        new_text = self.detok.add(token_id)
        if self.stops and new_text and self.cut is None and len(self.detok.ids) >= self.min_tokens:
            self.cut = find_stop(self.detok.text, self.stops, len(new_text))
        return self.cut is not None

    def take(self, is_finished: bool) -> str:
        """The text not handed out yet; while unfinished, less what a stop string could still claim."""
        visible = self.text
        if not is_finished and self.cut is None and self.stops:
            visible = visible[: max(self.emitted, len(visible) - self._hold)]
        new = visible[self.emitted :]
        self.emitted = len(visible)
        return new
