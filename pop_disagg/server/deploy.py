"""Bring the workers up and down: the serving configuration, actor placement, link wiring.

``Deployment.start`` creates ``num_prefill`` prefill actors and ``num_decode`` decode actors
(colocated: ``num_decode`` engine actors and no prefill), then wires one process group per
(prefill, decode) pair: each pair has its own rendezvous (a TCP store the prefill end hosts on a
fresh port, on the address Ray reports for its node) and its own two-rank group, with no world
group over all workers, so the supervisor can rebuild one pair (``link``) after a restart or a
broken link while the others keep serving. Each worker runs in its own placement-group bundle
(``placement.py``: pack or spread over the nodes); a replacement worker (``new_actor``) goes into
the bundle of the one it replaces. Backend per pair: NCCL when both ends hold a GPU of their own,
gloo otherwise (CPU, or workers sharing a GPU). ``shutdown`` closes the links (prefill side first,
so each decode receiver sees a CLOSE message), kills the actors and frees the placement group.

Depth (``--prune-ratios`` or a family JSON in ``--prune-plan``): every prefill worker holds the
prefill-only instance of the family's mildest plan, which runs every plan of the family; a server
with one plan serves a family of one. The weights a prefill worker holds are logged at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import EngineConfig, PruneConfig
from ..pop.plan import PlanFamily, PrunePlan
from .placement import PlacementConfig

log = logging.getLogger("pop_disagg.serve")


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = EngineConfig()
    topology: Literal["disaggregated", "colocated"] = "disaggregated"
    prefill: Literal["pop", "full"] = "pop"
    num_prefill: int = Field(1, ge=1)
    num_decode: int = Field(1, ge=1)
    transfer_timeout_s: float = Field(30.0, gt=0, description="a KV transfer that stalls this long fails its request")
    worker_timeout_s: float = Field(30.0, gt=0, description="a worker that answers no health probe this long is declared dead and restarted")
    kv_failure_policy: Literal["recompute", "fail"] = Field("recompute", description="a request whose KV transfer failed is re-prefilled (recompute) or failed with UNAVAILABLE")
    num_threads: int = Field(1, ge=1, description="torch threads per worker actor")
    kv_correction: str | None = Field(None, description="least-squares K/V for the skipped layers (pop-disagg eval fidelity's kv_correction.safetensors)")
    placement: PlacementConfig = PlacementConfig()
    prune_ratios: tuple[float, ...] | None = Field(None, description="a last-layers plan family; the first ratio is the default")
    prune_family: str | None = Field(None, description="a plan family JSON from `pop-disagg plan --ratios`")
    adaptive_depth: bool = Field(False, description="requests without prune_ratio get the mildest plan predicted to meet the TTFT SLO")
    ttft_slo_ms: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_depth(self) -> "ServeConfig":
        if self.has_family:
            if self.prune_ratios is not None and self.prune_family is not None:
                raise ValueError("choose one of --prune-ratios and a family --prune-plan")
            if self.engine.prune != PruneConfig():
                raise ValueError("a plan family (--prune-ratios / family --prune-plan) replaces --prune-ratio / --skip-layers / --no-prune")
            if not (self.is_disaggregated and self.prefill == "pop"):
                raise ValueError("a plan family needs --topology disaggregated --prefill pop (the prefill worker picks the plan per request)")
            if self.kv_correction is not None:
                raise ValueError("kv_correction: not supported with a plan family yet (it is fitted for one plan's skipped layers); serve one plan with --prune-ratio / --prune-plan")
        if self.adaptive_depth and (self.ttft_slo_ms is None or not self.has_family or (self.prune_ratios is not None and len(self.prune_ratios) < 2)):
            raise ValueError("--adaptive-depth needs --ttft-slo-ms and a plan family of two or more plans (--prune-ratios 0.2,0.33,0.5)")
        if self.ttft_slo_ms is not None and not self.adaptive_depth:
            raise ValueError("--ttft-slo-ms is the target of --adaptive-depth; give both")
        return self

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.prefill == "full" and not self.engine.prune.no_prune and self.engine.prune != PruneConfig():
            raise ValueError("--prefill full runs every layer; drop --prune-ratio / --prune-plan")
        if self.kv_correction is not None and not (self.is_disaggregated and self.prefill == "pop"):
            # Only a prefill-only instance can swap in the fitted K/V weights: a colocated engine
            # shares them with decode, which must keep the originals.
            raise ValueError("kv_correction: needs --topology disaggregated --prefill pop")
        return self

    @property
    def is_disaggregated(self) -> bool:
        return self.topology == "disaggregated"

    @property
    def has_family(self) -> bool:
        return self.prune_ratios is not None or self.prune_family is not None

    @property
    def worker_engine(self) -> EngineConfig:
        """The engine config every worker runs: ``full`` means the empty plan; a family, its default plan."""
        if self.prefill == "full":
            return self.engine.model_copy(update={"prune": PruneConfig(no_prune=True)})
        if self.prune_ratios is not None:
            return self.engine.model_copy(update={"prune": PruneConfig(ratio=self.prune_ratios[0])})
        if self.prune_family is not None:
            return self.engine.model_copy(update={"prune": PruneConfig(skip_layers=PlanFamily.load(self.prune_family).default_plan.skip_layers)})
        return self.engine

    def family(self, arch) -> PlanFamily:
        """The plans the server offers (mildest first); one plan is a family of one."""
        if self.prune_ratios is not None:
            return PlanFamily.from_ratios(arch.num_layers, list(self.prune_ratios))
        if self.prune_family is not None:
            return PlanFamily.load(self.prune_family, arch.num_layers)
        plan = self.worker_engine.plan(arch)
        nominal = self.worker_engine.prune.ratio if self.worker_engine.prune.ratio is not None else round(plan.ratio, 4)
        return PlanFamily(ratios=(nominal,), plans=(plan,), default_ratio=nominal)

    @property
    def label(self) -> str:
        size = f"{self.num_prefill}P{self.num_decode}D" if self.is_disaggregated else f"{self.num_decode}x"
        return f"{self.topology}+{self.prefill} ({size})"


@dataclass
class Deployment:
    config: ServeConfig
    plan: PrunePlan
    prefill: list  # actor handles by index; the supervisor swaps in replacements
    decode: list
    tokenizer: object
    arch: object
    placement: object = None  # placement.Placement: the reserved bundles, options per worker rank
    locations: list = field(default_factory=list)  # placement.WorkerLocation per rank
    family: PlanFamily | None = None
    prefill_weight_bytes: int = 0  # what one prefill worker holds (the family's union)
    spec: object = None  # WorkerSpec

    @classmethod
    def start(cls, config: ServeConfig) -> "Deployment":
        import ray
        from transformers import AutoTokenizer

        from ..models.arch import ModelArch
        from ..models.registry import resolve_model
        from .actors import WorkerSpec
        from .placement import reserve, worker_locations

        path = resolve_model(config.engine.model)
        arch = ModelArch.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = config.worker_engine
        family = config.family(arch)
        plan = family.default_plan
        if plan.skip_layers != engine.plan(arch).skip_layers:
            raise AssertionError(f"default plan {plan.describe()} != the workers' engine plan {engine.plan(arch).describe()}")
        if config.is_disaggregated and (not plan.independent_kv or not plan.boundary_handling):
            raise ValueError("the disaggregated topology needs independent_kv and boundary_handling (ablation plans run colocated)")
        eos = tuple(sorted(set(arch.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())))
        if config.kv_correction is not None:
            from ..calib.kv_correction import KVCorrection

            fitted = KVCorrection.load(config.kv_correction).plan
            if fitted.skip_layers != plan.skip_layers:
                raise ValueError(f"kv_correction: fitted for skipped layers {list(fitted.skip_layers)}, the plan skips {list(plan.skip_layers)}")
        spec = WorkerSpec(engine, plan, config.num_threads, config.transfer_timeout_s, eos, config.kv_correction, family)
        num_prefill = config.num_prefill if config.is_disaggregated else 0
        placement = reserve(config.placement, num_prefill, config.num_decode, engine.device)
        weight_bytes = _weight_bytes(arch, family.union_plan, engine.dtype)
        dep = cls(config, plan, [], [], tokenizer, arch, placement=placement, family=family, prefill_weight_bytes=weight_bytes, spec=spec)
        try:
            dep.prefill = [dep.new_actor("prefill", i) for i in range(num_prefill)]
            dep.decode = [dep.new_actor("decode", i) for i in range(config.num_decode)]
            ray.get([a.ping.remote() for a in dep.prefill + dep.decode])  # surfaces load errors here
            dep.locations = worker_locations(dep.prefill, dep.decode, placement)
            ray.get([r for p in range(num_prefill) for d in range(config.num_decode) for r in dep.link_calls(p, d)], timeout=120)
        except Exception:
            dep.shutdown()
            raise
        log.info("workers up: %s, %s", config.label, family.describe() if len(family.plans) > 1 else plan.describe())
        if config.is_disaggregated:
            mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
            log.info(
                "prefill worker weights: %s (the mildest plan's instance, which runs every plan of the family); default plan alone %s, full model %s",
                mib(weight_bytes), mib(_weight_bytes(arch, plan, engine.dtype)), mib(_weight_bytes(arch, None, engine.dtype)),
            )
        return dep

    def new_actor(self, role: str, index: int):
        """A fresh worker actor of ``role`` ("prefill" or "decode") number ``index``, in that worker's
        placement-group bundle; loading runs in the background."""
        from .actors import DecodeActor, PrefillActor

        cls = PrefillActor if role == "prefill" else DecodeActor
        rank = index if role == "prefill" else len(self.prefill) + index  # prefill ranks first
        return cls.options(**self.placement.options(rank)).remote(self.spec)

    def link_backend(self, p: int, d: int) -> str:
        """NCCL when both ends of the pair hold a GPU of their own, gloo otherwise."""
        from .placement import pair_backend

        return pair_backend(*self._pair_locations(p, d))

    def same_node(self, p: int, d: int) -> bool:
        """Do prefill worker ``p`` and decode worker ``d`` run on one node (their K/V cross no network)?
        From the start-up locations (False before they are known): a replacement lands in its
        predecessor's bundle, hence node."""
        try:
            a, b = self._pair_locations(p, d)
        except IndexError:
            return False
        return a.node_id == b.node_id

    def _pair_locations(self, p: int, d: int) -> tuple:
        """The ``WorkerLocation`` of prefill worker ``p`` and of decode worker ``d`` (prefill ranks first)."""
        num_p = self.config.num_prefill if self.config.is_disaggregated else 0
        return self.locations[p], self.locations[num_p + d]

    def link_calls(self, p: int, d: int) -> list:
        """Create the link between prefill worker ``p`` and decode worker ``d`` on a fresh
        rendezvous port; returns the two object refs to wait on (both ends join together).
        The supervisor re-creates a link the same way, awaiting instead of blocking."""
        import ray

        address = ray.get(self.prefill[p].listen.remote(d))
        backend = self.link_backend(p, d)
        return [self.prefill[p].connect.remote(d, backend), self.decode[d].connect.remote(p, address, backend)]

    def shutdown(self) -> None:
        import ray

        for group in (self.prefill, self.decode):  # prefill first: its senders tell receivers to stop
            refs = [a.shutdown.remote() for a in group]
            try:
                ray.get(refs, timeout=15)
            except Exception as exc:  # a dead or stuck actor is killed below anyway
                log.warning("worker shutdown: %s", exc)
        for a in self.prefill + self.decode:
            ray.kill(a)
        self.prefill, self.decode = [], []
        if self.placement is not None:
            self.placement.remove()


def _weight_bytes(arch, plan: PrunePlan | None, dtype: str) -> int:
    """Parameter bytes of the prefill-only instance for ``plan`` (None: the full model), counted on
    the meta device (nothing is allocated or read)."""
    import torch

    from ..models.decoder import CausalLM
    from ..models.loader import resolve_dtype

    with torch.device("meta"):
        model = CausalLM(arch, plan)
    return sum(p.numel() for p in model.parameters()) * resolve_dtype(dtype).itemsize
