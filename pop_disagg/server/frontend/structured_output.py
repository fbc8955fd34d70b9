"""Structured output over HTTP: OpenAI's ``response_format`` and vLLM's extensions, to one spec.

Accepted (chat and completions), at most one per request:

- ``response_format``: ``{"type": "text"}`` (free text), ``{"type": "json_object"}`` (any JSON
  value), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``;
- vLLM's ``structured_outputs``: ``{"json": schema, "regex", "choice": [...], "grammar": EBNF,
  "json_object": true}`` (one key), and its older spellings ``guided_json``, ``guided_choice``,
  ``guided_regex``, ``guided_grammar``.

``spec_of`` is the rule from those fields to the engine's ``StructuredSpec``; ``EdgeCheck``
compiles the spec at the edge with the server's tokenizer (``engine.structured.Grammars``, the
same compile the decode worker's engine runs), so a bad schema, regex or grammar is a 400 naming
the field it came in, before any worker sees the request. JSON schemas are compiled for compact
JSON (no free whitespace between tokens: small models otherwise wander into endless whitespace).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ...engine.structured import GrammarError, Grammars, StructuredSpec
from ...limits import InvalidRequest


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "response"
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (one of its keys)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def _schema_text(schema: dict | str, field: str) -> str:
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except ValueError as exc:
            raise InvalidRequest(field, f"the schema is not JSON: {exc}") from None
        return schema
    return json.dumps(schema)


def spec_of(req) -> tuple[StructuredSpec, str] | None:
    """The request's structured-output spec and the field it came in; None for free text."""
    found: list[tuple[StructuredSpec, str]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append((StructuredSpec(kind="json_object"), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidRequest("response_format", 'type "json_schema" needs json_schema.schema')
        found.append((StructuredSpec(kind="json_schema", value=json.dumps(rf.json_schema.schema_)), "response_format"))
    so = req.structured_outputs
    if so is not None:
        keys = [k for k in ("json_", "regex", "choice", "grammar") if getattr(so, k) is not None]
        keys += ["json_object"] if so.json_object else []
        if len(keys) != 1:
            raise InvalidRequest("structured_outputs", "set exactly one of json, regex, choice, grammar, json_object")
        found.append((_spec("structured_outputs", keys[0].rstrip("_"), getattr(so, keys[0])), "structured_outputs"))
    for kind in ("json", "choice", "regex", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            found.append((_spec(f"guided_{kind}", kind, value), f"guided_{kind}"))
    if len(found) > 1:
        raise InvalidRequest(found[1][1], f"only one structured output per request (also {found[0][1]})")
    return found[0] if found else None


def _spec(field: str, kind: str, value) -> StructuredSpec:
    if kind == "json":
        return StructuredSpec(kind="json_schema", value=_schema_text(value, field))
    if kind == "json_object":
        return StructuredSpec(kind="json_object")
    if kind == "choice":
        return StructuredSpec(kind="choice", value=json.dumps(value))
    return StructuredSpec(kind=kind, value=value)


class EdgeCheck:
    """Compiles specs at the edge with the served tokenizer (the grammars built on first use)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._grammars: Grammars | None = None

    def __call__(self, spec: StructuredSpec, field: str) -> None:
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size)
        try:
            self._grammars.compile(spec)
        except GrammarError as exc:
            raise InvalidRequest(field, str(exc)) from None
