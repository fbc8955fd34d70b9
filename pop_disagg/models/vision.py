"""The vision side of a vision-language checkpoint (Qwen3-VL, Qwen2.5-VL, Gemma-3 with vision): its
images from pixels to the features its prompt's image placeholder tokens take.

The language model is our decoder (``decoder.py``); the vision tower and projector are
Transformers' own modules (Qwen3-VL's ``Qwen3VLVisionModel`` with its patch merger and DeepStack
mergers; Qwen2.5-VL's windowed ``Qwen2_5_VisionTransformerPretrainedModel`` with its merger;
Gemma-3's SigLIP tower and ``Gemma3MultiModalProjector``), loaded by name from the checkpoint's
safetensors. The pieces, in the order a request meets them:

* ``VisionSpec``: the checkpoint's image tokens and geometry, parsed from ``config.json``.
* ``ImageInputs.process``: one image through the checkpoint's own image processor
  (``preprocessor_config.json``) -> ``ProcessedImage`` (pixel values, Qwen's patch grid, how many
  placeholder tokens it takes). This is what travels on a request, never the decoded features.
* ``ImageInputs.expand``: a prompt text with one placeholder per image (``VisionSpec.placeholder``,
  what a chat message's image part becomes) -> the text with each image's full token run, as the
  checkpoint's processor writes it; then it is tokenized as usual.
* ``VisionEncoder.encode``: pixels -> per-image features (+ DeepStack features), once per image,
  where the prompt is prefilled (the engine, or a disaggregated prefill worker).
* ``prompt_images``: the prompt's ids + features -> ``multimodal.PromptImages`` (positions,
  multimodal RoPE, spans), checked against the rules in ``check_image_prompt``.
* ``image_keys``: the prompt's ids + images -> ``multimodal.ImageKeys`` (each image's span and
  content digest), what names its blocks in the prefix cache. Made where the request is made
  and carried with it; a ``ProcessedImage`` hashes its pixels once (``digest``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ..limits import InvalidRequest
from .arch import VISION_ARCHITECTURES, ModelConfigError
from .multimodal import ImageKeys, PromptImages, mrope_positions


@dataclass(frozen=True)
class VisionSpec:
    """What the serving path needs to know about a checkpoint's images."""

    family: str  # "qwen3_vl" | "qwen2_5_vl" | "gemma3"
    image_token_id: int  # the placeholder token each image feature row takes
    image_token: str
    placeholder: str  # one image in a prompt text, before expansion
    merge_size: int = 1  # Qwen: patches merged per side into one token
    tokens_per_image: int = 0  # Gemma: fixed number of tokens per image
    boi_token: str = ""  # Gemma: begin / end of image
    eoi_token: str = ""
    is_bidirectional: bool = False  # an image's tokens attend to each other both ways (Gemma-3)

    @property
    def is_qwen(self) -> bool:
        """Qwen-VL's images: patch grids, merged patches, multimodal RoPE (Qwen3-VL and Qwen2.5-VL alike)."""
        return self.family in ("qwen3_vl", "qwen2_5_vl")

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer) -> "VisionSpec | None":
        """The spec of a vision-language checkpoint folder; None for a text-only one."""
        raw = json.loads((Path(path) / "config.json").read_text())
        family = next(
            (VISION_ARCHITECTURES[a] for a in raw.get("architectures") or [] if a in VISION_ARCHITECTURES), None
        )
        if family is None:
            return None
        token = tokenizer.convert_ids_to_tokens
        if family in ("qwen3_vl", "qwen2_5_vl"):
            image_id = raw.get("image_token_id", 151655)
            start, end = token(raw.get("vision_start_token_id", 151652)), token(raw.get("vision_end_token_id", 151653))
            merge = (raw.get("vision_config") or {}).get("spatial_merge_size", 2)
            return cls(family, image_id, token(image_id), f"{start}{token(image_id)}{end}", merge_size=merge)
        image_id = raw.get("image_token_index", 262_144)
        boi, eoi = token(raw.get("boi_token_index", 255_999)), token(raw.get("eoi_token_index", 256_000))
        return cls(
            family,
            image_id,
            token(image_id),
            boi,
            tokens_per_image=raw.get("mm_tokens_per_image", 256),
            boi_token=boi,
            eoi_token=eoi,
            is_bidirectional=True,
        )


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the checkpoint's image processor leaves it (what a request carries)."""

    pixel_values: torch.Tensor  # Qwen: (patches, C * T * P * P); Gemma: (3, S, S)
    grid_thw: tuple[int, int, int] | None  # Qwen: the patch grid; Gemma: None
    num_tokens: int  # placeholder tokens the image takes in the prompt

    @cached_property  # kept on the instance (and pickled with it): a request's images hash once
    def digest(self) -> bytes:
        """SHA-256 of the processed image: its pixel values (dtype, shape, bytes) and patch grid, i.e.
        everything that decides its features and, for Qwen-VL, the positions after it."""
        pixels = self.pixel_values.detach().cpu().contiguous()
        h = hashlib.sha256(f"{pixels.dtype}|{tuple(pixels.shape)}|{self.grid_thw}|".encode())
        h.update(pixels.view(torch.uint8).numpy())
        return h.digest()


class ImageInputs:
    """A checkpoint's image processor and prompt expansion (see the module docstring)."""

    def __init__(self, path: str | Path, spec: VisionSpec):
        from transformers import AutoImageProcessor

        self.spec = spec
        self.processor = AutoImageProcessor.from_pretrained(str(path))

    def process(self, image) -> ProcessedImage:
        """A PIL image (RGB) -> ``ProcessedImage``."""
        out = self.processor(images=[image], return_tensors="pt")
        if self.spec.is_qwen:
            grid = tuple(int(x) for x in out["image_grid_thw"][0])
            n = grid[0] * grid[1] * grid[2] // self.spec.merge_size**2
            return ProcessedImage(out["pixel_values"], grid, n)
        return ProcessedImage(out["pixel_values"][0], None, self.spec.tokens_per_image)

    def expand(self, text: str, images: list[ProcessedImage]) -> str:
        """Each image's placeholder in ``text`` -> its full token run (the checkpoint processor's text)."""
        spec = self.spec
        marker = spec.image_token if spec.is_qwen else spec.boi_token
        pieces = text.split(marker)
        if len(pieces) - 1 != len(images):
            raise InvalidRequest(
                "messages", f"the prompt has {len(pieces) - 1} image placeholders for {len(images)} images"
            )
        out = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            if spec.is_qwen:
                out.append(spec.image_token * image.num_tokens)
            else:
                out.append(f"\n\n{spec.boi_token}{spec.image_token * image.num_tokens}{spec.eoi_token}\n\n")
            out.append(piece)
        return "".join(out)


def check_image_prompt(
    spec: VisionSpec | None, prompt_ids: list[int], images: list[ProcessedImage], is_chunked_prefill: bool = False
) -> None:
    """The rule for a prompt with images: its placeholder tokens are exactly the images' tokens
    (in runs, one per image, in order) and its last token is text (the boundary token that runs
    the full model and samples is never an image row). A model whose images see themselves both
    ways (Gemma-3) prefills them in one pass, so not under chunked prefill."""
    if images and spec is not None and spec.is_bidirectional and is_chunked_prefill:
        raise InvalidRequest("images", "this model's images need one-pass prefill (run without chunked prefill)")
    if not images:
        if spec is not None and spec.image_token_id in prompt_ids:
            raise InvalidRequest("images", "the prompt has image placeholder tokens but no images")
        return
    if spec is None:
        raise InvalidRequest("images", "the served model takes no images")
    runs = [e - s for s, e in image_spans(prompt_ids, spec.image_token_id)]
    wanted = [im.num_tokens for im in images]
    if runs != wanted:
        raise InvalidRequest("images", f"the prompt's image token runs {runs} do not match the images' sizes {wanted}")
    if prompt_ids[-1] == spec.image_token_id:
        raise InvalidRequest("images", "the prompt may not end inside an image")


def cached_prompt_images(
    spec: VisionSpec, prompt_ids: list[int], images: list[ProcessedImage], hidden_size: int
) -> PromptImages:
    """The prompt's images for a pass that starts after all of them (their rows' K/V come from a
    prefix cache): no features, since no row of the pass takes one, only the multimodal positions
    the later rows need (Qwen-VL). The vision encoder does not run."""
    none = torch.zeros(0, hidden_size)
    if spec.is_qwen:
        grids = [im.grid_thw for im in images]
        mrope, delta, spans = mrope_positions(prompt_ids, spec.image_token_id, grids, spec.merge_size)
        return PromptImages([], none, [], spans, mrope, delta)
    return PromptImages([], none, [], image_spans(prompt_ids, spec.image_token_id))


def image_spans(prompt_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """The [start, end) runs of image placeholder tokens in a prompt, one per image."""
    spans, start = [], None
    for i, t in enumerate(prompt_ids + [None]):
        if t == image_token_id and start is None:
            start = i
        elif t != image_token_id and start is not None:
            spans.append((start, i))
            start = None
    return spans


def image_keys(spec: VisionSpec, prompt_ids: list[int], images: list[ProcessedImage]) -> ImageKeys:
    """What names the prompt's blocks in the prefix cache (after ``check_image_prompt``)."""
    spans = image_spans(list(prompt_ids), spec.image_token_id)
    return ImageKeys(tuple(spans), tuple(im.digest for im in images), spec.is_bidirectional)


# Where checkpoints keep the vision tower and projector (Transformers 5's layout, then the layout of
# checkpoints as published: Qwen3-VL ``model.visual.``, Qwen2.5-VL ``visual.``, Gemma-3
# ``vision_tower.vision_model.``).
VISION_LAYOUTS = (
    ("visual.", "model.visual."),
    ("visual.", "visual."),
    ("vision_tower.", "model.vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


class VisionEncoder(nn.Module):
    """Transformers' vision tower and projector of the checkpoint, loaded from its safetensors."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        from safetensors import safe_open
        from transformers import AutoConfig

        from .loader import _weight_index, checkpoint_name

        config = AutoConfig.from_pretrained(str(path))
        vision_config = config.vision_config
        vision_config._attn_implementation = "sdpa"
        self.family = VISION_ARCHITECTURES[config.architectures[0]]
        if self.family == "qwen3_vl":
            from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

            self.visual = Qwen3VLVisionModel._from_config(vision_config)
        elif self.family == "qwen2_5_vl":
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

            self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config)
        else:
            from transformers import AutoModel
            from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

            self.vision_tower = AutoModel.from_config(vision_config)
            self.multi_modal_projector = Gemma3MultiModalProjector(config)
        index = _weight_index(Path(path))
        state = {}
        for name in self.state_dict():
            key = checkpoint_name(index, name, VISION_LAYOUTS)
            if key not in index:
                raise ModelConfigError(f"{path}: checkpoint lacks the vision tensor {key}")
            with safe_open(str(index[key]), framework="pt", device="cpu") as f:
                state[name] = f.get_tensor(key)
        self.load_state_dict(state, strict=True)
        self.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.inference_mode()
    def encode(self, images: list[ProcessedImage]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """-> per image its (num_tokens, hidden) features and (Qwen3-VL) its DeepStack features per layer."""
        if not images:
            return [], []
        if self.family in ("qwen3_vl", "qwen2_5_vl"):
            pixels = torch.cat([im.pixel_values for im in images]).to(self.device, self.dtype)
            grid = torch.tensor([im.grid_thw for im in images], device=self.device)
            out = self.visual(pixels, grid_thw=grid, return_dict=True)
            sizes = [im.num_tokens for im in images]
            feats = list(out.pooler_output.split(sizes))
            # per layer, per image (Qwen2.5-VL has no DeepStack)
            deep = [list(d.split(sizes)) for d in getattr(out, "deepstack_features", None) or []]
            return feats, [list(per_image) for per_image in zip(*deep)] if deep else [[] for _ in images]
        pixels = torch.stack([im.pixel_values for im in images]).to(self.device, self.dtype)
        hidden = self.vision_tower(pixel_values=pixels, return_dict=True).last_hidden_state
        projected = self.multi_modal_projector(hidden)  # (num_images, tokens_per_image, hidden)
        return list(projected.unbind(0)), [[] for _ in images]


def prompt_images(
    spec: VisionSpec,
    prompt_ids: list[int],
    images: list[ProcessedImage],
    features: list[torch.Tensor],
    deepstack: list[list[torch.Tensor]],
) -> PromptImages:
    """The prompt's image rows for the decoder (after ``check_image_prompt``)."""
    positions = [i for i, t in enumerate(prompt_ids) if t == spec.image_token_id]
    embeds = torch.cat(features)
    deep = [torch.cat(layer) for layer in zip(*deepstack)] if deepstack and deepstack[0] else []
    if spec.is_qwen:
        grids = [im.grid_thw for im in images]
        mrope, delta, spans = mrope_positions(prompt_ids, spec.image_token_id, grids, spec.merge_size)
        return PromptImages(positions, embeds, deep, spans, mrope, delta)
    return PromptImages(positions, embeds, deep, image_spans(prompt_ids, spec.image_token_id))
