"""Generated tokens' logprobs in OpenAI's two response shapes.

The numbers are the engine's (``engine/sampling.py``): natural-log probabilities under the raw
logits of the step that produced the token, before penalties, ``logit_bias`` and temperature
(vLLM's default ``--logprobs-mode raw_logprobs``). Here they only get their token strings: each
token decoded on its own (``tokenizer.decode([id])``), as vLLM shows them, so a token that is half
of a UTF-8 character shows as U+FFFD while ``bytes`` (chat) is the decoded string's UTF-8.

- Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.
- Completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``;
  each ``top_logprobs`` dict also holds the sampled token (OpenAI: up to ``logprobs + 1`` entries),
  and ``text_offset`` counts characters from the start of the completion, across stream chunks.
"""

from __future__ import annotations


class LogprobsRenderer:
    """One request's logprobs, chunk after chunk (the completion offsets carry over)."""

    def __init__(self, tokenizer, is_chat: bool):
        self.tokenizer, self.is_chat = tokenizer, is_chat
        self.text_offset = 0
        self._strings: dict[int, str] = {}

    def token_string(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            s = self._strings[token_id] = self.tokenizer.decode([token_id])
        return s

    def _entry(self, token_id: int, logprob: float) -> dict:
        s = self.token_string(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    def render(self, logprobs: list) -> dict:
        """The ``logprobs`` object of one choice (or chunk) for its ``TokenLogprob``s."""
        if self.is_chat:
            return {
                "content": [
                    {**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(t, v) for t, v in lp.top]}
                    for lp in logprobs
                ]
            }
        tokens, offsets, tops = [], [], []
        for lp in logprobs:
            s = self.token_string(lp.token_id)
            tokens.append(s)
            offsets.append(self.text_offset)
            self.text_offset += len(s)
            tops.append({self.token_string(t): v for t, v in lp.top} | {s: lp.logprob})
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": tops,
            "text_offset": offsets,
        }
