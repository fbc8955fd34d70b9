"""Per-request state. Everything is counters; the phase is derived from them, never stored twice.

Life of a request under POP (prompt of ``N`` tokens):

    WAITING --prefill x_1..x_{N-1} (pruned)--> RUNNING, num_computed_tokens = N-1
    RUNNING --decode step: input x_N (boundary token), full model--> first generated token
    RUNNING --decode step per generated token--> ... --> FINISHED (eos/stop/length/abort)

A one-token prompt has nothing to prefill and starts RUNNING. With the "no boundary handling"
ablation the prefill covers all N tokens and samples the first token from the pruned pass.

Preemption (the scheduler ran out of blocks) sends a RUNNING request back to WAITING with
``num_computed_tokens = 0`` and its blocks released; it keeps ``output_token_ids``. Re-admitted, it
computes its positions again the way they were first computed (``scheduler.py``), then decodes on.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..models.multimodal import ImageKeys, PromptImages
from . import prompt_logprobs
from .kv_cache import PrefixKey
from .sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or failed


@dataclass(eq=False)  # identity: a request is itself, not its field values
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    # With params.logprobs set: one TokenLogprob per output token (appended by the sampler).
    output_logprobs: list = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in this request's blocks
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    # KV memory (scheduler.py): prefix-cache names of the request's full blocks, computed as needed;
    # how many of its blocks are published; prompt tokens found cached at its first admission.
    block_hashes: list[bytes] = field(default_factory=list)
    num_published_blocks: int = 0
    num_cached_tokens: int | None = None
    num_preemptions: int = 0
    is_kv_local: bool = True  # False while its prefix K/V come from another worker (not publishable)
    prefix_key: PrefixKey | None = None  # how another worker computes its prefix; None: this engine's plan
    # With params.prompt_logprobs: a TokenLogprob per scored prompt token, None for the unscored
    # (the first, the context's); grows as its full-model positions run (prompt_logprobs.py).
    prompt_logprobs: list | None = None
    grammar: object | None = None  # structured output: its xgrammar matcher (structured.py), set by the engine
    # A prompt with images: their placeholder rows' vision features and multimodal positions
    # (the engine encodes them when the request is added), and what names its blocks in the
    # prefix cache (each image's span and content digest, folded into the blocks that hold it).
    images: PromptImages | None = None
    image_keys: ImageKeys | None = None

    def __post_init__(self) -> None:
        self.prompt_logprobs = prompt_logprobs.initial(len(self.prompt_token_ids), self.params)

    @property
    def is_prefix_cacheable(self) -> bool:
        """Its blocks can be named: its placeholder ids alone do not say which image they hold."""
        return self.images is None or self.image_keys is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def token_at(self, position: int) -> int:
        n = self.num_prompt_tokens
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens at positions ``start..end-1`` (prompt, then generated)."""
        n = self.num_prompt_tokens
        if end <= n:
            return self.prompt_token_ids[start:end]
        head = self.prompt_token_ids[start:] if start < n else []
        return head + self.output_token_ids[max(0, start - n) : end - n]

    @property
    def next_input_token(self) -> int:
        """The token the next decode step feeds (the boundary token ``x_N`` on the first step)."""
        return self.token_at(self.num_computed_tokens)
