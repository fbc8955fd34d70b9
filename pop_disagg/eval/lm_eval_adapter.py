"""lm-evaluation-harness model type ``pop-disagg``: evaluate a model served with POP.

The paper measured accuracy with lm-evaluation-harness; this adapter lets the same harness drive
our engine's code path. Importing the module registers the model type, so

    import pop_disagg.eval.lm_eval_adapter  # noqa: F401
    lm_eval.simple_evaluate(model="pop-disagg", model_args="model=smollm2-135m-instruct,prune_ratio=0.5", tasks=[...])

or ``pop-disagg eval lm-eval --tasks ... --include-path DIR``. ``model_args`` keys: ``model``,
``dtype``, ``prune_ratio`` | ``skip_layers`` ("20,21") | ``prune_plan`` | ``no_prune``,
``independent_kv``, ``boundary_handling`` (the paper's ablations), ``static`` (remove the plan's
layers in both stages), ``kv_correction`` (a ``kv_correction.safetensors``), ``batch_size``,
``max_length``.

Requests run on ``CachedScorer`` (``scorer.py``): the prompt through the pruned prefill, the rest
through the full model over the cache, exactly as the engine serves it. ``generate_until`` is
greedy only (the paper's tasks decode greedily); sampling arguments are refused, not ignored.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401 - the harness's own model types first: registering ours before them hides them
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..pop.plan import PrunePlan
from .data import split_encode
from .scorer import CachedScorer, Method


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("pop-disagg")
class POPLM(LM):
    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        dtype: str = "float32",
        prune_ratio: float | None = None,
        skip_layers: str | None = None,
        prune_plan: str | None = None,
        no_prune: bool = False,
        independent_kv: bool = True,
        boundary_handling: bool = True,
        static: bool = False,
        kv_correction: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        **unused,
    ):
        super().__init__()
        from transformers import AutoTokenizer

        from ..config import PruneConfig
        from ..models.loader import load_model
        from ..models.registry import resolve_model

        if unused:
            raise ValueError(f"pop-disagg model_args: unknown keys {sorted(unused)}")
        path = str(resolve_model(model))
        self.model = load_model(path, dtype, "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        layers = (
            tuple(int(x) for x in str(skip_layers).replace(";", ",").split(",") if x)
            if skip_layers is not None
            else None
        )
        prune = PruneConfig(
            ratio=float(prune_ratio) if prune_ratio is not None else None,
            skip_layers=layers,
            plan_file=prune_plan,
            no_prune=_flag(no_prune),
            independent_kv=_flag(independent_kv),
            boundary_handling=_flag(boundary_handling),
        )
        plan: PrunePlan = prune.resolve(self.model.arch.num_layers)
        prefill_models = {}
        if kv_correction:
            from ..calib.kv_correction import KVCorrection, load_corrected_prefill_model

            corr = KVCorrection.load(kv_correction)
            if corr.plan.skip_layers != plan.skip_layers:
                raise ValueError(
                    f"{kv_correction} was fitted for layers {corr.plan.skip_layers}, the plan skips {plan.skip_layers}"
                )
            prefill_models["served"] = load_corrected_prefill_model(path, corr, dtype, "cpu")
        self.method = Method(
            name="served", group="pop", plan=plan, is_static=_flag(static), has_kv_correction=bool(kv_correction)
        )
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length else min(self.model.arch.max_position_embeddings, 2048)
        tok = self.tokenizer
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.stop_ids = set(self.model.arch.eos_token_ids) | (
            {tok.eos_token_id} if tok.eos_token_id is not None else set()
        )
        self.scorer = CachedScorer(self.model, self.batch_size * (self.max_length + 1) + 64, prefill_models)

    # ---- scoring --------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context:
            ctx, cont = split_encode(self.tokenizer, context, continuation)
        else:
            ctx, cont = [self.prefix_token_id], self.tokenizer.encode(continuation, add_special_tokens=False)
        if not cont:
            raise ValueError(f"empty continuation for context {context[-40:]!r}")
        # Keep the continuation; drop the oldest context tokens past the model's length.
        ctx = ctx[max(0, len(ctx) + len(cont) - self.max_length) :] or [self.prefix_token_id]
        return ctx, cont[-self.max_length + 1 :] if len(cont) >= self.max_length else cont

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        out = []
        for a in range(0, len(pairs), self.batch_size):
            chunk = pairs[a : a + self.batch_size]
            scores = self.scorer.score([c for c, _ in chunk], [t for _, t in chunk], self.method)
            for (_, cont), s in zip(chunk, scores):
                out.append((float(s.token_logprobs.sum()), s.argmax.tolist() == cont))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score_pairs([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for r in requests:
            ids = self.tokenizer.encode(r.args[0], add_special_tokens=False)
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1)
            ]
            totals.append(sum(lp for lp, _ in self._score_pairs(windows)))
        return totals

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("pop-disagg lm-eval adapter decodes greedily; sampling was requested")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tokenizer.encode(context) if context else [self.prefix_token_id]
            ids = ids[-(self.max_length - max_new) :] if len(ids) + max_new > self.max_length else ids
            tokens = self.scorer.greedy([ids], self.method, max_new, self.stop_ids)[0]
            text = self.tokenizer.decode([t for t in tokens if t not in self.stop_ids], skip_special_tokens=True)
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out


def evaluate(
    model_args: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_defaults: bool = True,
) -> dict:
    """lm_eval.simple_evaluate with this model type (and local task YAMLs from ``include_path``;
    ``include_defaults=False`` skips indexing the harness's thousands of built-in task files)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    lm = POPLM.create_from_arg_string(model_args, {"batch_size": batch_size})
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=False)
