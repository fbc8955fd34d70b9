"""Ray actor shells around the workers: load the model, wire the links, run the worker loop.

The shells are async actors: each worker's loop runs in its own thread, and worker callbacks
(fired from that thread or a link thread) resolve asyncio futures / queues through
``call_soon_threadsafe``. ``DecodeActor.generate`` is a streaming generator: its first item says
the request holds its blocks (``("reserved", transfer_id)``), every later item is a list of
``decode_worker`` events; the router drives the prefill hand-off from the first item.

Links (one two-rank process group per prefill/decode pair, see ``kv_transfer``) are made and
re-made pair by pair: ``PrefillActor.listen(d)`` hosts the pair's rendezvous on a fresh port, then
``PrefillActor.connect(d)`` and ``DecodeActor.connect(p, address)`` run together. ``health``
answers the supervisor's probes (and names broken links); ``pid`` and ``inject_fault`` are hooks
for fault tests and the soak benchmark. An abort that arrives before its request (the calls are
concurrent on an async actor) leaves a tombstone, so the request is refused when it comes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import ray
import torch

from .spec import WorkerSpec


def _setup(spec: WorkerSpec):
    from ...models.loader import load_model
    from ...models.registry import resolve_model

    torch.set_num_threads(spec.num_threads)
    device = spec.engine.device
    if device == "cuda":
        torch.cuda.set_device(0)  # Ray exposes this actor's GPU as device 0
    else:
        from ...models import cpu_blas

        cpu_blas.configure(spec.engine.cpu_blas)  # the prefill worker builds no engine
    return str(resolve_model(spec.engine.model)), load_model


def _prefix_key(spec: WorkerSpec, plan):
    """How a prefix computed under ``plan`` is named in both workers' prefix caches (the decode
    engine names its own prefills the same way: the configured model, no correction)."""
    from ...engine.kv_cache import PrefixKey, plan_cache_key

    return PrefixKey(plan_cache_key(spec.engine.model, plan, spec.kv_correction), not plan.skip_layers)


def _prefill_cache(spec: WorkerSpec, model):
    """The prefill worker's prefix cache (every layer's K/V of the blocks it encoded) in the KV
    budget (``kv_cache_memory_mb``, else 512 MiB: not a share of free GPU memory, which a decode
    worker on the same GPU needs), and its key function; (None, None) with prefix caching off."""
    if not spec.engine.enable_prefix_caching:
        return None, None
    from ...disagg.prefill_cache import PrefillCache
    from ...engine.kv_cache import num_blocks_for_budget

    e = spec.engine
    budget = int((e.kv_cache_memory_mb or 512) * 2**20)
    num_blocks = num_blocks_for_budget(model.arch, model.dtype, e.block_size, budget)
    cache = PrefillCache(model.arch, num_blocks, e.block_size, model.dtype, model.device)
    return cache, lambda plan: _prefix_key(spec, plan)


class _Tombstones:
    """Request ids aborted before they arrived; forgotten after ``ttl_s``."""

    def __init__(self, ttl_s: float = 120.0):
        self.ttl_s, self._ids = ttl_s, {}

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._ids = {r: t for r, t in self._ids.items() if now - t < self.ttl_s}
        self._ids[request_id] = now

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids


class _Shell:
    def _start_loop(self, worker) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=worker.run, args=(self._stop,), name=type(worker).__name__, daemon=True)
        self._thread.start()

    @staticmethod
    def node_address() -> str:
        return ray.util.get_node_ip_address()

    @ray.method(concurrency_group="health")
    async def ping(self) -> bool:
        return True

    async def where(self) -> dict:
        """The Ray node this actor runs on and the GPUs Ray gave it (physical indices on the node)."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": self.node_address(),
            "gpu_ids": [int(g) for g in ray.get_gpu_ids()],
        }

    @ray.method(concurrency_group="health")
    async def pid(self) -> int:
        """This worker's process id (fault tests kill it)."""
        return os.getpid()


# Health probes run on their own event-loop thread ("health" group): a busy main loop (hundreds of
# streams, or waiting on the worker lock during a long engine step) must not look like a hang.
_ACTOR_OPTIONS = dict(num_cpus=0, max_concurrency=1000, concurrency_groups={"health": 1})


@ray.remote(**_ACTOR_OPTIONS)
class PrefillActor(_Shell):
    def __init__(self, spec: WorkerSpec):
        from ...disagg.prefill_worker import PrefillWorker

        path, load_model = _setup(spec)
        self.spec = spec
        self.model = load_model(
            path,
            spec.engine.dtype,
            spec.engine.device,
            prefill_only_plan=spec.family.union_plan if spec.family else spec.plan,
        )
        if spec.kv_correction is not None:
            from ...calib.kv_correction import KVCorrection, apply_to_prefill_model

            apply_to_prefill_model(self.model, KVCorrection.load(spec.kv_correction))
        self.senders = {}  # decode index -> KVSender (shared with the worker)
        self._stores = {}  # decode index -> the rendezvous this end hosts for that link
        self._aborted = _Tombstones()
        self.worker = PrefillWorker(
            self.model,
            spec.plan,
            self.senders,
            spec.engine.max_num_batched_tokens,
            spec.engine.enable_chunked_prefill,
            *_prefill_cache(spec, self.model),
        )
        if self.model.arch.vision_family is not None:
            self.worker.load_vision(path)  # this worker encodes its prompts' images
        self.model.warm_up((self.spec.plan,))  # before serving: see CausalLM.warm_up
        self._start_loop(self.worker)

    async def listen(self, link: int) -> tuple[str, int]:
        """Host the rendezvous of the link to decode worker ``link``; returns its address."""
        from ...disagg.kv_transfer import host_pair_store

        store = await asyncio.to_thread(host_pair_store, self.node_address())
        self._stores[link] = store
        return self.node_address(), store.port

    async def connect(self, link: int, backend: str) -> None:
        """Join the link's process group (after ``listen``; the decode end joins at the same time)."""
        from ...disagg.kv_transfer import PREFILL_RANK, KVSender, connect_pair, link_signature

        arch = self.model.arch
        transport = await asyncio.to_thread(
            connect_pair, self._stores[link], PREFILL_RANK, backend, signature=link_signature(arch, self.model.dtype)
        )
        old = self.senders.get(link)
        self.senders[link] = KVSender(
            transport,
            arch.num_layers,
            (arch.num_kv_heads, arch.head_dim),
            self.model.dtype,
            self.spec.transfer_timeout_s,
            name=f"kv-sender-{link}",
        )
        if old is not None:
            why = f"the link to decode worker {link} was re-created"
            old.retire(why)
            self.worker.purge_link(link, why)

    async def prefill(
        self,
        request_id: str,
        transfer_id: int,
        link: int,
        prefix_ids: list[int],
        deadline: float | None = None,
        plan_index: int | None = None,
        send_start: int = 0,
        images: tuple = (),
        image_keys=None,
    ):
        """Prefill ``prefix_ids`` with the family's plan ``plan_index`` (None: the default) and send its
        K/V from position ``send_start`` on (the decode worker holds the rest) to decode worker
        ``link``; returns the outcome once the last layer is on the wire (``outcome.error`` set if
        it failed). ``images``: the prompt's, encoded by this worker's vision encoder in the prefill
        step; ``image_keys``: their spans and digests (``multimodal.ImageKeys``), for its prefix cache."""
        from ...disagg.prefill_worker import PrefillOutcome, PrefillTask

        if request_id in self._aborted:
            now = time.time()
            return PrefillOutcome(request_id, "aborted", 0.0, 0.0, now, now)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        plan = self.spec.family.plans[plan_index] if plan_index is not None and self.spec.family else None
        self.worker.submit(
            PrefillTask(
                request_id,
                transfer_id,
                link,
                prefix_ids,
                lambda o: loop.call_soon_threadsafe(done.set_result, o),
                deadline=deadline,
                plan=plan,
                send_start=send_start,
                images=list(images),
                image_keys=image_keys,
            )
        )
        return await done

    async def abort(self, request_id: str) -> bool:
        found = self.worker.abort(request_id)
        if not found:
            self._aborted.add(request_id)
        return found

    async def load(self) -> int:
        return self.worker.num_waiting_tokens

    @ray.method(concurrency_group="health")
    async def health(self) -> dict:
        return {
            "pid": os.getpid(),
            "broken_links": {d: s.broken for d, s in self.senders.items() if s.broken is not None},
            "num_waiting_tokens": self.worker.num_waiting_tokens,
        }

    async def inject_fault(self, kind: str, seconds: float, link: int | None = None) -> None:
        """Test hook. ``stall_transfer``: the next batch to ``link`` (every link if None) pauses
        ``seconds`` after its first layer. ``pause_prefill``: take no batch for ``seconds``."""
        if kind == "stall_transfer":
            for d, sender in self.senders.items():
                if link is None or d == link:
                    sender.stall_s = seconds
        elif kind == "pause_prefill":
            self.worker.pause_until = time.time() + seconds
        else:
            raise ValueError(f"unknown fault {kind!r}")

    async def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sender in self.senders.values():
            await asyncio.to_thread(sender.close)


@ray.remote(**_ACTOR_OPTIONS)
class DecodeActor(_Shell):
    """Decode worker (disaggregated) or the whole engine (colocated)."""

    def __init__(self, spec: WorkerSpec):
        from ...disagg.decode_worker import DecodeWorker
        from ...engine.engine import LLMEngine

        path, load_model = _setup(spec)
        engine = LLMEngine(spec.engine, model=load_model(path, spec.engine.dtype, spec.engine.device))
        engine.eos_token_ids |= set(spec.eos_token_ids)  # no tokenizer here: the router passes its EOS
        if spec.is_colocated and engine.arch.vision_family is not None:
            engine.load_vision(path)  # a colocated engine encodes its requests' images itself
        engine.warm_up()
        self.worker = DecodeWorker(engine, spec.transfer_timeout_s, spec.max_local_prefill_tokens)
        self.spec = spec
        self._aborted = _Tombstones()
        self._start_loop(self.worker)

    async def inject_fault(self, kind: str, seconds: float) -> None:
        """Test hook. ``slow_decode``: sleep ``seconds`` after every engine step (0 turns it off)."""
        if kind != "slow_decode":
            raise ValueError(f"unknown fault {kind!r}")
        self.worker.step_delay_s = seconds

    async def connect(self, link: int, address: tuple[str, int], backend: str) -> None:
        """Join the process group of the link from prefill worker ``link`` (re-creating it if any)."""
        from ...disagg.kv_transfer import DECODE_RANK, connect_pair, link_signature

        engine = self.worker.engine
        transport = await asyncio.to_thread(
            connect_pair,
            tuple(address),
            DECODE_RANK,
            backend,
            signature=link_signature(engine.arch, engine.kv_cache.k.dtype),
        )
        self.worker.attach_link(link, transport)

    def _key(self, plan_index: int | None):
        """The prefix key of the family plan ``plan_index`` (None: the default); None with caching off."""
        if not self.spec.engine.enable_prefix_caching:
            return None
        family = self.spec.family
        plan = family.plans[plan_index] if plan_index is not None and family else self.spec.plan
        return _prefix_key(self.spec, plan)

    async def probe(
        self, prompt_token_ids: list[int], plan_index: int | None = None, image_keys=None
    ) -> tuple[int, int]:
        """For the router's KV-aware choice: (prompt tokens cached under the plan, blocks in use);
        ``image_keys``: the prompt's images' spans and digests."""
        return self.worker.num_cached_prefix_tokens(
            prompt_token_ids, self._key(plan_index), image_keys
        ), self.worker.num_active_blocks

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params,
        link: int | None,
        deadline: float | None = None,
        plan_index: int | None = None,
        images: tuple = (),
        remote_image_delta: int | None = None,
        image_keys=None,
    ):
        """Stream a request. ``link``: the prefill worker that sends its K/V; None = colocated.
        ``deadline`` (wall clock): past it the request ends with ``Failed(kind="deadline")``.
        ``plan_index``: the family plan its prefill runs (names its blocks in the prefix cache).
        ``images`` (colocated): encoded here; ``remote_image_delta`` (disaggregated): the prompt's
        images were encoded on the prefill worker, this is their position offset, and
        ``image_keys`` their spans and digests (the names of its blocks in the prefix cache).
        The first item is ``("reserved", (transfer id, prompt tokens already held))``."""
        from ...disagg.decode_worker import Failed, Tokens

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sink = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
        is_done = False
        try:
            if link is None:
                await asyncio.to_thread(  # encoding images is blocking work
                    self.worker.add_local, request_id, prompt_token_ids, params, sink, deadline, images
                ) if images else self.worker.add_local(request_id, prompt_token_ids, params, sink, deadline)
                yield ("reserved", (0, 0))
            else:
                while True:
                    if request_id in self._aborted:
                        is_done = True
                        yield ("events", [Tokens([], True, "abort")])
                        return
                    if deadline is not None and time.time() >= deadline:
                        is_done = True
                        yield ("events", [Failed("deadline exceeded while waiting for KV blocks", "deadline")])
                        return
                    try:
                        res = self.worker.reserve(
                            request_id,
                            prompt_token_ids,
                            params,
                            link,
                            sink,
                            deadline,
                            self._key(plan_index),
                            remote_image_delta,
                            image_keys,
                        )
                    except RuntimeError as exc:  # the link is broken: the router may re-prefill elsewhere
                        is_done = True
                        yield ("events", [Failed(str(exc), "kv_transfer")])
                        return
                    if res is not None:
                        break
                    await asyncio.sleep(0.005)  # cache full: wait for running requests to finish
                yield ("reserved", (res.transfer_id, res.num_cached_tokens))
            while not is_done:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                is_done = any(isinstance(e, Failed) or (isinstance(e, Tokens) and e.is_finished) for e in batch)
                yield ("events", batch)
        finally:
            if not is_done:  # the consumer went away
                self.worker.abort(request_id)

    async def abort(self, request_id: str, error: str | None = None, kind: str = "worker") -> bool:
        found = self.worker.abort(request_id, error, kind)
        if not found:
            self._aborted.add(request_id)
        return found

    async def stats(self) -> dict:
        return {
            "num_free_blocks": self.worker.num_free_blocks,
            "num_blocks": self.worker.engine.blocks.num_blocks,
            "num_active": self.worker.num_active,
            "num_receiving": self.worker.num_receiving,
            **self.worker.counters,
        }

    @ray.method(concurrency_group="health")
    async def health(self) -> dict:
        return {"pid": os.getpid(), "broken_links": self.worker.broken_links, **(await self.stats())}

    async def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for r in self.worker.receivers.values():
            r.join(5)
