"""Chat messages as the OpenAI API sends them, and their prompt: the model's own chat template.

Shared by the chat completions endpoint (``http_api.py``) and ``/tokenize`` (``tokenize_api.py``),
so a conversation tokenizes the same way wherever it is sent.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ...limits import InvalidRequest


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """Prompt token ids of the conversation, with the assistant's turn opened (the chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("messages", "the served model has no chat template: use /v1/completions")
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.text} for m in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )
    # The rendered text already holds the special tokens; adding them again would double BOS.
    return list(tokenizer.encode(text, add_special_tokens=False))
