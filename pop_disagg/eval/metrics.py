"""Fidelity metrics: how far a method's predictions are from the full model's.

Pure functions on tensors and lists, no model. Conventions: ``logprobs`` are natural-log
probabilities over the vocabulary (last dim); a "method" is compared against the "reference"
(the full model). Every metric here is tested on hand-made distributions in ``tests/test_fidelity.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def perplexity(token_logprobs: Sequence[torch.Tensor]) -> float:
    """exp(mean negative log-likelihood) over all tokens of all sequences (token-weighted)."""
    total = sum(float(t.double().sum()) for t in token_logprobs)
    count = sum(t.numel() for t in token_logprobs)
    if count == 0:
        raise ValueError("perplexity of zero tokens")
    return math.exp(-total / count)


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per row, in nats: sum_v P_ref(v) (log P_ref(v) - log P(v)).

    The reference goes first because we ask how much the full model's distribution is lost: a method
    that gives near-zero mass to a token the full model likes is penalised hard.
    """
    ref = ref_logprobs.double()
    p = ref.exp()
    # 0 * log 0 = 0: rows where the reference gives exactly zero mass contribute nothing.
    terms = torch.where(p > 0, p * (ref - logprobs.double()), torch.zeros_like(p))
    return terms.sum(-1)


def top1_agreement(ref_argmax: Sequence[int] | torch.Tensor, argmax: Sequence[int] | torch.Tensor) -> float:
    """Fraction of positions whose most likely token is the same (teacher-forced agreement)."""
    a, b = torch.as_tensor(ref_argmax), torch.as_tensor(argmax)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"agreement needs two equal, non-empty shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a == b).float().mean())


def greedy_agreement(ref_tokens: Sequence[int], tokens: Sequence[int]) -> tuple[float, int]:
    """Free-running greedy outputs compared position by position.

    Returns (fraction of the reference's positions where the tokens match, length of the matching
    prefix). After the first divergence the two continuations condition on different text, so the
    prefix length is the stricter measure; the positional fraction credits re-convergence.
    """
    if not ref_tokens:
        raise ValueError("greedy agreement against an empty reference")
    matches = [a == b for a, b in zip(ref_tokens, tokens)]
    prefix = next((i for i, m in enumerate(matches) if not m), len(matches))
    return sum(matches) / len(ref_tokens), prefix


def choice_accuracy(choice_scores: Sequence[Sequence[float]], correct: Sequence[int]) -> float:
    """Multiple choice by log-likelihood: the argmax choice vs the gold index, averaged."""
    picks = [max(range(len(s)), key=s.__getitem__) for s in choice_scores]
    return sum(p == c for p, c in zip(picks, correct)) / len(picks)


def choice_picks(choice_scores: Sequence[Sequence[float]]) -> list[int]:
    return [max(range(len(s)), key=s.__getitem__) for s in choice_scores]


def cosine_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows (last dim), float64; zero rows give 0 rather than NaN."""
    a, b = a.double(), b.double()
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(denom > 0, (a * b).sum(-1) / denom.clamp_min(1e-300), torch.zeros_like(denom))
