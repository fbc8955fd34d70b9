"""The request rules: what a request may ask of the served model, written once.

``ModelLimits`` holds what the rules need to know about the model (vocabulary, context limit, the
served plan family's ratios). Every entry point applies the same checks: the gRPC and HTTP front
ends through ``server/frontend/protocol.py`` (at the edge, before any work), and ``LLMEngine`` for
library users who call it directly. A refusal is an ``InvalidRequest`` whose message starts with
the offending field (the front ends answer ``INVALID_ARGUMENT`` / HTTP 400 with it).

The rules (vLLM's): a prompt has at least one token, ids inside the vocabulary, and at most
``context_limit - 1`` tokens (room for one new token); ``1 <= max_new_tokens`` and
``prompt + max_new_tokens <= context_limit``; a ``prune_ratio`` names a plan of the served family;
token ids the sampling parameters name (``stop_token_ids``, ``logit_bias`` keys) are in the
vocabulary; a scoring request's context is inside its prompt. Ranges that need no model (temperature, penalties, ``min_tokens <= max_new_tokens``)
are ``SamplingParams``' own validators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class InvalidRequest(ValueError):
    """A request that will not run; ``str(exc)`` starts with the field it names."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the served model."""

    vocab_size: int
    context_limit: int
    prune_ratios: tuple[float, ...] = ()  # the served plan family, mildest first
    # Prompt scoring needs a plan without the ablation switches: with boundary handling off the
    # pruned pass samples the first token, with independent K/V off the decode steps mask a
    # prefix of N-1 positions; a scoring request's pruned context is shorter than both assume.
    can_score_prompt: bool = True

    def check_token_ids(self, field_name: str, ids) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(field_name, f"ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")

    def check_prompt(self, ids: list[int], field_name: str = "prompt_token_ids") -> None:
        if not ids:
            raise InvalidRequest("prompt", "empty prompt")
        self.check_token_ids(field_name, ids)
        if len(ids) >= self.context_limit:
            raise InvalidRequest(
                "prompt",
                f"{len(ids)} tokens exceeds the context limit of {self.context_limit} (room is needed for at least one new token)",
            )

    def check_max_new_tokens(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        if max_new_tokens <= 0:
            raise InvalidRequest("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        if num_prompt_tokens + max_new_tokens > self.context_limit:
            raise InvalidRequest(
                "max_new_tokens",
                f"{num_prompt_tokens} prompt + {max_new_tokens} new tokens exceeds the context limit of {self.context_limit}",
            )

    def check_params(self, params) -> None:
        """The token ids a ``SamplingParams`` names: stop token ids and ``logit_bias`` keys."""
        self.check_token_ids("stop_token_ids", params.stop_token_ids)
        self.check_token_ids("logit_bias", params.logit_bias)

    def check_scoring(self, num_prompt_tokens: int, params) -> None:
        """A request that scores its prompt (``prompt_logprobs``): served here, context inside the prompt."""
        if params.prompt_logprobs is None:
            return
        if not self.can_score_prompt:
            raise InvalidRequest(
                "prompt_logprobs",
                "prompt scoring is not served under an ablation plan (boundary handling or independent K/V off)",
            )
        if params.num_context_tokens > num_prompt_tokens:
            raise InvalidRequest(
                "num_context_tokens",
                f"{params.num_context_tokens} exceeds the prompt's {num_prompt_tokens} tokens",
            )

    def check(self, prompt_token_ids: list[int], params) -> None:
        """The whole request: prompt, length against the context, the token ids of its parameters,
        prompt scoring."""
        self.check_prompt(prompt_token_ids)
        self.check_max_new_tokens(len(prompt_token_ids), params.max_new_tokens)
        self.check_params(params)
        self.check_scoring(len(prompt_token_ids), params)

    def plan_index(self, prune_ratio: float | None) -> int | None:
        """The index in the served family of the plan ``prune_ratio`` names (None: the server picks)."""
        if prune_ratio is None:
            return None
        for i, served in enumerate(self.prune_ratios):
            if math.isfinite(prune_ratio) and abs(served - prune_ratio) <= 1e-4:
                return i
        allowed = ", ".join(f"{r:g}" for r in self.prune_ratios)
        raise InvalidRequest("prune_ratio", f"{prune_ratio:g} is not served; allowed: {allowed}")
