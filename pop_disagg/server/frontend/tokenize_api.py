"""``POST /tokenize``, ``POST /detokenize`` and ``GET /version``, in vLLM's request/response shapes.

Clients use them to count tokens before sending (prompt budgeting, lm-eval, LangChain's vLLM
wrapper) with the server's own tokenizer and chat template:

- ``/tokenize`` takes ``prompt`` (``add_special_tokens`` default true) or chat ``messages``
  (``add_generation_prompt`` default true; ``add_special_tokens`` default false, the template
  already holds them), and answers ``{"count", "max_model_len", "tokens"}`` (plus ``token_strs``
  with ``return_token_strs``). The ids are what a completion or chat request with the same input
  would be given (chat renders through ``chat.render_chat``).
- ``/detokenize`` takes ``tokens`` (ids inside the vocabulary) and answers ``{"prompt"}``.
- ``/version``: ``{"version"}``, the installed pop-disagg's.

``model`` is optional (vLLM's); when given it must be the served name. Refusals are OpenAI error
objects, through the app's handlers (``http_api.create_app``).
"""

from __future__ import annotations

from importlib import metadata

from pydantic import BaseModel, ConfigDict, Field

from .chat import ChatMessage, render_chat


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def version() -> str:
    try:
        return metadata.version("pop-disagg")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def add_routes(app, tokenizer, limits, check_model) -> None:
    """Register the three routes on ``app``; ``check_model(name)`` raises for a name not served."""

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest):
        if body.model is not None:
            check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            ids = render_chat(tokenizer, body.messages, body.add_generation_prompt)
            if body.add_special_tokens:  # as vLLM: the tokenizer's own specials around the rendered text
                ids = tokenizer.build_inputs_with_special_tokens(ids)
        else:
            ids = list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        out = {"count": len(ids), "max_model_len": limits.context_limit, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        limits.check_token_ids("tokens", body.tokens)
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/version")
    async def get_version():
        return {"version": version()}
