"""The single-process engine: one model, one paged KV cache, continuous batching.

``step()`` is the whole loop: schedule -> run -> update. It imports neither Ray nor gRPC; the
server's workers wrap the same pieces (scheduler, runner, request state).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from ..config import EngineConfig
from ..models.arch import ModelArch
from ..models.decoder import CausalLM
from ..models import cpu_blas
from ..models.loader import load_model, resolve_dtype
from .detokenizer import IncrementalDetokenizer, find_stop
from .kv_cache import BlockManager, KVCache, num_blocks_for_budget
from .model_runner import ModelRunner
from .request import FinishReason, Request, RequestStatus
from .sampling import SamplingParams, make_generator
from .scheduler import Scheduler


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


def kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory_mb is not None:
        return int(config.kv_cache_memory_mb * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    return 512 * 2**20


class LLMEngine:
    def __init__(self, config: EngineConfig, model: CausalLM | None = None, tokenizer=None, model_path: str | None = None):
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
        self.plan = config.plan(self.arch)
        self.context_limit = config.context_limit(self.arch)
        device = model.device
        dtype = resolve_dtype(config.dtype)
        num_blocks = num_blocks_for_budget(self.arch, dtype, config.block_size, kv_budget_bytes(config, device))
        if num_blocks < 1:
            raise ValueError("KV cache budget is too small for a single block")
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.kv_cache = KVCache(self.arch, num_blocks, config.block_size, dtype, device)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, self.context_limit, prefill_covers_last=not self.plan.boundary_handling,
                                   enable_chunked_prefill=config.enable_chunked_prefill)
        decode_mode = None
        if config.use_compiled_decode:
            decode_mode = "cuda_graph" if device.type == "cuda" else "compile"
        self.runner = ModelRunner(model, self.kv_cache, self.blocks, self.plan, decode_mode, config.max_num_seqs)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.eos_token_ids = set(self.arch.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the field for a request this engine cannot serve."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt: empty prompt")
        if n >= self.context_limit:
            raise ValueError(f"prompt: {n} tokens exceeds the context limit of {self.context_limit} (room is needed for at least one new token)")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: ids {bad[:5]} outside the vocabulary [0, {self.arch.vocab_size})")
        if params.max_new_tokens > self.context_limit - 1:
            raise ValueError(f"max_new_tokens: {params.max_new_tokens} exceeds the context limit of {self.context_limit}")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        params = params or SamplingParams()
        self.validate(prompt_token_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        req = Request(request_id, list(prompt_token_ids), params, make_generator(params.seed, self.model.device))
        self.scheduler.add(req)
        self._requests[request_id] = req
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer)
        return request_id

    # ---- disaggregated decode hooks (the decode worker's prompt K/V arrives from a prefill worker) --
    def reserve_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> Request | None:
        """Hold KV blocks for a request whose prompt prefix another worker encodes; None when full.

        The caller writes the prefix K/V into ``request.block_table`` and then calls
        ``admit_prefilled``; ``abort`` releases the blocks at any point before or after.
        """
        self.validate(prompt_token_ids, params)
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        req = Request(request_id, list(prompt_token_ids), params, make_generator(params.seed, self.model.device))
        if not self.scheduler.reserve(req):
            return None
        self._requests[request_id] = req
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer)
        return req

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
        self._detok.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        if self.scheduler.enable_chunked_prefill:  # decode rows and prompt chunks in one forward
            return self._update(*self.runner.mixed(batch.decode, batch.prefill, batch.num_prefill_tokens))
        if batch.prefill:
            sampled = self.runner.prefill(batch.prefill, batch.num_prefill_tokens)
            if sampled is None:
                return []
            return self._update(batch.prefill, sampled)
        return self._update(batch.decode, self.runner.decode(batch.decode))

    def _update(self, reqs: list[Request], tokens: list[int]) -> list[RequestOutput]:
        outputs = []
        now = time.perf_counter()
        for req, tok in zip(reqs, tokens):
            req.output_token_ids.append(tok)
            req.first_token_time = req.first_token_time or now
            new_text = ""
            detok = self._detok.get(req.request_id)
            if detok is not None:
                new_text = detok.add(tok)
            reason = self._check_stop(req, tok, detok, new_text)
            if reason is not None:
                req.finish_reason = reason
                req.finish_time = now
                self.scheduler.finish(req)
                self._requests.pop(req.request_id, None)
                self._detok.pop(req.request_id, None)
            text = detok.text if detok is not None else ""
            if req.stop_text_len is not None:
                new_text = new_text[: max(0, len(new_text) - (len(text) - req.stop_text_len))]
                text = text[: req.stop_text_len]
            outputs.append(RequestOutput(req.request_id, req.prompt_token_ids, list(req.output_token_ids), text, [tok], new_text, req.is_finished, req.finish_reason.value if req.finish_reason else None))
        return outputs

    def _check_stop(self, req: Request, tok: int, detok, new_text: str) -> FinishReason | None:
        p = req.params
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            return FinishReason.STOP
        if p.stop and detok is not None and new_text:
            cut = find_stop(detok.text, p.stop, len(new_text))
            if cut is not None:
                req.stop_text_len = cut
                return FinishReason.STOP
        if req.num_output_tokens >= p.max_new_tokens or req.num_tokens >= self.context_limit:
            return FinishReason.LENGTH
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion (continuous batching) and return final outputs in order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
