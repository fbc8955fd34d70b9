"""Launch the workers on Ray and take them down: actor placement, link wiring, replacement, shutdown.

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

What runs (model, plan family, weights, worker spec) is decided first by ``spec.py``. Depth
(``--prune-ratios`` or a family JSON in ``--prune-plan``): every prefill worker holds the
prefill-only instance of the family's mildest plan, which runs every plan of the family; a server
with one plan serves a family of one. The weights a prefill worker holds are logged at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...config import ServeConfig
from ...pop.plan import PlanFamily, PrunePlan
from .spec import DeploymentSpec, weight_bytes_of

log = logging.getLogger("pop_disagg.serve")


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

        from .placement import reserve, worker_locations

        spec = DeploymentSpec.of(config)  # everything that can fail before an actor starts
        arch, tokenizer, engine, family, plan = spec.arch, spec.tokenizer, spec.worker.engine, spec.family, spec.plan
        weight_bytes = spec.prefill_weight_bytes
        num_prefill = config.num_prefill if config.is_disaggregated else 0
        placement = reserve(config.placement, num_prefill, config.num_decode, engine.device)
        dep = cls(
            config,
            plan,
            [],
            [],
            tokenizer,
            arch,
            placement=placement,
            family=family,
            prefill_weight_bytes=weight_bytes,
            spec=spec.worker,
        )
        try:
            dep.prefill = [dep.new_actor("prefill", i) for i in range(num_prefill)]
            dep.decode = [dep.new_actor("decode", i) for i in range(config.num_decode)]
            ray.get([a.ping.remote() for a in dep.prefill + dep.decode])  # surfaces load errors here
            dep.locations = worker_locations(dep.prefill, dep.decode, placement)
            ray.get(
                [r for p in range(num_prefill) for d in range(config.num_decode) for r in dep.link_calls(p, d)],
                timeout=120,
            )
        except Exception:
            dep.shutdown()
            raise
        log.info("workers up: %s, %s", config.label, family.describe() if len(family.plans) > 1 else plan.describe())
        if config.is_disaggregated:
            mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
            log.info(
                "prefill worker weights: %s (the mildest plan's instance, which runs every plan of the family); default plan alone %s, full model %s",
                mib(weight_bytes),
                mib(weight_bytes_of(arch, plan, engine.dtype)),
                mib(weight_bytes_of(arch, None, engine.dtype)),
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
