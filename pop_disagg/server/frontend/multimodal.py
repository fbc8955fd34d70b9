"""Images at the server's edge: OpenAI ``image_url`` parts and gRPC image bytes become checked,
decoded images processed by the checkpoint's image processor, once, before any worker sees them.

The rules (``MediaConfig``; each refusal an ``InvalidRequest`` naming the field, so HTTP answers
400 and gRPC ``INVALID_ARGUMENT``, and nothing reaches a worker):

* a URL is a ``data:image/<png|jpeg|webp|gif|bmp>;base64,...`` URL, or an http(s) URL whose host
  ``--allowed-media-domains`` names (fetched with a timeout and the byte limit); any other URL is
  refused without a fetch;
* at most ``--limit-mm-per-prompt`` images (vLLM's flag and ``image=N`` form);
* the bytes are at most ``max_image_bytes`` and decode as an image of the declared type, whole (a
  truncated file is refused), with both sides at least ``min_image_side`` and width x height at
  most ``max_image_pixels``, read from the header before decoding (a 20000 x 20000 image is
  refused without allocating it);
* the checkpoint's image processor accepts it.

``MediaEdge.prompt`` then expands each image's placeholder in the prompt text and tokenizes it;
``MediaEdge.for_ids`` takes a prompt already given as token ids with every image's full run.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from urllib.parse import urlparse

from ...config import MediaConfig
from ...limits import InvalidRequest
from ...models.multimodal import ImageKeys, mrope_positions
from ...models.vision import ImageInputs, ProcessedImage, VisionSpec, check_image_prompt, image_keys

# Declared MIME subtype -> the format Pillow must find in the bytes.
IMAGE_TYPES = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}
_DATA_URL = re.compile(r"^data:([^;,]*)(;base64)?,(.*)$", re.DOTALL)


def parse_mm_limit(text: str) -> int:
    """``--limit-mm-per-prompt`` as vLLM takes it (``image=2`` or ``{"image": 2}``) -> images per prompt."""
    try:
        value = json.loads(text) if text.strip().startswith("{") else dict(kv.split("=", 1) for kv in text.split(","))
        limits = {k.strip(): int(v) for k, v in value.items()}
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"--limit-mm-per-prompt: expected image=N or a JSON object, got {text!r}") from None
    unknown = sorted(set(limits) - {"image"})
    if unknown:
        raise ValueError(f"--limit-mm-per-prompt: only images are served, not {', '.join(unknown)}")
    if limits.get("image", 0) < 0:
        raise ValueError("--limit-mm-per-prompt: image must be >= 0")
    return limits.get("image", 0)


class MediaEdge:
    """The served model's image rules and processor (None when the model takes no images)."""

    def __init__(self, config: MediaConfig, inputs: ImageInputs | None, is_chunked_prefill: bool = False):
        self.config = config
        self.inputs = inputs
        self.is_chunked_prefill = is_chunked_prefill  # the workers prefill in chunks (a rule for Gemma-3)

    @classmethod
    def of(cls, config: MediaConfig, model_path, tokenizer, enable_chunked_prefill: bool = False) -> "MediaEdge":
        spec = VisionSpec.from_pretrained(model_path, tokenizer)
        return cls(config, ImageInputs(model_path, spec) if spec is not None else None, enable_chunked_prefill)

    @property
    def spec(self) -> VisionSpec | None:
        return self.inputs.spec if self.inputs is not None else None

    def check_count(self, num_images: int, field: str) -> None:
        if num_images and self.inputs is None:
            raise InvalidRequest(field, "the served model takes no images")
        limit = self.config.max_images_per_prompt
        if num_images > limit:
            raise InvalidRequest(
                field, f"{num_images} images in one prompt, at most {limit} (--limit-mm-per-prompt image={limit})"
            )

    # ---- bytes ----------------------------------------------------------------------------------
    def url_bytes(self, url: str, field: str) -> tuple[bytes, str | None]:
        """An ``image_url`` -> (encoded bytes, declared MIME subtype or None)."""
        m = _DATA_URL.match(url)
        if m:
            mime, is_base64, payload = m.groups()
            kind, _, subtype = mime.lower().partition("/")
            if kind != "image" or subtype not in IMAGE_TYPES:
                raise InvalidRequest(
                    field,
                    f"unsupported media type {mime or 'text/plain'!r}; images are image/{{{','.join(IMAGE_TYPES)}}}",
                )
            if not is_base64:
                raise InvalidRequest(field, "a data URL image must be base64 (data:image/png;base64,...)")
            if len(payload) > self.config.max_image_bytes * 4 // 3 + 4:
                raise InvalidRequest(field, f"image larger than {self.config.max_image_bytes} bytes")
            try:
                return base64.b64decode(payload, validate=True), subtype
            except (binascii.Error, ValueError):
                raise InvalidRequest(field, "the data URL is not valid base64") from None
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https"):
            raise InvalidRequest(field, "an image URL is a data: URL (data:image/png;base64,...) or http(s)")
        host = (parsed.hostname or "").lower()
        if host not in {d.lower() for d in self.config.allowed_media_domains}:
            raise InvalidRequest(
                field,
                f"fetching images from {host or url!r} is not allowed: send a data: URL, "
                "or start the server with --allowed-media-domains naming the host",
            )
        return self._fetch(url, field), None

    def _fetch(self, url: str, field: str) -> bytes:
        import httpx

        limit = self.config.max_image_bytes
        try:
            with httpx.stream("GET", url, timeout=self.config.fetch_timeout_s, follow_redirects=False) as resp:
                if resp.status_code != 200:
                    raise InvalidRequest(field, f"fetching the image answered HTTP {resp.status_code}")
                data = b""
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise InvalidRequest(field, f"image larger than {limit} bytes")
                return data
        except httpx.HTTPError as exc:
            raise InvalidRequest(field, f"could not fetch the image ({exc.__class__.__name__})") from None

    def decode(self, data: bytes, field: str, subtype: str | None = None):
        """Encoded bytes -> an RGB PIL image, or ``InvalidRequest`` saying what is wrong with them."""
        from PIL import Image, UnidentifiedImageError

        cfg = self.config
        if len(data) > cfg.max_image_bytes:
            raise InvalidRequest(field, f"image larger than {cfg.max_image_bytes} bytes")
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError:  # Pillow's own guard, far above ours
            raise InvalidRequest(field, f"image has more than {cfg.max_image_pixels} pixels") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise InvalidRequest(field, "not an image (PNG, JPEG, WebP, GIF or BMP)") from None
        if subtype is not None and image.format != IMAGE_TYPES[subtype]:
            raise InvalidRequest(field, f"declared image/{subtype} but the data is {image.format or 'unknown'}")
        width, height = image.size
        if min(width, height) < cfg.min_image_side:
            raise InvalidRequest(field, f"image is {width}x{height}; both sides must be >= {cfg.min_image_side} pixels")
        if width * height > cfg.max_image_pixels:
            raise InvalidRequest(field, f"image is {width}x{height}; at most {cfg.max_image_pixels} pixels")
        try:
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(field, f"the image data is corrupt or truncated ({exc})") from None
        return image.convert("RGB")

    def process(self, encoded: list[tuple[bytes, str | None]], field: str) -> list[ProcessedImage]:
        """Encoded images -> what the workers take, each checked and through the image processor."""
        self.check_count(len(encoded), field)
        return [self.process_one(data, subtype, f"{field}[{i}]") for i, (data, subtype) in enumerate(encoded)]

    def process_one(self, data: bytes, subtype: str | None, field: str) -> ProcessedImage:
        image = self.decode(data, field, subtype)
        try:
            return self.inputs.process(image)
        except Exception as exc:  # the processor's own refusal of this image
            raise InvalidRequest(field, f"the model's image processor refused it ({exc})") from None

    def chat_images(self, messages) -> list[ProcessedImage]:
        """The ``image_url`` parts of chat messages, in order, each fetched or decoded and processed."""
        urls = [
            (f"messages[{m}].content[{i}].image_url", url)
            for m, msg in enumerate(messages)
            for i, url in msg.image_urls
        ]
        self.check_count(len(urls), "messages")
        return [self.process_one(*self.url_bytes(url, field), field) for field, url in urls]

    # ---- prompts --------------------------------------------------------------------------------
    def prompt(self, tokenizer, text: str, images: list[ProcessedImage], add_special_tokens: bool) -> list[int]:
        """A prompt text with one placeholder per image -> token ids with each image's full run."""
        ids = list(tokenizer.encode(self.inputs.expand(text, images), add_special_tokens=add_special_tokens))
        self.for_ids(ids, images)
        return ids

    def for_ids(self, ids: list[int], images: list[ProcessedImage]) -> None:
        """The image rule on a tokenized prompt (``vision.check_image_prompt``)."""
        check_image_prompt(self.spec, ids, images, self.is_chunked_prefill)

    def image_keys(self, ids: list[int], images: list[ProcessedImage]) -> ImageKeys:
        """The images' spans and content digests, which name the prompt's blocks in the prefix caches."""
        return image_keys(self.spec, ids, images)

    def mrope_delta(self, ids: list[int], images: list[ProcessedImage]) -> int:
        """The position offset after the prompt (Qwen-VL), for the decode side."""
        spec = self.spec
        if not spec.is_qwen:
            return 0
        return mrope_positions(ids, spec.image_token_id, [im.grid_thw for im in images], spec.merge_size)[1]
