"""Stage-aware layer importance (POP paper, eq. 9 and 13) and the profile file that records it.

For each calibration prompt the model samples its own response (temperature 1, seeded, full model:
sampling from ``P_theta`` is what makes the expected gradient vanish and the Hessian equal the
Fisher information, eq. 7-8). One teacher-forced pass with virtual gates at 1 gives the response
cross-entropy; one backward gives ``dL/dg`` for every layer and stage; the importance of a layer in
a stage is the mean of ``(dL/dg)^2`` over the calibration set. Memory is bounded by one sample:
the backward graph holds one pass (responses may be sampled a few prompts at a time).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..models.decoder import CausalLM
from ..pop.plan import STRATEGIES
from .gates import gate_gradients


class CalibrationSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str | None = None
    num_samples: int = Field(ge=1, description="samples actually used")
    max_new_tokens: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=1)
    seed: int = 0
    sample_batch: int = 1
    temperature: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"
    loss: str = "sum of response-token cross-entropy (paper eq. 12)"


class ImportanceProfile(BaseModel):
    """Per-layer importance in each stage: ``prefill[l]`` = mean (dL/dg_pre[l])^2, same for decode."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    num_layers: int
    settings: CalibrationSettings
    prefill: tuple[float, ...]
    decode: tuple[float, ...]
    mean_prompt_tokens: float = 0.0
    mean_response_tokens: float = 0.0
    mean_loss_per_token: float = 0.0
    seconds_total: float = 0.0
    seconds_per_sample: float = 0.0

    def model_post_init(self, _context) -> None:
        if len(self.prefill) != self.num_layers or len(self.decode) != self.num_layers:
            raise ValueError(
                f"profile has {len(self.prefill)} prefill and {len(self.decode)} decode scores for a {self.num_layers}-layer model"
            )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceProfile":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"importance profile {path}: no such file") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read importance profile {path}: {exc}") from exc
        try:
            return cls(**raw)
        except Exception as exc:  # pydantic ValidationError is multi-line: keep the first problem
            raise ValueError(f"{path}: not an importance profile ({_first_error(exc)})") from exc


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        loc = ".".join(str(x) for x in e.get("loc", ())) or "value"
        return f"{loc}: {e.get('msg')}"
    return str(exc).splitlines()[0]


class ImportanceAccumulator:
    """Running sums of squared gate gradients, in float64."""

    def __init__(self, num_layers: int):
        self.sum_sq_prefill = torch.zeros(num_layers, dtype=torch.float64)
        self.sum_sq_decode = torch.zeros(num_layers, dtype=torch.float64)
        self.num_samples = 0

    def add(self, grad_prefill: torch.Tensor, grad_decode: torch.Tensor) -> None:
        self.sum_sq_prefill += grad_prefill.double() ** 2
        self.sum_sq_decode += grad_decode.double() ** 2
        self.num_samples += 1

    def means(self) -> tuple[list[float], list[float]]:
        n = max(self.num_samples, 1)
        return (self.sum_sq_prefill / n).tolist(), (self.sum_sq_decode / n).tolist()


Sampler = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, index of the first) -> responses


def engine_sampler(
    model: CausalLM,
    tokenizer,
    max_new_tokens: int,
    max_prompt_tokens: int,
    seed: int,
    model_name: str,
    dtype: str,
    max_batch: int = 8,
) -> Sampler:
    """Responses from our own engine: full model (no POP), temperature 1, sample ``i`` seeded
    ``seed + i``. Each request has its own generator, so a response does not depend on which
    prompts share its batch (up to float rounding of batched GEMMs).

    Sampling runs up to ``max_batch`` prompts at once (decode on CPU is overhead-bound, so a batch
    costs little more than one sequence); the KV budget fits exactly that many sequences.
    """
    from ..config import EngineConfig, PruneConfig
    from ..engine.engine import LLMEngine
    from ..engine.sampling import SamplingParams

    block_size = 16
    num_tokens = max_batch * (max_prompt_tokens + max_new_tokens + block_size)
    elem_bytes = torch.finfo(model.dtype).bits // 8
    budget_mb = math.ceil(model.arch.kv_bytes_per_token(elem_bytes) * num_tokens / 2**20) + 1
    config = EngineConfig(
        model=model_name,
        dtype=dtype,
        device=model.device.type,
        block_size=block_size,
        kv_cache_memory_mb=budget_mb,
        max_num_seqs=max_batch,
        prune=PruneConfig(no_prune=True),
    )
    engine = LLMEngine(config, model=model, tokenizer=tokenizer)
    if model.arch.vision_family is not None:
        engine.load_vision(model_name)  # image prompts: the engine encodes their images

    def sample(prompts: list[list[int]], first_index: int, images: list | None = None) -> list[list[int]]:
        params = [
            SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + first_index + j)
            for j in range(len(prompts))
        ]
        return [out.token_ids for out in engine.generate(prompts, params, images=images)]

    # The gated passes need each image prompt's encoded rows: the same encoder, once per prompt.
    sample.encode_images = engine.encode_images
    return sample


def measure_importance(
    model: CausalLM,
    prompts: list[list[int]],
    sampler: Sampler,
    sample_batch: int = 1,
    on_sample: Callable[[int, float], None] | None = None,
    images: list | None = None,
) -> tuple[ImportanceAccumulator, dict]:
    """Accumulate squared gate gradients over ``prompts``; returns the sums and run statistics.

    Responses are sampled ``sample_batch`` prompts at a time; gradients are always one sample at a
    time, so the backward graph never holds more than one sequence.
    ``on_sample(num_response_tokens, loss)`` is called after each sample (progress bars).
    ``images``: per prompt its processed images (None for a text prompt; a vision-language model
    and ``engine_sampler``'s sampler, which encodes them).
    """
    acc = ImportanceAccumulator(model.arch.num_layers)
    num_prompt, num_response, loss_sum = 0, 0, 0.0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), sample_batch):
        chunk = prompts[start : start + sample_batch]
        chunk_images = images[start : start + sample_batch] if images else [None] * len(chunk)
        responses = sampler(chunk, start, chunk_images) if images else sampler(chunk, start)
        for prompt_ids, response_ids, ims in zip(chunk, responses, chunk_images):
            encoded = sampler.encode_images(prompt_ids, ims) if ims else None
            grad_pre, grad_dec, loss = gate_gradients(model, prompt_ids, response_ids, encoded)
            acc.add(grad_pre, grad_dec)
            num_prompt += len(prompt_ids)
            num_response += len(response_ids)
            loss_sum += loss
            if on_sample is not None:
                on_sample(len(response_ids), loss)
    seconds = time.perf_counter() - t0
    n = max(acc.num_samples, 1)
    stats = dict(
        mean_prompt_tokens=num_prompt / n,
        mean_response_tokens=num_response / n,
        mean_loss_per_token=loss_sum / max(num_response, 1),
        seconds_total=seconds,
        seconds_per_sample=seconds / n,
    )
    return acc, stats


def plan_from_profile(profile: ImportanceProfile, ratio: float, strategy: str = "last"):
    """A PrunePlan skipping ``floor(L * ratio)`` layers: the deepest ones (``last``, the paper's
    choice) or those with the lowest prefill importance (``importance``; ties go to the deeper layer).
    """
    from ..pop.plan import PlanError, PrunePlan

    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    num_layers = profile.num_layers
    if strategy == "last":
        return PrunePlan.from_ratio(num_layers, ratio, model=profile.model)
    if not 0.0 <= ratio < 1.0:
        raise PlanError(f"prune ratio must be in [0, 1), got {ratio}")
    k = math.floor(num_layers * ratio + 1e-6)  # the same count from_ratio uses
    order = sorted(range(num_layers), key=lambda l: (profile.prefill[l], -l))
    return PrunePlan(num_layers=num_layers, skip_layers=tuple(order[:k]), model=profile.model)
