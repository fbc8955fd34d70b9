"""Prompt scoring: the logprob of each prompt token under the full model, teacher-forced.

A request with ``SamplingParams.prompt_logprobs`` set has its prompt split at
``num_context_tokens`` (C): positions ``0..C-2`` are prefilled under the plan like any prompt
prefix (POP: pruned, no LM head needed), and positions ``C-1..N-2`` run the full model over the
paged cache, as the recompute path runs a preempted request's full-model positions
(``SamplingParams.num_pruned_prompt_tokens``, ``scheduler.prefill_len``). The hidden state at
full-model position ``p`` goes through the LM head and gives the distribution of token ``p+1``;
``x_N`` is then the first decode step as always. C = 1 scores every token but the first on the
full model (the first has no context: ``None``, as in vLLM and OpenAI); C > 1 is POP's reading of
a likelihood task (context prefilled by POP, continuation on the full model), the tokens of the
context unscored (``None``).

Logprobs are raw (log-softmax of the logits, as for generated tokens). A position is scored once:
a preempted request recomputes its positions but keeps the scores it has. Requests that do not
ask cost one attribute test per recompute step.
"""

from __future__ import annotations

import torch

from .sampling import token_logprobs

MAX_ROWS = 256  # LM-head rows per chunk: (rows, vocab) float32 logits stay bounded


def initial(num_prompt_tokens: int, params) -> list | None:
    """A scoring request's list before any position ran: ``None`` for the unscored tokens."""
    if params.prompt_logprobs is None:
        return None
    return [None] * min(params.num_context_tokens, num_prompt_tokens)


def score_positions(model, hidden: torch.Tensor, reqs: list, starts: list[int], num_tokens: list[int]) -> None:
    """Append the scores of the prompt positions in ``hidden`` (T, hidden) to the requests that ask.

    Rows are the requests' positions ``starts[i]..starts[i] + num_tokens[i] - 1``, request after
    request (the layout of ``ModelRunner.chunk_inputs``)."""
    rows, targets, owners, ks = [], [], [], []
    offset = 0
    for req, start, n in zip(reqs, starts, num_tokens):
        scores = req.prompt_logprobs
        if scores is not None:
            # Position p scores token p + 1; the next unscored token is len(scores).
            if start > len(scores) - 1 and start < req.num_prompt_tokens - 1:
                raise RuntimeError(
                    f"request {req.request_id}: position {start} runs before {len(scores) - 1} was scored"
                )
            for p in range(max(start, len(scores) - 1), min(start + n, req.num_prompt_tokens - 1)):
                rows.append(offset + p - start)
                targets.append(req.prompt_token_ids[p + 1])
                owners.append(req)
                ks.append(req.params.prompt_logprobs)
        offset += n
    for lo in range(0, len(rows), MAX_ROWS):
        sel = torch.tensor(rows[lo : lo + MAX_ROWS], device=hidden.device)
        logits = model.compute_logits(hidden.index_select(0, sel))  # (R, V)
        chunk = slice(lo, lo + MAX_ROWS)
        for req, lp in zip(owners[chunk], token_logprobs(logits, targets[chunk], ks[chunk])):
            req.prompt_logprobs.append(lp)
