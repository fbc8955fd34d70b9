"""Completions ``echo`` and prompt scoring: lm-eval's loglikelihood path, in OpenAI's shape.

``echo: true`` puts the prompt in front of each choice's text. With ``logprobs: k`` too, the prompt
tokens come first in the choice's ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``), the first token's ``null`` (nothing precedes it), as vLLM and OpenAI's legacy
completions answer; ``max_tokens: 0`` then scores the prompt alone (one token is generated and
dropped: the request still ends with a decode step). lm-eval's ``local-completions`` sends
``echo``, ``logprobs: 1``, ``max_tokens: 1`` and sums the continuation's ``token_logprobs``.

Which model scores the prompt (``prompt_logprobs_mode``, an extension; engine side:
``engine/prompt_logprobs.py``):

- ``full`` (the default): every prompt token after the first is scored on the full model; under
  POP this request's prompt is not pruned (the decode worker runs it through every layer; the
  prefill worker has no LM head and keeps no hidden states to score with).
- ``pop`` with ``num_context_tokens: C``: the first C tokens are the context, prefilled as POP
  prefills a prompt (``x_1..x_{C-1}`` pruned on the prefill worker, ``x_C`` the boundary on the
  full model), the tokens after them teacher-forced through the full model over that cache: the
  paper's reading of a likelihood task. The context's tokens get ``null``.

The rule is ``scoring_params``, applied once at the edge; the renderer only shapes the numbers.
"""

from __future__ import annotations

from typing import Literal

from ...engine.sampling import SamplingParams
from ...limits import InvalidRequest, ModelLimits
from .protocol import updated_params

Mode = Literal["full", "pop"]


def scoring_params(req, params: SamplingParams, num_prompt_tokens: int, limits: ModelLimits) -> SamplingParams:
    """``params`` with the prompt scoring the completions request ``req`` asks for (unchanged without)."""
    is_scoring = req.echo and req.logprobs is not None
    if req.prompt_logprobs_mode is not None and not is_scoring:
        raise InvalidRequest("prompt_logprobs_mode", "needs echo: true and logprobs")
    if req.num_context_tokens is not None and req.prompt_logprobs_mode != "pop":
        raise InvalidRequest("num_context_tokens", 'only with prompt_logprobs_mode: "pop"')
    if req.prompt_logprobs_mode == "pop" and req.num_context_tokens is None:
        raise InvalidRequest("num_context_tokens", 'required with prompt_logprobs_mode: "pop"')
    if not is_scoring:
        return params
    update = {
        "prompt_logprobs": req.logprobs,
        "num_context_tokens": 1 if req.num_context_tokens is None else req.num_context_tokens,
    }
    scored = updated_params(params, "echo", **update)
    try:
        limits.check_scoring(num_prompt_tokens, scored)
    except InvalidRequest as exc:  # the engine's field names, as this API spells them
        name = "echo" if exc.field_name == "prompt_logprobs" else exc.field_name
        raise InvalidRequest(name, str(exc).split(": ", 1)[1]) from None
    return scored


def echo_logprobs(renderer, prompt_token_ids: list[int], scores: list | None) -> dict:
    """The prompt's part of a completions ``logprobs`` object (``None`` entries where unscored)."""
    tokens, offsets, values, tops = [], [], [], []
    for i, tok in enumerate(prompt_token_ids):
        s = renderer.token_string(tok)
        lp = scores[i] if scores is not None and i < len(scores) else None
        tokens.append(s)
        offsets.append(renderer.text_offset)
        renderer.text_offset += len(s)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {renderer.token_string(t): v for t, v in lp.top} | {s: lp.logprob})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def joined(first: dict, rest: dict | None) -> dict:
    """Two completions ``logprobs`` objects as one (the prompt's, then the generated tokens')."""
    if rest is None:
        return first
    return {key: first[key] + rest[key] for key in first}
