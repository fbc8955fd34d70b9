"""Structured output: a grammar masks the logits of every sampled step (xgrammar, as vLLM uses it).

A request's ``SamplingParams.structured`` (a ``StructuredSpec``) names what its text must be: any
JSON value (``json_object``), JSON valid under a schema (``json_schema``), one of a list of strings
(``choice``), a regular expression or an EBNF grammar. ``Grammars`` compiles a spec for one
tokenizer (xgrammar keeps compiled grammars in its cache) and gives each request its own
``GrammarMatcher``, which lives on the request (``Request.grammar``) and follows its tokens.

In the sampler (``sampling.sample_requests``), after the logits processors and before sampling,
``mask_logits`` sets every token the grammar forbids to ``-inf`` in the rows that have a matcher
(one token bitmask for those rows, filled by xgrammar per matcher, applied in one call); greedy and
sampled decoding then only ever pick an allowed token, so the text parses whatever the sampling
options. ``accept_tokens`` advances the matchers. When the grammar is complete only the stop
tokens (the engine's EOS ids) are allowed, so the request ends with ``finish_reason`` "stop". A
request that runs out of ``max_tokens`` first is cut, as in vLLM. Logprobs stay raw (before the
mask, as before every logits processor). A step without grammars costs one attribute test per row.

The same ``Grammars.compile`` is the request rule: the HTTP front end calls it at the edge (a bad
schema is a 400 naming its field), the engine again when the request arrives (cached).
"""

from __future__ import annotations

import json
import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

Kind = Literal["json_object", "json_schema", "choice", "regex", "grammar"]


class StructuredSpec(BaseModel):
    """What a request's text must be. ``value``: the JSON schema (JSON text), the choices (a JSON
    list of strings), the regular expression or the EBNF grammar; empty for ``json_object``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Kind
    value: str = ""


class GrammarError(ValueError):
    """A spec the grammar library cannot compile (its message, without the library's location)."""


def _clean(exc: Exception) -> str:
    # xgrammar prefixes messages with "[hh:mm:ss] /path/file.cc:line: "
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly the given strings (JSON string literals are EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiled grammars and matchers for one tokenizer and vocabulary (the model's logits width)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int] | None = None):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size

    def compile(self, spec: StructuredSpec):
        """The compiled grammar of ``spec``; ``GrammarError`` when it is not one."""
        c = self._compiler
        try:
            if spec.kind == "json_object":
                return c.compile_builtin_json_grammar()
            if spec.kind == "json_schema":
                return c.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "choice":
                choices = json.loads(spec.value)
                if not choices or not all(isinstance(x, str) and x for x in choices):
                    raise GrammarError("choices must be a non-empty list of non-empty strings")
                return c.compile_grammar(choice_grammar(choices))
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            return c.compile_grammar(spec.value)
        except GrammarError:
            raise
        except Exception as exc:  # the library raises RuntimeError (and ValueError for bad JSON)
            raise GrammarError(_clean(exc)) from None

    def matcher(self, spec: StructuredSpec):
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))


def mask_logits(logits: torch.Tensor, reqs: list) -> torch.Tensor:
    """(B, V) logits with what each row's grammar forbids at ``-inf`` (rows without one unchanged)."""
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[-1])  # (S, ceil(V / 32)) int32
    for s, i in enumerate(rows):
        reqs[i].grammar.fill_next_token_bitmask(bitmask, s)
    sel = torch.tensor(rows, device=logits.device)
    x = logits.index_select(0, sel).float()  # (S, V)
    xgr.apply_token_bitmask_inplace(x, bitmask.to(x.device))
    return logits.index_copy(0, sel, x.to(logits.dtype))


def accept_tokens(reqs: list, tokens: list[int]) -> None:
    """Advance each matcher by its request's sampled token (always one its mask allowed)."""
    for r, t in zip(reqs, tokens):
        if r.grammar is not None and not r.grammar.is_terminated():
            if not r.grammar.accept_token(t):
                raise RuntimeError(f"request {r.request_id}: token {t} was sampled against its grammar")
