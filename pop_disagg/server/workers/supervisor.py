"""The supervisor: probes every worker, replaces the ones that die, re-creates broken links.

Each worker is a slot (role, index) whose actor can be replaced. States:

    SERVING     answers health probes; the router may choose it
    RESTARTING  lost: its process died (Ray reports the actor dead) or it answered no probe for
                ``worker_timeout_s``. Its old actor is killed, ``slot.down`` resolves (the router
                fails the requests streaming from a lost decode worker at once and re-runs the
                prefills a lost prefill worker held), and a replacement loads and is linked
    DEAD        ``MAX_RESTARTS_IN_A_ROW`` replacements in a row failed to come up; never chosen

    SERVING -> RESTARTING -> SERVING
                   |
                   +-------> DEAD

Links (disaggregated): pair (p, d) is *up* when both ends are SERVING and the pair's process group
was made for these two incarnations. A restart of either end, or a broken link reported by either
end's health (a stalled or failed transfer), takes it down until it is re-created on a fresh
rendezvous port; every other pair keeps running (see ``kv_transfer``: one group per pair, no world
group). Link building is serialized by one lock, so a replacement and a relink never race.

Why our own supervisor and not Ray's ``max_restarts``: a restarted actor must also be re-linked
with every peer (a process-group rendezvous both ends join), in-flight work must be failed or
re-run by the router at once rather than retried blindly by Ray (``max_task_retries`` would re-run
a decode stream from the start), a hung worker that Ray still thinks alive must be replaced too
(the health probe's timeout), and ``Health`` must say which worker is serving, restarting or dead.
Ray's own restarts are left off (``max_restarts=0``): each replacement is a new actor.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("pop_disagg.serve")


class WorkerState(str, enum.Enum):
    SERVING = "serving"
    RESTARTING = "restarting"
    DEAD = "dead"


@dataclass
class WorkerSlot:
    role: str  # "prefill" | "decode"
    index: int
    actor: object
    state: WorkerState = WorkerState.SERVING
    num_restarts: int = 0
    message: str = ""  # why it is not serving
    down: asyncio.Future | None = field(default=None, repr=False)  # resolves (reason) when this incarnation is lost

    @property
    def name(self) -> str:
        return f"{self.role} worker {self.index}"

    def is_recovering(self, d: int) -> bool:
        """Is a prefill worker being replaced, or a link to decode worker ``d`` being re-created?"""
        return any(s.state is WorkerState.RESTARTING for s in self.prefill) or any(
            key[1] == d for key in self._relinking
        )

    @property
    def is_serving(self) -> bool:
        return self.state is WorkerState.SERVING


class Supervisor:
    MAX_RESTARTS_IN_A_ROW = 3
    START_TIMEOUT_S = 300.0  # a replacement loads the model
    LINK_TIMEOUT_S = 60.0

    def __init__(self, deployment, worker_timeout_s: float, probe_interval_s: float | None = None, on_restart=None):
        self.dep = deployment
        self.on_restart = on_restart  # called with the role after each replacement (pop_disagg:worker_restarts_total)
        self.worker_timeout_s = worker_timeout_s
        self.probe_interval_s = probe_interval_s or min(1.0, worker_timeout_s / 4)
        self.prefill = [WorkerSlot("prefill", i, a) for i, a in enumerate(deployment.prefill)]
        self.decode = [WorkerSlot("decode", i, a) for i, a in enumerate(deployment.decode)]
        self.links = {(p, d): True for p in range(len(self.prefill)) for d in range(len(self.decode))}
        self._linked_at = {key: time.monotonic() for key in self.links}  # health older than this is stale
        self._relinking: set[tuple[int, int]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._changed: asyncio.Event | None = None
        self._link_lock: asyncio.Lock | None = None

    # ---- life cycle (on the server's event loop) -----------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._changed, self._link_lock = asyncio.Event(), asyncio.Lock()
        for slot in self.prefill + self.decode:
            slot.down = loop.create_future()
            self._spawn(self._probe_loop(slot, slot.actor))

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- views (router, Health) -----------------------------------------------------------------
    def is_link_up(self, p: int, d: int) -> bool:
        return self.links.get((p, d), False) and self.prefill[p].is_serving and self.decode[d].is_serving

    def is_recovering(self, d: int) -> bool:
        """Is a prefill worker being replaced, or a link to decode worker ``d`` being re-created?"""
        return any(s.state is WorkerState.RESTARTING for s in self.prefill) or any(
            key[1] == d for key in self._relinking
        )

    @property
    def is_serving(self) -> bool:
        """A decode worker is up (and, disaggregated, a prefill worker with a link to one)."""
        if not self.prefill:
            return any(s.is_serving for s in self.decode)
        return any(self.is_link_up(p, d) for p, d in self.links)

    def snapshot(self) -> list[WorkerSlot]:
        return self.prefill + self.decode

    async def wait_for(self, predicate, timeout_s: float) -> bool:
        """Until ``predicate()`` holds (re-checked on every state change) or ``timeout_s`` passes."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not predicate():
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return predicate()
        return True

    # ---- failures ---------------------------------------------------------------------------------
    def report_failure(self, slot: WorkerSlot, actor, why: str) -> None:
        """``actor`` (the incarnation the caller used) of ``slot`` is lost: replace it, once."""
        if self._stopping or slot.actor is not actor or not slot.is_serving:
            return
        log.warning("%s lost (%s); replacing it", slot.name, why)
        slot.state, slot.message = WorkerState.RESTARTING, why
        if not slot.down.done():
            slot.down.set_result(why)
        for key in self._links_of(slot):
            self.links[key] = False
        self._notify()
        self._spawn(self._restart(slot, actor))

    async def check(self, p: int, d: int) -> None:
        """Probe both ends of link (p, d) now (the router saw a transfer on it fail). Returns once
        a dead end has been reported and a broken link taken down (and its re-creation begun)."""
        await asyncio.gather(self._probe(self.prefill[p]), self._probe(self.decode[d]))

    def _links_of(self, slot: WorkerSlot) -> list[tuple[int, int]]:
        return [(p, d) for p, d in self.links if (p if slot.role == "prefill" else d) == slot.index]

    # ---- probes -------------------------------------------------------------------------------------
    async def _probe_loop(self, slot: WorkerSlot, actor) -> None:
        while not self._stopping and slot.actor is actor and slot.is_serving:
            await self._probe(slot)
            await asyncio.sleep(self.probe_interval_s)

    async def _probe(self, slot: WorkerSlot) -> None:
        import ray

        actor, asked_at = slot.actor, time.monotonic()
        if not slot.is_serving:
            return
        try:
            health = await asyncio.wait_for(actor.health.remote(), self.worker_timeout_s)
        except asyncio.TimeoutError:
            self.report_failure(slot, actor, f"no health answer within {self.worker_timeout_s:g}s")
            return
        except ray.exceptions.RayActorError as exc:
            self.report_failure(slot, actor, f"process died ({exc.__class__.__name__})")
            return
        except Exception as exc:  # noqa: BLE001 - a worker whose health call itself fails is not healthy
            self.report_failure(slot, actor, f"health failed: {exc.__class__.__name__}: {exc}")
            return
        for peer, why in health.get("broken_links", {}).items():
            key = (slot.index, peer) if slot.role == "prefill" else (peer, slot.index)
            if key in self.links and asked_at > self._linked_at[key]:  # not about an older link
                self._want_link(key, f"reported broken by the {slot.role} end ({why})")
        for key in self._links_of(slot):  # a re-creation that failed earlier: try again
            if not self.links[key] and self.prefill[key[0]].is_serving and self.decode[key[1]].is_serving:
                self._want_link(key, "down")

    # ---- links --------------------------------------------------------------------------------------
    def _want_link(self, key: tuple[int, int], why: str) -> None:
        if self._stopping or key in self._relinking:
            return
        if not (self.prefill[key[0]].is_serving and self.decode[key[1]].is_serving):
            self.links[key] = False  # the replacement of the lost end links it
            return
        log.warning("link prefill %d -> decode %d %s; re-creating it", *key, why)
        self.links[key] = False
        self._relinking.add(key)
        self._notify()
        self._spawn(self._relink(key))

    async def _relink(self, key: tuple[int, int]) -> None:
        try:
            async with self._link_lock:
                p, d = key
                if self.prefill[p].is_serving and self.decode[d].is_serving:
                    await self._connect(p, d, self.prefill[p].actor, self.decode[d].actor)
        finally:
            self._relinking.discard(key)

    async def _connect(self, p: int, d: int, prefill, decode) -> bool:
        """Build the pair's process group on a fresh port (the caller holds the link lock)."""
        try:
            address = await asyncio.wait_for(prefill.listen.remote(d), self.LINK_TIMEOUT_S)
            backend = self.dep.link_backend(p, d)
            await asyncio.wait_for(
                asyncio.gather(prefill.connect.remote(d, backend), decode.connect.remote(p, address, backend)),
                self.LINK_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - an end died meanwhile: its own restart re-links
            log.warning("link prefill %d -> decode %d: connecting failed: %s: %s", p, d, exc.__class__.__name__, exc)
            return False
        self.links[(p, d)], self._linked_at[(p, d)] = True, time.monotonic()
        self._notify()
        log.info("link prefill %d -> decode %d is up", p, d)
        return True

    # ---- restarts -----------------------------------------------------------------------------------
    async def _restart(self, slot: WorkerSlot, old) -> None:
        import ray

        try:
            ray.kill(old, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for attempt in range(1, self.MAX_RESTARTS_IN_A_ROW + 1):
            started = time.monotonic()
            actor = self.dep.new_actor(slot.role, slot.index)
            (self.dep.prefill if slot.role == "prefill" else self.dep.decode)[slot.index] = (
                actor  # shutdown kills it even mid-start
            )
            try:
                await asyncio.wait_for(actor.ping.remote(), self.START_TIMEOUT_S)
                async with self._link_lock:
                    peers = self.decode if slot.role == "prefill" else self.prefill
                    for peer in peers:
                        if peer.is_serving:
                            p, d = (slot.index, peer.index) if slot.role == "prefill" else (peer.index, slot.index)
                            pa, da = (actor, peer.actor) if slot.role == "prefill" else (peer.actor, actor)
                            await self._connect(p, d, pa, da)
                    slot.actor, slot.state, slot.message = actor, WorkerState.SERVING, ""
                    slot.num_restarts += 1
                    if self.on_restart is not None:
                        self.on_restart(slot.role)
                    slot.down = asyncio.get_running_loop().create_future()
                    self._notify()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the replacement failed to load: try again
                log.warning(
                    "%s: replacement %d/%d failed: %s: %s",
                    slot.name,
                    attempt,
                    self.MAX_RESTARTS_IN_A_ROW,
                    exc.__class__.__name__,
                    exc,
                )
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                await asyncio.sleep(1.0)
                continue
            log.info("%s replaced in %.1fs (restart %d)", slot.name, time.monotonic() - started, slot.num_restarts)
            self._spawn(self._probe_loop(slot, actor))
            return
        slot.state, slot.message = (
            WorkerState.DEAD,
            f"{self.MAX_RESTARTS_IN_A_ROW} replacements in a row failed; last loss: {slot.message}",
        )
        log.error("%s is dead: %s", slot.name, slot.message)
        self._notify()
