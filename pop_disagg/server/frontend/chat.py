"""Chat messages as the OpenAI API sends them, and their prompt: the model's own chat template.

Shared by the chat completions endpoint (``http_api.py``) and ``/tokenize`` (``tokenize_api.py``),
so a conversation tokenizes the same way wherever it is sent. An ``image_url`` content part
(vision-language models) becomes the model's image placeholder in the message text; the images
themselves are checked and the placeholders expanded in ``multimodal.py``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ...limits import InvalidRequest


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's processor decides


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        return self.prompt_text("")

    @property
    def image_urls(self) -> list[tuple[int, str]]:
        """(part index, URL) of the message's image parts, in order."""
        if not isinstance(self.content, list):
            return []
        return [(i, p.image_url.url) for i, p in enumerate(self.content) if isinstance(p, ImagePart)]

    def prompt_text(self, image_placeholder: str) -> str:
        """The message's text with ``image_placeholder`` where each image part is."""
        if isinstance(self.content, list):
            return "".join(p.text if isinstance(p, TextPart) else image_placeholder for p in self.content)
        return self.content or ""


def render_chat_text(
    tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True, image_placeholder: str | None = None
) -> str:
    """The conversation through the chat template, each image part as ``image_placeholder``."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("messages", "the served model has no chat template: use /v1/completions")
    if image_placeholder is None and any(m.image_urls for m in messages):
        raise InvalidRequest("messages", "image_url parts need a vision-language model (and /tokenize takes none)")
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.prompt_text(image_placeholder or "")} for m in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """Prompt token ids of the conversation, with the assistant's turn opened (the chat template)."""
    text = render_chat_text(tokenizer, messages, add_generation_prompt)
    # The rendered text already holds the special tokens; adding them again would double BOS.
    return list(tokenizer.encode(text, add_special_tokens=False))
