"""Request fields the OpenAI HTTP API does not model, and what happens to each.

Clients (the ``openai`` SDK, LangChain, lm-eval, guidellm, vLLM's own bench) send fields beyond
what a server implements. vLLM's policy, which we follow: a field the server does not act on is
accepted with a logged warning, not a 400, because ignoring it leaves the answer what it would
have been without it. The exception is a field known to change the output (OpenAI's, vLLM's or
SGLang's meaning of it) that we do not implement: answering would answer a question the client did
not ask, so it is a 400 naming it (``REFUSED``), except at the value that means "off" (``NEUTRAL``).

- ``IGNORED``: known fields that cannot change the tokens or text returned; warned about.
- ``REFUSED``: known output-changing fields we do not implement; 400 unless neutral.
- anything else: an unknown extension; accepted with the same warning (a misspelt option shows up
  in the log under its own name, as in vLLM's "fields were present in the request but ignored").

Warnings are logged once per field name per process, for at most ``MAX_WARNED_NAMES`` names (a
client sending ever new names cannot grow the set without bound).
"""

from __future__ import annotations

import logging

from ...limits import InvalidRequest

log = logging.getLogger("pop_disagg.serve")

MAX_WARNED_NAMES = 256

# name -> why ignoring it changes nothing in the tokens or text returned
IGNORED: dict[str, str] = {
    "user": "an end-user id for abuse tracking",
    "safety_identifier": "an end-user id for abuse tracking",
    "metadata": "stored-completion tags",
    "store": "OpenAI's stored completions",
    "service_tier": "OpenAI's capacity tiers",
    "prompt_cache_key": "OpenAI's prompt-cache routing hint",
    "cache_salt": "vLLM's prefix-cache isolation; cache hits never change the tokens",
    "kv_transfer_params": "vLLM's disaggregation hand-off; this server routes its own K/V",
    "parallel_tool_calls": "only meaningful with tools, which are refused",
    "spaces_between_special_tokens": "a slow-tokenizer option; fast tokenizers' decode ignores it",
    "priority": "vLLM's priority scheduling; requests are served first come, first served",
    "request_id": "the server assigns its own ids",
    "guided_decoding_backend": "the grammar library is the server's choice",
}

# name -> why it is refused (it would change the output and is not implemented)
REFUSED: dict[str, str] = {
    "suffix": "insertion (suffix) is not supported",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "guided_whitespace_pattern": "JSON is generated compact; a whitespace pattern is not supported",
    "structural_tag": "structural tags (tool-call grammars) are not supported",
    "include_stop_str_in_output": "the stop string is always cut from the text",
    "prompt_logprobs": "vLLM's prompt_logprobs shape is not offered; use echo with logprobs (completions)",
    "truncate_prompt_tokens": "prompt truncation is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "beam search is not supported",
    "min_p": "min_p is not supported",
    "typical_p": "typical_p is not supported",
    "bad_words": "bad_words is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported",
    "logits_processors": "custom logits processors are not supported",
    "return_tokens_as_token_ids": "tokens are returned as strings",
    "add_special_tokens": "the prompt is tokenized as this endpoint always does",
    "add_generation_prompt": "the chat template always adds the generation prompt",
    "continue_final_message": "the chat template always starts a new assistant message",
    "echo": "echo is not supported here",
    "documents": "retrieval documents are not supported",
    "prompt_embeds": "prompt embeddings are not supported",
    "vllm_xargs": "vLLM's extra sampling arguments are not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the served model has no reasoning mode",
    "web_search_options": "web search is not supported",
    "chat_template": "the model's own chat template is used",
    "chat_template_kwargs": "the model's own chat template is used",
}

# A refused field sent at the value that means "off" changes nothing: accepted, silently (clients
# such as vLLM's bench and LangChain send several of these on every request).
NEUTRAL: dict[str, tuple] = {
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "include_stop_str_in_output": (None, False),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "typical_p": (None, 1, 1.0),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "logits_processors": (None, []),
    "return_tokens_as_token_ids": (None, False),
    "add_special_tokens": (None, True),  # completions: the tokenizer's own special tokens, as vLLM
    "echo": (None, False),
    "documents": (None, []),
    "prompt_embeds": (None,),
    "vllm_xargs": (None, {}),
    "modalities": (None, ["text"]),
    "chat_template_kwargs": (None, {}),
}
# Chat differs: the template is rendered without extra special tokens and with the generation prompt.
NEUTRAL_CHAT: dict[str, tuple] = {
    **NEUTRAL,
    "add_special_tokens": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
}

_warned: set[str] = set()


def _warn_once(name: str, why: str) -> None:
    if name in _warned or len(_warned) >= MAX_WARNED_NAMES:
        return
    _warned.add(name)
    log.warning("request field %r is accepted and ignored (%s)", name, why)


def check_extra(extra: dict | None, is_chat: bool = False) -> None:
    """Apply the policy to the fields a request body had beyond its model: warn about ignored and
    unknown ones (once per name), raise ``InvalidRequest`` naming the first refused one."""
    neutral = NEUTRAL_CHAT if is_chat else NEUTRAL
    for name, value in (extra or {}).items():
        if name in REFUSED:
            if name in neutral and value in neutral[name]:
                continue
            raise InvalidRequest(name, REFUSED[name])
        _warn_once(name, IGNORED.get(name, "not a parameter this server knows"))
