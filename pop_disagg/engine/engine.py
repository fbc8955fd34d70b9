"""The single-process engine: one model, one paged KV cache, continuous batching.

``step()`` is the whole loop: schedule -> run -> update. It imports neither Ray nor gRPC; the
server's workers wrap the same pieces (scheduler, runner, request state). KV blocks are taken on
demand, with recompute preemption and a prefix cache (``scheduler.py``); ``stats`` counts both.

A vision-language checkpoint also loads its vision encoder (``models/vision.py``): a request may
bring images (``ProcessedImage``, from the checkpoint's image processor), encoded once per image
when the request is added, before its prompt is prefilled; their placeholder tokens are then prompt
tokens like any other (the plan skips their layers in prefill).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from ..config import EngineConfig
from ..limits import InvalidRequest, ModelLimits
from ..models import cpu_blas
from ..models.arch import ModelArch
from ..models.decoder import CausalLM
from ..models.loader import load_model, resolve_dtype
from ..models.multimodal import ImageKeys, PromptImages
from ..models.vision import (
    ImageInputs,
    ProcessedImage,
    VisionEncoder,
    VisionSpec,
    check_image_prompt,
    image_keys,
    prompt_images,
)
from ..pop.plan import PrunePlan
from .detokenizer import OutputText
from .kv_cache import BlockManager, KVCache, PrefixKey, num_blocks_for_budget, plan_cache_key
from .model_runner import ModelRunner
from .request import FinishReason, Request
from .sampling import SamplingParams, make_generator
from .scheduler import Scheduler, SchedulerOutput, SchedulerStats


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    # When the request asked for logprobs (params.logprobs): a TokenLogprob per token of
    # token_ids / new_token_ids (raw logits, see sampling.py); else None.
    logprobs: list | None = None
    new_logprobs: list | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at its first admission
    # When the request scores its prompt (params.prompt_logprobs), on its first and last outputs:
    # one entry per prompt token, a TokenLogprob or None (the first token, the context's; prompt_logprobs.py).
    prompt_logprobs: list | None = None


def kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory_mb is not None:
        return int(config.kv_cache_memory_mb * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    return 512 * 2**20


class LLMEngine:
    def __init__(
        self, config: EngineConfig, model: CausalLM | None = None, tokenizer=None, model_path: str | None = None
    ):
        self.config = config
        if config.device == "cpu":
            cpu_blas.configure(config.cpu_blas)  # process-wide, like the thread count
        if model is None:
            from ..models.registry import resolve_model

            model_path = str(resolve_model(config.model))
            model = load_model(model_path, config.dtype, config.device)
        self.model = model
        self.arch: ModelArch = model.arch
        self.model_path = model_path
        if tokenizer is None and model_path is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer = tokenizer
        # Vision-language checkpoints: the image tokens, the image processor and the vision encoder
        # (``load_vision``; a disaggregated decode worker has none: its K/V come encoded).
        self.vision_spec: VisionSpec | None = None
        self.image_inputs: ImageInputs | None = None
        self.vision: VisionEncoder | None = None
        if self.arch.vision_family is not None and model_path is not None:
            self.load_vision(model_path)
        self.plan = config.plan(self.arch)
        self.context_limit = config.context_limit(self.arch)
        self.limits = ModelLimits(
            self.arch.vocab_size,
            self.context_limit,
            can_score_prompt=self.plan.boundary_handling and self.plan.independent_kv,
        )
        device = model.device
        dtype = resolve_dtype(config.dtype)
        num_blocks = num_blocks_for_budget(self.arch, dtype, config.block_size, kv_budget_bytes(config, device))
        if num_blocks < 1:
            raise ValueError("KV cache budget is too small for a single block")
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.kv_cache = KVCache(self.arch, num_blocks, config.block_size, dtype, device)
        self.scheduler = Scheduler(
            self.blocks,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.context_limit,
            prefill_covers_last=not self.plan.boundary_handling,
            enable_chunked_prefill=config.enable_chunked_prefill,
            prefix_key=plan_cache_key(model_path or config.model, self.plan) if config.enable_prefix_caching else None,
            is_prefill_full_model=not self.plan.skip_layers,
        )
        self.eos_token_ids = set(self.arch.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        decode_mode = None
        if config.use_compiled_decode:
            decode_mode = "cuda_graph" if device.type == "cuda" else "compile"
        self.runner = ModelRunner(
            model,
            self.kv_cache,
            self.blocks,
            self.plan,
            decode_mode,
            config.max_num_seqs,
            is_chunked=config.enable_chunked_prefill,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
        )
        self._grammars = None  # structured output's compiled grammars, built on first use
        self._out: dict[str, OutputText] = {}  # per request: text and its stop strings
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()

    def warm_up(self) -> None:
        """Use every weight once before serving (``CausalLM.warm_up``): the full model and, under
        POP, the pruned pass with its skipped runs' fused K/V weights. The KV cache is untouched."""
        self.model.warm_up((None, self.plan) if self.plan.skip_layers else (None,))

    def load_vision(self, model_path: str) -> None:
        """Load the vision-language checkpoint's image tokens, image processor and vision encoder."""
        from transformers import AutoTokenizer

        tokenizer = self.tokenizer if self.tokenizer is not None else AutoTokenizer.from_pretrained(model_path)
        self.vision_spec = VisionSpec.from_pretrained(model_path, tokenizer)
        self.image_inputs = ImageInputs(model_path, self.vision_spec)
        self.vision = VisionEncoder(model_path, self.model.dtype, self.model.device)

    # ---- requests ------------------------------------------------------------------------------
    def validate(
        self, prompt_token_ids: list[int], params: SamplingParams, images: list[ProcessedImage] | None = None
    ) -> None:
        """Raise ``InvalidRequest`` (a ValueError naming the field) for a request this engine cannot
        serve: the same rules the server applies at its edge (``pop_disagg/limits.py``, and for
        images ``vision.check_image_prompt``)."""
        self.limits.check(list(prompt_token_ids), params)
        check_image_prompt(self.vision_spec, list(prompt_token_ids), images or [], self.config.enable_chunked_prefill)

    def encode_images(self, prompt_token_ids: list[int], images: list[ProcessedImage] | None) -> PromptImages | None:
        """The vision encoder over the request's images (once each) -> its image rows, or None."""
        if not images:
            return None
        features, deepstack = self.vision.encode(images)
        return prompt_images(self.vision_spec, list(prompt_token_ids), images, features, deepstack)

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        images: list[ProcessedImage] | None = None,
    ) -> str:
        params = params or SamplingParams()
        self.validate(prompt_token_ids, params, images)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        req = Request(request_id, list(prompt_token_ids), params, make_generator(params.seed, self.model.device))
        req.grammar = self._grammar(params)
        req.images = self.encode_images(prompt_token_ids, images)
        req.image_keys = image_keys(self.vision_spec, prompt_token_ids, images) if images else None
        self.scheduler.add(req)
        self._requests[request_id] = req
        if self.tokenizer is not None:
            self._out[request_id] = OutputText.for_params(self.tokenizer, params)
        return request_id

    # ---- disaggregated decode hooks (the decode worker's prompt K/V arrives from a prefill worker) --
    def prefix_key_for(self, plan: PrunePlan, kv_correction: str | None = None) -> PrefixKey | None:
        """The key under which a prefix computed with ``plan`` (and a K/V correction) is cached
        here; None when prefix caching is off. ``plan_cache_key`` of the engine's model name, which
        a prefill worker built from the same configuration computes alike."""
        if not self.config.enable_prefix_caching:
            return None
        return PrefixKey(
            plan_cache_key(self.model_path or self.config.model, plan, kv_correction), not plan.skip_layers
        )

    @property
    def prefix_key(self) -> PrefixKey | None:
        """The key of what this engine's own prefills write (None: prefix caching off)."""
        return self.scheduler.prefix_key

    def num_cached_prefix_tokens(
        self, prompt_token_ids: list[int], prefix_key: PrefixKey | None = None, image_keys: ImageKeys | None = None
    ) -> int:
        """Prompt tokens a new request would find in the prefix cache now, under ``prefix_key``
        (default this engine's plan; ``image_keys``: its images'); nothing is taken."""
        probe = Request("", list(prompt_token_ids), SamplingParams(), prefix_key=prefix_key, image_keys=image_keys)
        return self.scheduler.num_cached_prefix_tokens(probe)

    def reserve_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prefix_key: PrefixKey | None = None,
        remote_image_delta: int | None = None,
        image_keys: ImageKeys | None = None,
    ) -> Request | None:
        """Hold KV blocks for a request whose prompt prefix another worker encodes; None when full.

        The caller writes the prefix K/V into ``request.block_table`` from
        ``request.num_computed_tokens`` on (0, or with ``prefix_key``, after the blocks cached
        under it) and then calls ``admit_prefilled``; ``abort`` releases the blocks at any point.
        ``remote_image_delta``: the prompt has images, encoded where it was prefilled; only the
        position offset after the prompt comes here (``PromptImages.remote``), and with
        ``image_keys`` (the images' spans and digests) its blocks are named in the prefix cache.
        """
        self.limits.check(list(prompt_token_ids), params)
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        req = Request(request_id, list(prompt_token_ids), params, make_generator(params.seed, self.model.device))
        req.grammar = self._grammar(params)
        req.prefix_key = prefix_key
        if remote_image_delta is not None:
            req.images = PromptImages.remote(remote_image_delta, self.arch.hidden_size)
            req.image_keys = image_keys
        if not self.scheduler.reserve(req):
            return None
        self._requests[request_id] = req
        if self.tokenizer is not None:
            self._out[request_id] = OutputText.for_params(self.tokenizer, params)
        return req

    def _grammar(self, params: SamplingParams):
        """A structured-output request's grammar matcher (None for free text); the grammars are
        built for this model's tokenizer on first use (a decode worker's engine has no tokenizer
        of its own: it is read from the checkpoint then)."""
        if params.structured is None:
            return None
        if self._grammars is None:
            from .structured import Grammars

            tokenizer = self.tokenizer
            if tokenizer is None:
                from transformers import AutoTokenizer

                from ..models.registry import resolve_model

                tokenizer = AutoTokenizer.from_pretrained(self.model_path or str(resolve_model(self.config.model)))
            self._grammars = Grammars(tokenizer, self.arch.vocab_size, sorted(self.eos_token_ids))
        from .structured import GrammarError

        try:
            return self._grammars.matcher(params.structured)
        except GrammarError as exc:
            raise InvalidRequest("structured", str(exc)) from None

    def admit_prefilled(self, request_id: str, num_computed_tokens: int) -> None:
        """The first ``num_computed_tokens`` prompt positions are in the request's blocks: decode it."""
        req = self._requests[request_id]
        req.num_computed_tokens = num_computed_tokens
        self.scheduler.admit(req)

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        req.finish_reason = FinishReason.ABORT
        self.scheduler.finish(req)
        self._out.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def stats(self) -> SchedulerStats:
        """Cumulative preemptions and prefix-cache queries/hits (tokens)."""
        return self.scheduler.stats

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        return self._update(batch, *self.runner.run(batch))

    def _update(self, batch: SchedulerOutput, reqs: list[Request], tokens: list[int]) -> list[RequestOutput]:
        self.scheduler.update(batch)  # blocks this step filled join the prefix cache
        outputs = []
        now = time.perf_counter()
        for req, tok in zip(reqs, tokens):
            req.output_token_ids.append(tok)
            req.first_token_time = req.first_token_time or now
            out = self._out.get(req.request_id)
            is_stopped = out is not None and out.add(tok)  # a stop string ended the text
            reason = FinishReason.STOP if is_stopped else self._check_stop(req, tok)
            if reason is not None:
                req.finish_reason = reason
                req.finish_time = now
                self.scheduler.finish(req)
                self._requests.pop(req.request_id, None)
                self._out.pop(req.request_id, None)
            new_text = out.take(req.is_finished) if out is not None else ""
            text = out.text if out is not None else ""
            outputs.append(
                RequestOutput(
                    req.request_id,
                    req.prompt_token_ids,
                    list(req.output_token_ids),
                    text,
                    [tok],
                    new_text,
                    req.is_finished,
                    req.finish_reason.value if req.finish_reason else None,
                    *(
                        (list(req.output_logprobs), req.output_logprobs[-1:])
                        if req.params.logprobs is not None
                        else (None, None)
                    ),
                    req.num_cached_tokens or 0,
                    (
                        list(req.prompt_logprobs)
                        if req.prompt_logprobs is not None and (req.num_output_tokens == 1 or req.is_finished)
                        else None
                    ),
                )
            )
        return outputs

    def _check_stop(self, req: Request, tok: int) -> FinishReason | None:
        p = req.params
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            return FinishReason.STOP
        if req.num_output_tokens >= p.max_new_tokens or req.num_tokens >= self.context_limit:
            return FinishReason.LENGTH
        return None

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        images: list[list[ProcessedImage] | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion (continuous batching) and return final outputs in order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        images = images or [None] * len(prompts)
        ids = [self.add_request(p, sp, images=im) for p, sp, im in zip(prompts, params_list, images)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
