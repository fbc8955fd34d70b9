"""Sampling parameters (validated once, frozen) and the sampler that turns logits into tokens.

Every request carries its own ``torch.Generator`` seeded from ``seed``, so a seeded request samples
the same tokens whatever else shares its batch.

``sample_requests`` is the runner's one entry point: the raw logits of a step go through the
logits processors a request asks for (``process_logits``: ``min_tokens``, ``logit_bias``, then the
repetition / frequency / presence penalties, vLLM's order and formulas), its grammar's mask
(structured output, ``structured.py``), then ``sample``
(temperature, top-k, top-p). Logprobs are taken from the *raw* logits, before any of that (vLLM's
default ``--logprobs-mode raw_logprobs``), and only for requests that ask: a step where nobody
asks, or nobody has a penalty, costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.nn.utils.rnn import pad_sequence

from . import structured
from .structured import StructuredSpec

SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20  # top logprobs per token at most (OpenAI's top_logprobs limit, vLLM's default max_logprobs)


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(64, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = no top-k filter")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Logits processors (vLLM's ranges; OpenAI's for presence/frequency).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="minus this for every token already generated")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="minus this times each token's output count")
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="divides positive (multiplies negative) logits of seen tokens"
    )
    min_tokens: int = Field(0, ge=0, description="EOS and stop token ids are masked until this many tokens")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id -> bias added to its logit")
    # Outputs.
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="return each token's raw logprob and this many top ones; None: none"
    )
    skip_special_tokens: bool = True  # in the detokenized text
    # Prompt scoring (``prompt_logprobs.py``): the prompt's tokens after its first
    # ``num_context_tokens`` get their logprob under the full model (teacher-forced, raw logits).
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="score the prompt: each scored token's logprob and this many top ones"
    )
    num_context_tokens: int = Field(
        1, ge=1, description="with prompt_logprobs: leading prompt tokens prefilled under the plan, not scored"
    )
    # Structured output (``structured.py``): the text must match this; None: free text.
    structured: StructuredSpec | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {t: b for t, b in v.items() if not -100.0 <= b <= 100.0}
        if bad:
            raise ValueError(f"biases must be in [-100, 100], got {bad}")
        return v

    @model_validator(mode="after")
    def _min_below_max(self) -> SamplingParams:
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
        return self

    @model_validator(mode="after")
    def _grammar_ends_with_eos(self) -> SamplingParams:
        # A complete grammar allows only EOS: masking it (ignore_eos, min_tokens) would leave nothing.
        if self.structured is not None and (self.ignore_eos or self.min_tokens):
            raise ValueError("structured output ends with EOS: it cannot be combined with ignore_eos or min_tokens")
        return self

    @property
    def has_logits_processing(self) -> bool:
        """Whether ``process_logits`` changes this request's logits at all."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.min_tokens
            or self.logit_bias
        )

    def num_pruned_prompt_tokens(self, num_prompt_tokens: int) -> int:
        """Prompt positions the prefill encodes under the plan; the rest run the full model.

        A generation request: all but the last, ``x_1..x_{N-1}`` (``x_N`` is the first decode
        step). A scoring request: all but the last of its context, so that every scored token's
        distribution comes from a full-model position (1 context token: nothing pruned, the whole
        prompt on the full model; C: POP's reading of a likelihood task, context prefilled by POP
        and the continuation teacher-forced through the full model)."""
        if self.prompt_logprobs is None:
            return num_prompt_tokens - 1
        return min(self.num_context_tokens, num_prompt_tokens) - 1

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def is_greedy(self) -> bool:
        # Below vLLM's _SAMPLING_EPS, logits / temperature can overflow float32 to inf (NaN
        # probabilities that would kill the step loop); such a temperature means greedy anyway.
        return self.temperature < SAMPLING_EPS


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of (B, V) logits: the first maximum, NaN counting as the maximum (torch's
    and numpy's rule alike). On a CPU numpy's SIMD argmax is ~9x faster than torch's here
    (SmolLM2's 49152-token vocabulary, one thread: 0.09 vs 0.8 ms at batch 16, 0.34 vs 3.3 ms at 64)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and not logits.requires_grad:
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits: (B, V) float32 -> one token id per row.

    Vectorised over the batch: temperature, top-k and top-p are (B,) tensors applied to all
    sampled rows at once. Randomness stays per request: each sampled row draws one uniform number
    from its own generator and inverts its row's CDF with it, so a seeded request gets the same
    token whatever else shares the batch (tested).
    """
    greedy = greedy_tokens(logits)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return greedy.tolist()
    dev = logits.device
    vocab = logits.shape[-1]
    sel = torch.tensor(rows, device=dev)
    x = logits.index_select(0, sel).float()  # (S, V)
    x = x / torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
    top_k = [params[i].top_k if 0 < params[i].top_k < vocab else 0 for i in rows]
    if any(top_k):
        k = torch.tensor(top_k, device=dev)
        kth = x.topk(max(top_k), dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])  # (S, 1)
        kth = kth.masked_fill((k == 0)[:, None], float("-inf"))  # rows without top-k keep all
        x = x.masked_fill(x < kth, float("-inf"))
    top_p = [params[i].top_p for i in rows]
    if any(p < 1.0 for p in top_p):
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= torch.tensor(top_p, device=dev)[:, None]
        x = x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    cdf = x.softmax(-1).cumsum(-1)  # (S, V)
    u = torch.cat([torch.rand(1, generator=generators[i], device=dev) for i in rows])  # (S,) one draw per request
    # right=True: the first token whose cumulative mass exceeds u * total (never a zero-mass one).
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=vocab - 1)
    out = greedy.index_copy(0, sel, picked)
    return out.tolist()


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the raw logits, and the ``k`` most likely tokens."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; k = SamplingParams.logprobs


def process_logits(logits: torch.Tensor, reqs: list, eos_token_ids=()) -> torch.Tensor:
    """(B, V) raw logits -> the logits sampling sees, for the rows whose requests ask for any processing.

    ``reqs[i]`` has ``params``, ``prompt_token_ids`` and ``output_token_ids``. In vLLM's order:
    ``min_tokens`` (EOS and stop token ids at -inf while fewer tokens were generated), ``logit_bias``
    (added), then the penalties of vLLM's ``apply_penalties``: repetition (CTRL, Keskar et al. 2019,
    over prompt and output tokens: a positive logit divided by it, a negative one multiplied), then
    ``logit -= frequency * count + presence * (count > 0)`` over output tokens (OpenAI's formula).
    Vectorised: one (S, V) pass per processor over the S rows that need it.
    """
    rows = [i for i, r in enumerate(reqs) if r.params.has_logits_processing]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    sel = torch.tensor(rows, device=dev)
    x = logits.index_select(0, sel).float()  # (S, V)
    ps = [reqs[i].params for i in rows]
    banned = [
        (s, t)
        for s, i in enumerate(rows)
        if len(reqs[i].output_token_ids) < ps[s].min_tokens
        for t in {*eos_token_ids, *ps[s].stop_token_ids}
    ]
    if banned:
        r, t = zip(*banned)
        x[torch.tensor(r, device=dev), torch.tensor(t, device=dev)] = float("-inf")
    biased = [(s, t, b) for s, p in enumerate(ps) for t, b in p.logit_bias.items()]
    if biased:
        r, t, b = zip(*biased)
        x.index_put_((torch.tensor(r, device=dev), torch.tensor(t, device=dev)), torch.tensor(b, device=dev), True)

    def token_table(lists: list[list[int]]) -> torch.Tensor:
        # (S, L) ids padded with ``vocab``, an extra column that is cut off after scattering.
        rows_t = [torch.tensor(ids, dtype=torch.long, device=dev) for ids in lists]
        return pad_sequence(rows_t, batch_first=True, padding_value=vocab)

    if any(p.repetition_penalty != 1.0 for p in ps):
        ids = token_table([reqs[i].prompt_token_ids + reqs[i].output_token_ids for i in rows])
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=dev).scatter_(1, ids, True)[:, :vocab]
        rp = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]  # (S, 1)
        x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
    if any(p.presence_penalty or p.frequency_penalty for p in ps) and any(reqs[i].output_token_ids for i in rows):
        ids = token_table([reqs[i].output_token_ids for i in rows])
        counts = torch.zeros(len(rows), vocab + 1, device=dev).scatter_add_(1, ids, torch.ones_like(ids, dtype=x.dtype))
        counts = counts[:, :vocab]  # (S, V) output count of every token
        fp = torch.tensor([p.frequency_penalty for p in ps], device=dev)[:, None]
        pp = torch.tensor([p.presence_penalty for p in ps], device=dev)[:, None]
        x = x - fp * counts - pp * (counts > 0)
    return logits.index_copy(0, sel, x.to(logits.dtype))


def token_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Log-softmax of the raw (B, V) logits at each row's chosen token and its top ``ks[i]``; None
    for rows with ``ks[i] is None`` (only the rows that ask are normalised)."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(tokens)
    if not rows:
        return out
    dev = logits.device
    lp = logits.index_select(0, torch.tensor(rows, device=dev)).float().log_softmax(-1)  # (S, V)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=dev)[:, None])[:, 0].tolist()
    k_max = max(ks[i] for i in rows)
    top_v, top_i = lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for s, i in enumerate(rows):
        k = ks[i]
        out[i] = TokenLogprob(tokens[i], chosen[s], list(zip(top_i[s][:k], top_v[s][:k])))
    return out


def sample_requests(logits: torch.Tensor, reqs: list, eos_token_ids=()) -> list[int]:
    """The runner's step: (B, V) raw logits -> one token per request (``Request``-like: params,
    generator, prompt/output ids). A request with ``params.logprobs`` set gets the token's
    ``TokenLogprob`` appended to ``req.output_logprobs`` (the engine appends the token itself), so
    that list stays aligned with ``output_token_ids``."""
    params = [r.params for r in reqs]
    processed = structured.mask_logits(process_logits(logits, reqs, eos_token_ids), reqs)
    tokens = sample(processed, params, [r.generator for r in reqs])
    structured.accept_tokens(reqs, tokens)
    ks = [p.logprobs for p in params]
    for r, lp in zip(reqs, token_logprobs(logits, tokens, ks)):
        if lp is not None:
            r.output_logprobs.append(lp)
    return tokens
