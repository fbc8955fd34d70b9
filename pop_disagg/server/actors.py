"""Ray actor shells around the workers: load the model, wire the links, run the worker loop.

The shells are async actors: each worker's loop runs in its own thread, and worker callbacks
(fired from that thread or a link thread) resolve asyncio futures / queues through
``call_soon_threadsafe``. ``DecodeActor.generate`` is a streaming generator: its first item says
the request holds its blocks (``("reserved", transfer_id)``), every later item is a list of
``decode_worker`` events; the router drives the prefill hand-off from the first item.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import ray
import torch

from ..config import EngineConfig
from ..pop.plan import PlanFamily, PrunePlan


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker actor is built from (picklable)."""

    engine: EngineConfig
    plan: PrunePlan  # the prefill plan (empty for --prefill full)
    num_threads: int  # torch intra-op threads in this actor
    transfer_timeout_s: float
    eos_token_ids: tuple[int, ...] = ()
    kv_correction: str | None = None  # fitted K/V weights for the prefill worker's skipped layers
    family: PlanFamily | None = None  # plans a request may pick (``plan`` is its default); the prefill model is built for the mildest


def _setup(spec: WorkerSpec):
    from ..models.loader import load_model
    from ..models.registry import resolve_model

    torch.set_num_threads(spec.num_threads)
    device = spec.engine.device
    if device == "cuda":
        torch.cuda.set_device(0)  # Ray exposes this actor's GPU as device 0
    return str(resolve_model(spec.engine.model)), load_model


class _Shell:
    def _start_loop(self, worker) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=worker.run, args=(self._stop,), name=type(worker).__name__, daemon=True)
        self._thread.start()

    @staticmethod
    def node_address() -> str:
        return ray.util.get_node_ip_address()

    async def free_port(self) -> tuple[str, int]:
        """This node's address and a free TCP port on it (for the process-group rendezvous)."""
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return self.node_address(), s.getsockname()[1]

    async def ping(self) -> bool:
        return True

    async def where(self) -> dict:
        """The Ray node this actor runs on and the GPUs Ray gave it (physical indices on the node)."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": self.node_address(), "gpu_ids": [int(g) for g in ray.get_gpu_ids()]}


@ray.remote(num_cpus=0, max_concurrency=1000)
class PrefillActor(_Shell):
    def __init__(self, spec: WorkerSpec):
        path, load_model = _setup(spec)
        self.spec = spec
        self.model = load_model(path, spec.engine.dtype, spec.engine.device, prefill_only_plan=spec.family.union_plan if spec.family else spec.plan)
        if spec.kv_correction is not None:
            from ..pop.kv_correction import KVCorrection, apply_to_prefill_model

            apply_to_prefill_model(self.model, KVCorrection.load(spec.kv_correction))
        self.worker = None
        self.senders = {}

    async def init_links(self, rank: int, world_size: int, master: tuple[str, int], pairs: list[tuple[int, int]], backends: list[str], decode_index: dict[int, int]) -> None:
        from ..disagg.kv_transfer import KVSender, init_links
        from ..disagg.prefill_worker import PrefillWorker

        links = await asyncio.to_thread(init_links, rank, world_size, master[0], master[1], pairs, backends)
        arch = self.model.arch
        for peer, transport in links.items():
            idx = decode_index[peer]
            self.senders[idx] = KVSender(transport, arch.num_layers, (arch.num_kv_heads, arch.head_dim), self.model.dtype, self.spec.transfer_timeout_s, name=f"kv-sender-{idx}")
        self.worker = PrefillWorker(self.model, self.spec.plan, self.senders, self.spec.engine.max_num_batched_tokens)
        self._start_loop(self.worker)

    async def prefill(self, request_id: str, transfer_id: int, link: int, prefix_ids: list[int], prune_ratio: float | None = None):
        """Prefill ``prefix_ids`` (with the family plan ``prune_ratio`` names; None: the default) and
        send its K/V to decode worker ``link``; returns the outcome once the last layer is on the
        wire (``outcome.error`` set if it failed)."""
        from ..disagg.prefill_worker import PrefillTask

        loop = asyncio.get_running_loop()
        done = loop.create_future()
        plan = self.spec.family.plan_for(prune_ratio) if prune_ratio is not None and self.spec.family else None
        self.worker.submit(PrefillTask(request_id, transfer_id, link, prefix_ids, lambda o: loop.call_soon_threadsafe(done.set_result, o), plan=plan))
        return await done

    async def abort(self, request_id: str) -> bool:
        return self.worker.abort(request_id) if self.worker else False

    async def load(self) -> int:
        return self.worker.num_waiting_tokens if self.worker else 0

    async def shutdown(self) -> None:
        from ..disagg.kv_transfer import destroy_links

        if self.worker is not None:
            self._stop.set()
            self._thread.join(5)
        for sender in self.senders.values():
            await asyncio.to_thread(sender.close)
        destroy_links()


@ray.remote(num_cpus=0, max_concurrency=1000)
class DecodeActor(_Shell):
    """Decode worker (disaggregated) or the whole engine (colocated)."""

    def __init__(self, spec: WorkerSpec):
        from ..disagg.decode_worker import DecodeWorker
        from ..engine.engine import LLMEngine

        path, load_model = _setup(spec)
        engine = LLMEngine(spec.engine, model=load_model(path, spec.engine.dtype, spec.engine.device))
        engine.eos_token_ids |= set(spec.eos_token_ids)  # no tokenizer here: the router passes its EOS
        self.worker = DecodeWorker(engine, spec.transfer_timeout_s)
        self._start_loop(self.worker)

    async def init_links(self, rank: int, world_size: int, master: tuple[str, int], pairs: list[tuple[int, int]], backends: list[str], prefill_index: dict[int, int]) -> None:
        from ..disagg.kv_transfer import init_links

        links = await asyncio.to_thread(init_links, rank, world_size, master[0], master[1], pairs, backends)
        for peer, transport in links.items():
            self.worker.attach_link(prefill_index[peer], transport)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params, link: int | None):
        """Stream a request. ``link``: the prefill worker that sends its K/V; None = colocated."""
        from ..disagg.decode_worker import Failed, Tokens

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sink = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
        is_done = False
        try:
            if link is None:
                self.worker.add_local(request_id, prompt_token_ids, params, sink)
                yield ("reserved", 0)
            else:
                while (tid := self.worker.reserve(request_id, prompt_token_ids, params, link, sink)) is None:
                    await asyncio.sleep(0.005)  # cache full: wait for running requests to finish
                yield ("reserved", tid)
            while not is_done:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                is_done = any(isinstance(e, Failed) or (isinstance(e, Tokens) and e.is_finished) for e in batch)
                yield ("events", batch)
        finally:
            if not is_done:  # the consumer went away
                self.worker.abort(request_id)

    async def abort(self, request_id: str, error: str | None = None) -> bool:
        return self.worker.abort(request_id, error)

    async def stats(self) -> dict:
        return {"num_free_blocks": self.worker.num_free_blocks, "num_blocks": self.worker.engine.blocks.num_blocks, "num_active": self.worker.num_active}

    async def shutdown(self) -> None:
        from ..disagg.kv_transfer import destroy_links

        self._stop.set()
        self._thread.join(5)
        for r in self.worker.receivers.values():
            r.join(5)
        destroy_links()
