"""Image + text evaluation prompts for a vision-language model: ``eval fidelity --image-file``.

The file is what ``pop-disagg calibrate`` takes for a VLM (``calib/data.py``): JSONL, one chat
``messages`` list per line, user content as OpenAI parts with ``data:image/...;base64`` images
(LLaVA-Instruct style). A sample that ends with an assistant message is scored on that answer:
the prompt is the messages before it (with the generation prompt), the continuation the answer's
first ``continuation_len`` tokens. A sample without one gets the full model's own greedy answer as
its continuation (``FidelityRun`` fills it in once the model is up), so every measure still
compares a method against the full model on the same tokens. Each prompt's images run through the
checkpoint's vision encoder once, here: no method prunes the vision tower, so every method reads
the same features.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from ..calib.data import PromptRecord, encode_image_prompt, image_urls, read_prompts
from .data import TextWindow

REFERENCE_SOURCE = "images + reference answers"
GREEDY_SOURCE = "images + the full model's answers"


def _answer_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def image_windows(
    path: str, tokenizer, model_path: str, model, num: int, max_prompt_tokens: int, continuation_len: int
) -> tuple[list[TextWindow], list[str]]:
    """The first ``num`` usable samples of ``path`` as windows with their encoded images (an
    answerless one with no continuation yet), and the samples skipped, as ``FILE:LINE: reason``."""
    from ..models.vision import ImageInputs, VisionEncoder, VisionSpec, prompt_images

    spec = VisionSpec.from_pretrained(model_path, tokenizer)
    if spec is None:
        raise ValueError(f"--image-file: {model_path} is not a vision-language checkpoint")
    inputs = ImageInputs(model_path, spec)
    encoder = VisionEncoder(model_path, model.dtype, model.device)
    loaded = read_prompts(path)
    skipped = list(loaded.skipped)
    windows = []
    for record in loaded.records:
        if len(windows) == num:
            break
        where = f"{path}:{record.line}"
        messages = list(record.messages or ())
        answer = messages.pop() if messages and messages[-1]["role"] == "assistant" else None
        prompt = PromptRecord(record.line, messages=tuple(messages))
        if not image_urls(prompt):
            skipped.append(f"{where}: no image in the prompt (a text prompt belongs in --text-file)")
            continue
        try:  # the limit is checked below, naming this command's flag
            ids, images = encode_image_prompt(prompt, tokenizer, inputs, sys.maxsize)
        except ValueError as exc:  # an image that does not decode
            skipped.append(f"{where}: {exc}")
            continue
        if len(ids) > max_prompt_tokens:
            skipped.append(
                f"{where}: {len(ids)} prompt tokens with its images, over --max-image-prompt-tokens {max_prompt_tokens}"
            )
            continue
        continuation = []
        if answer is not None:
            continuation = list(tokenizer.encode(_answer_text(answer), add_special_tokens=False))[:continuation_len]
            if not continuation:
                skipped.append(f"{where}: the answer is empty")
                continue
        features, deepstack = encoder.encode(images)
        encoded = prompt_images(spec, ids, images, features, deepstack)
        source = REFERENCE_SOURCE if answer is not None else GREEDY_SOURCE
        windows.append(TextWindow(source, ids, continuation, encoded))
    if not windows:
        raise ValueError(f"--image-file {path}: no usable image samples ({len(skipped)} skipped)")
    return windows, skipped


def with_greedy_answers(windows: list[TextWindow], answers: list[list[int]]) -> list[TextWindow]:
    """The answerless windows (in order) given ``answers`` as their continuations."""
    it = iter(answers)
    return [w if w.continuation_ids else replace(w, continuation_ids=next(it)) for w in windows]
