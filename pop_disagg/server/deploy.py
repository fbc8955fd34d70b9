"""Bring the workers up and down: the serving configuration, actor placement, link wiring.

``Deployment.start`` creates ``num_prefill`` prefill actors and ``num_decode`` decode actors
(colocated: ``num_decode`` engine actors and no prefill), then wires one process group per
(prefill, decode) pair: each pair has its own rendezvous (a TCP store the prefill end hosts on a
fresh port) and its own two-rank group, with no world group over all workers, so the supervisor
can rebuild one pair (``link``) after a restart or a broken link while the others keep serving.
Backend per pair: NCCL when each worker has a GPU of its own, gloo otherwise (CPU, or workers
sharing a GPU). ``new_actor`` builds a replacement worker from the same spec. ``shutdown`` closes
the links (prefill side first, so each decode receiver sees a CLOSE message) and kills the actors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import EngineConfig, PruneConfig
from ..pop.plan import PrunePlan

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
    def worker_engine(self) -> EngineConfig:
        """The engine config every worker runs: ``full`` means the empty plan."""
        if self.prefill == "full":
            return self.engine.model_copy(update={"prune": PruneConfig(no_prune=True)})
        return self.engine

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
    spec: object = None  # WorkerSpec
    num_gpus: float = 0.0  # per worker actor
    backend: str = "gloo"  # of every link

    @classmethod
    def start(cls, config: ServeConfig) -> "Deployment":
        import ray
        from transformers import AutoTokenizer

        from ..models.arch import ModelArch
        from ..models.registry import resolve_model
        from .actors import WorkerSpec

        path = resolve_model(config.engine.model)
        arch = ModelArch.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = config.worker_engine
        plan = engine.plan(arch)
        if config.is_disaggregated and (not plan.independent_kv or not plan.boundary_handling):
            raise ValueError("the disaggregated topology needs independent_kv and boundary_handling (ablation plans run colocated)")
        eos = tuple(sorted(set(arch.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())))
        if config.kv_correction is not None:
            from ..eval.kv_correction import KVCorrection

            fitted = KVCorrection.load(config.kv_correction).plan
            if fitted.skip_layers != plan.skip_layers:
                raise ValueError(f"kv_correction: fitted for skipped layers {list(fitted.skip_layers)}, the plan skips {list(plan.skip_layers)}")
        spec = WorkerSpec(engine, plan, config.num_threads, config.transfer_timeout_s, eos, config.kv_correction)
        num_prefill = config.num_prefill if config.is_disaggregated else 0
        num_workers = num_prefill + config.num_decode
        num_gpus, backend = 0.0, "gloo"
        if engine.device == "cuda":
            total = ray.cluster_resources().get("GPU", 0)
            if total >= num_workers:
                num_gpus, backend = 1.0, "nccl"
            elif total > 0:
                num_gpus = total / num_workers  # workers share GPUs: gloo through host memory
                log.warning("%d workers share %g GPUs: KV moves over gloo", num_workers, total)
            else:
                raise RuntimeError("--device cuda but the Ray cluster has no GPUs")
        dep = cls(config, plan, [], [], tokenizer, arch, spec, num_gpus, backend)
        dep.prefill = [dep.new_actor("prefill") for _ in range(num_prefill)]
        dep.decode = [dep.new_actor("decode") for _ in range(config.num_decode)]
        try:
            ray.get([a.ping.remote() for a in dep.prefill + dep.decode])  # surfaces load errors here
            ray.get([r for p in range(num_prefill) for d in range(config.num_decode) for r in dep.link_calls(p, d)], timeout=120)
        except Exception:
            dep.shutdown()
            raise
        log.info("workers up: %s, %s", config.label, plan.describe())
        return dep

    def new_actor(self, role: str):
        """A fresh worker actor of ``role`` ("prefill" or "decode"); loading runs in the background."""
        from .actors import DecodeActor, PrefillActor

        cls = PrefillActor if role == "prefill" else DecodeActor
        return cls.options(num_gpus=self.num_gpus).remote(self.spec)

    def link_calls(self, p: int, d: int) -> list:
        """Create the link between prefill worker ``p`` and decode worker ``d`` on a fresh
        rendezvous port; returns the two object refs to wait on (both ends join together).
        The supervisor re-creates a link the same way, awaiting instead of blocking."""
        import ray

        address = ray.get(self.prefill[p].listen.remote(d))
        return [self.prefill[p].connect.remote(d, self.backend), self.decode[d].connect.remote(p, address, self.backend)]

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
