"""Request fields the OpenAI HTTP API does not model, sorted once into two explicit lists.

Clients (the ``openai`` SDK, LangChain, lm-eval, vLLM's own bench) send fields beyond what a server
implements. vLLM accepts what it ignores with a logged warning rather than a 400; we do the same
for fields that cannot change the generated tokens or text (``IGNORED``: warned once per field
name per process), and refuse with a 400 naming the field those that would change the output and
that we do not implement (``REFUSED``), so a client never gets an answer to a question it did not
ask. A name on neither list is refused too ("unrecognized request argument"): a misspelt
``temprature`` must not pass silently.
"""

from __future__ import annotations

import logging

from ...limits import InvalidRequest

log = logging.getLogger("pop_disagg.serve")

# name -> why ignoring it changes nothing in the tokens or text returned
IGNORED: dict[str, str] = {
    "user": "an end-user id for abuse tracking",
    "safety_identifier": "an end-user id for abuse tracking",
    "metadata": "stored-completion tags",
    "store": "OpenAI's stored completions",
    "service_tier": "OpenAI's capacity tiers",
    "prompt_cache_key": "OpenAI's prompt-cache routing hint",
    "parallel_tool_calls": "only meaningful with tools, which are refused",
    "spaces_between_special_tokens": "a slow-tokenizer option; fast tokenizers' decode ignores it",
    "priority": "vLLM's priority scheduling; requests are served first come, first served",
    "request_id": "the server assigns its own ids",
}

# name -> why it is refused (it would change the output and is not implemented)
REFUSED: dict[str, str] = {
    "suffix": "insertion (suffix) is not supported",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "structured output (response_format) is not supported",
    "guided_json": "guided decoding is not supported",
    "guided_regex": "guided decoding is not supported",
    "guided_choice": "guided decoding is not supported",
    "guided_grammar": "guided decoding is not supported",
    "structured_outputs": "structured output is not supported",
    "include_stop_str_in_output": "the stop string is always cut from the text",
    "prompt_logprobs": "prompt logprobs are not supported",
    "truncate_prompt_tokens": "prompt truncation is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "beam search is not supported",
    "min_p": "min_p is not supported",
    "bad_words": "bad_words is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported",
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
    "response_format": (None, {"type": "text"}),
    "include_stop_str_in_output": (None, False),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "modalities": (None, ["text"]),
    "chat_template_kwargs": (None, {}),
}

_warned: set[str] = set()


def check_extra(extra: dict | None) -> None:
    """Apply the lists to the fields a request body had beyond its model: warn about ignored ones
    (once per name), raise ``InvalidRequest`` naming the first refused or unknown one."""
    for name, value in (extra or {}).items():
        if name in IGNORED:
            if name not in _warned:
                _warned.add(name)
                log.warning("request field %r is accepted and ignored (%s)", name, IGNORED[name])
        elif name in NEUTRAL and value in NEUTRAL[name]:
            continue
        elif name in REFUSED:
            raise InvalidRequest(name, REFUSED[name])
        else:
            raise InvalidRequest(name, "unrecognized request argument")
