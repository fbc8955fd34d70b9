"""What a deployment runs, decided before anything launches: a models job, no Ray.

``DeploymentSpec.of(config)`` reads the checkpoint's geometry and tokenizer, resolves the served
plan family and its default plan, checks what can be refused up front (an ablation plan on the
disaggregated topology, a K/V correction fitted for other layers), counts the weights one prefill
worker holds (on the meta device: nothing is allocated or read), and builds the ``WorkerSpec``
every worker actor is made from. ``deploy.py`` then launches the actors on Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import EngineConfig, ServeConfig
from ...pop.plan import PlanFamily, PrunePlan


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker actor is built from (picklable)."""

    engine: EngineConfig
    plan: PrunePlan  # the prefill plan (empty for --prefill full)
    num_threads: int  # torch intra-op threads in this actor
    transfer_timeout_s: float
    eos_token_ids: tuple[int, ...] = ()
    kv_correction: str | None = None  # fitted K/V weights for the prefill worker's skipped layers
    family: PlanFamily | None = (
        None  # plans a request may pick (``plan`` is its default); the prefill model is built for the mildest
    )
    max_local_prefill_tokens: int = 0  # decode worker: prefill an uncached rest this short itself
    is_colocated: bool = False  # the decode worker's engine prefills (and encodes images) itself


@dataclass(frozen=True)
class DeploymentSpec:
    arch: object  # models.arch.ModelArch
    tokenizer: object
    family: PlanFamily
    plan: PrunePlan  # the family's default plan
    worker: WorkerSpec
    prefill_weight_bytes: int  # what one prefill worker holds (the family's union)

    @classmethod
    def of(cls, config: ServeConfig) -> "DeploymentSpec":
        from transformers import AutoTokenizer

        from ...models.arch import ModelArch
        from ...models.registry import resolve_model

        path = resolve_model(config.engine.model)
        arch = ModelArch.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = config.worker_engine
        family = config.family(arch)
        plan = family.default_plan
        if plan.skip_layers != engine.plan(arch).skip_layers:
            raise AssertionError(
                f"default plan {plan.describe()} != the workers' engine plan {engine.plan(arch).describe()}"
            )
        if config.is_disaggregated and (not plan.independent_kv or not plan.boundary_handling):
            raise ValueError(
                "the disaggregated topology needs independent_kv and boundary_handling (ablation plans run colocated)"
            )
        eos = set(arch.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        if config.kv_correction is not None:
            from ...calib.kv_correction import KVCorrection

            fitted = KVCorrection.load(config.kv_correction).plan
            if fitted.skip_layers != plan.skip_layers:
                raise ValueError(
                    f"kv_correction: fitted for skipped layers {list(fitted.skip_layers)}, the plan skips {list(plan.skip_layers)}"
                )
        worker = WorkerSpec(
            engine,
            plan,
            config.num_threads,
            config.transfer_timeout_s,
            tuple(sorted(eos)),
            config.kv_correction,
            family,
            config.max_local_prefill_tokens,
            not config.is_disaggregated,
        )
        return cls(arch, tokenizer, family, plan, worker, weight_bytes_of(arch, family.union_plan, engine.dtype))


def weight_bytes_of(arch, plan: PrunePlan | None, dtype: str) -> int:
    """Parameter bytes of the prefill-only instance for ``plan`` (None: the full model), counted on
    the meta device (nothing is allocated or read)."""
    import torch

    from ...models.decoder import CausalLM
    from ...models.loader import resolve_dtype

    with torch.device("meta"):
        model = CausalLM(arch, plan)
    return sum(p.numel() for p in model.parameters()) * resolve_dtype(dtype).itemsize
