"""Calibration prompts from a file, tokenized and truncated.

Three formats, told apart by the first non-blank line:

* JSONL with a ``prompt`` string per line (encoded as is, no template);
* JSONL with chat ``messages`` (``[{"role": ..., "content": ...}]``), rendered with the tokenizer's
  chat template and the generation prompt appended;
* plain text, one prompt per line.

For a vision-language model a chat message's ``content`` may also be a list of OpenAI parts,
``{"type": "text", "text": ...}`` and ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}``
(the LLaVA-Instruct style samples the paper calibrates VLMs on); ``encode_image_prompt`` renders
each image as the model's placeholder, runs the checkpoint's image processor and expands it.

A bad record (not JSON, neither field, empty) is reported with its line number and skipped; a file
that is missing, unreadable or holds no usable prompt is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptRecord:
    line: int  # 1-based line number in the file
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None


@dataclass(frozen=True)
class LoadedPrompts:
    records: list[PromptRecord]
    skipped: list[str]  # "FILE:LINE: reason", one per bad record
    format: str  # "jsonl" or "text"


def _parse_json_record(obj, line: int) -> PromptRecord:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and (isinstance(m.get("content"), str) or _is_parts(m.get("content")))
                for m in messages
            )
        )
        if not ok:
            raise ValueError(
                "'messages' must be a non-empty list of {role, content} (a string or text/image_url parts)"
            )
        if not any(_has_content(m["content"]) for m in messages):
            raise ValueError("'messages' are all empty")
        return PromptRecord(line, messages=tuple(messages))
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError("'prompt' must be a non-empty string")
        return PromptRecord(line, prompt=obj["prompt"])
    raise ValueError("record has neither 'prompt' nor 'messages'")


def _is_parts(content) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, dict)
        and (
            (p.get("type") == "text" and isinstance(p.get("text"), str))
            or (p.get("type") == "image_url" and isinstance((p.get("image_url") or {}).get("url"), str))
        )
        for p in content
    )


def _has_content(content) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    return any(p["type"] == "image_url" or p["text"].strip() for p in content)


def image_urls(record: PromptRecord) -> list[str]:
    """The record's image URLs, in order (none for a text record)."""
    return [
        p["image_url"]["url"]
        for m in record.messages or ()
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image_url"
    ]


def _data_url_image(url: str):
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    head, _, payload = url.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError("calibration images must be data:image/...;base64 URLs")
    try:
        return Image.open(io.BytesIO(base64.b64decode(payload, validate=True))).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"an image does not decode ({exc.__class__.__name__})") from None


def encode_image_prompt(record: PromptRecord, tokenizer, image_inputs, max_prompt_tokens: int):
    """Token ids and processed images of a record with image parts (``image_inputs``: the
    checkpoint's ``models.vision.ImageInputs``). Not truncated: a cut would split an image, so a
    longer prompt is a ValueError (the caller skips the record)."""
    images = [image_inputs.process(_data_url_image(url)) for url in image_urls(record)]
    placeholder = image_inputs.spec.placeholder
    messages = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(p["text"] if p["type"] == "text" else placeholder for p in m["content"]),
        }
        for m in record.messages
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer.encode(image_inputs.expand(text, images), add_special_tokens=False))
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"{len(ids)} prompt tokens with its images, over --max-prompt-tokens {max_prompt_tokens}")
    return ids, images


def read_prompts(path: str | Path) -> LoadedPrompts:
    """Parse the file into records; raise ValueError / FileNotFoundError for unusable files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration data {path}: cannot read ({exc})") from exc
    first = next((l.strip() for l in lines if l.strip()), None)
    if first is None:
        raise ValueError(f"calibration data {path}: file is empty")
    is_jsonl = first.startswith("{")
    records, skipped = [], []
    for i, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        if not is_jsonl:
            records.append(PromptRecord(i, prompt=text))
            continue
        try:
            records.append(_parse_json_record(json.loads(text), i))
        except json.JSONDecodeError as exc:
            skipped.append(f"{path}:{i}: not valid JSON ({exc.msg})")
        except ValueError as exc:
            skipped.append(f"{path}:{i}: {exc}")
    if not records:
        raise ValueError(f"calibration data {path}: no usable prompts ({len(skipped)} bad records)")
    return LoadedPrompts(records, skipped, "jsonl" if is_jsonl else "text")


def encode_prompt(record: PromptRecord, tokenizer, max_prompt_tokens: int) -> list[int]:
    """Token ids of one record, keeping the last ``max_prompt_tokens`` tokens.

    Truncation keeps the tail: for chat prompts that is where the generation prompt sits, and the
    response is sampled from there.
    """
    if record.messages is not None:
        ids = tokenizer.apply_chat_template(
            list(record.messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        ids = tokenizer.encode(record.prompt)
    ids = list(ids)
    return ids[-max_prompt_tokens:] if len(ids) > max_prompt_tokens else ids
