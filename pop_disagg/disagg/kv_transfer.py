"""KV transfer from a prefill worker to a decode worker: state machine, wire format, transports.

Life cycle of one transfer (one request's prompt prefix ``x_1..x_{N-1}``), owned by the decode
worker's ``TransferTable`` and changed only under the decode worker's lock:

    RESERVED  the decode worker allocated the request's KV blocks and handed out a transfer id;
              the router then submits the prefix to a prefill worker together with that id.
    SENDING   the link's header naming this transfer id arrived; layer K/V are being received
              into a staging buffer and written into the reserved blocks (index_copy by slot).
              A chunked prefill sends the prefix in several message groups, each naming where its
              tokens start; the transfer stays SENDING between them, chunks arrive in order. When
              the decode worker's prefix cache held the first ``h`` positions, the first group
              starts at ``h`` (``Transfer.num_received`` starts there): only the rest is sent.
    RECEIVED  every layer of every token is written; the request joins the decode batch (first
              step: x_N).
    FAILED    timeout, dead peer, broken link or cancellation. The decode worker frees the blocks
              (``LLMEngine.abort``) and reports the failure on the request's stream; the prefill
              worker drops the request's tensors and reports the failure to the router.

    RESERVED -> SENDING -> RECEIVED
        |          |
        +----------+----> FAILED

A *link* is one prefill->decode pair with its own point-to-point channel (a two-rank process
group). Messages on a link are strictly ordered and come from one sender thread (prefill side)
and are read by one receiver thread (decode side), so concurrent requests never interleave. One
prefill batch makes one message group per link it touches:

    header  int64 (4,)           [MAGIC, kind (DATA|CLOSE), num_transfers, num_tokens]
    index   int64 (num_transfers, 3)   rows [transfer_id, start, num_tokens], in token order
            (start: the first prefix position these tokens fill; 0 unless the prefill is chunked)
    then layer groups until all L layers are sent, layers ascending:
      count int64 (1,)           n, the layers in this group
      kv    (n, 2, num_tokens, Hkv, D)   K then V of each of those layers

Layers are sent as the prefill finishes them (the sink of ``PrefillAttention``), so transfer
overlaps compute. A group holds every layer that was waiting when the sender got to it: during
a full prefill that is one layer (the next is still being computed), but under POP the skipped
run's K/V all appear at the end for the default plan, one cheap projection after another, and go
as one or two messages instead of two per layer (at short prompts the per-message cost, not
the bytes, was POP's transfer tail; benchmarks/results/serving/README.md "POP transfer tail"). A transfer cancelled while in flight is still read off
the link (and discarded) so the link stays in step. A timeout or a transport error mid-message
leaves the link's position in the stream unknown, so the link is marked *broken*: every transfer
in flight on it fails, later submissions to it fail at once, and the router stops choosing that
pair until the supervisor re-creates it. The header's magic number catches a stream that is out of
step anyway. Before a link carries anything, its two ends compare signatures in the rendezvous
store (``link_signature``: ``WIRE_VERSION`` and the K/V geometry and dtype): workers of different
pop-disagg versions or models refuse to link, naming both, instead of misreading each other.

Each link is its own two-rank process group with its own rendezvous (``host_pair_store`` on the
prefill end, a fresh port every time; prefill is rank 0, decode rank 1), not a subgroup of one
world group: when a worker dies or one link breaks, only the pairs it is part of are rebuilt
(``connect_pair`` again on both ends), and every other link keeps its transfers in flight.
A re-created link *retires* the old ends: the old sender fails its queued batches without sending,
the old receiver exits without failing the new link's transfers.

Transports: ``TorchDistTransport`` (send/recv on the pair's process group: gloo on CPU or when the
two workers share a GPU, NCCL between distinct GPUs) and ``FakeTransport`` (in-process queues,
with fault injection, for unit tests). Fault hook for tests: ``KVSender.stall_s`` pauses the next
batch after its first layer (a stalled transfer, as a hung peer or a congested network looks to
the receiver).
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Protocol

import torch

MAGIC = 0x504F50  # "POP"
# The message layout below, as a number both ends of a link compare when they connect: bump it on
# any change, so that workers of two pop-disagg versions (e.g. nodes built from different images)
# refuse to link with a clear error instead of misreading each other's messages.
WIRE_VERSION = 3  # 1: per-layer K/V; 2: layer groups; 3: index rows carry the chunk start
KIND_DATA, KIND_CLOSE = 1, 2
HEADER_LEN = 4


class TransferState(enum.Enum):
    RESERVED = "reserved"
    SENDING = "sending"
    RECEIVED = "received"
    FAILED = "failed"


class TransferError(RuntimeError):
    """A transfer could not complete (timeout, dead peer, broken link)."""


# ---- transports ---------------------------------------------------------------------------------
class Transport(Protocol):
    """One end of a point-to-point channel. Both calls block until done or raise TransferError.

    ``timeout=None`` waits as long as the channel allows (an idle link waiting for its next header).
    """

    def send(self, tensor: torch.Tensor, timeout: float | None) -> None: ...

    def recv(self, tensor: torch.Tensor, timeout: float | None) -> None: ...


class FakeTransport:
    """In-process channel end over two queues; ``pair()`` returns (prefill end, decode end).

    ``drop_after``: silently drop every message after the first ``drop_after`` sent (the receiver
    then times out), to test failure paths.
    """

    def __init__(self, outbox: queue.Queue, inbox: queue.Queue, drop_after: int | None = None):
        self._out, self._in = outbox, inbox
        self.drop_after = drop_after
        self.num_sent = 0

    @classmethod
    def pair(cls, drop_after: int | None = None) -> tuple["FakeTransport", "FakeTransport"]:
        a, b = queue.Queue(), queue.Queue()
        return cls(a, b, drop_after), cls(b, a)

    def send(self, tensor: torch.Tensor, timeout: float | None) -> None:
        self.num_sent += 1
        if self.drop_after is None or self.num_sent <= self.drop_after:
            self._out.put(tensor.detach().clone())

    def recv(self, tensor: torch.Tensor, timeout: float | None) -> None:
        try:
            got = self._in.get(timeout=timeout)
        except queue.Empty:
            raise TransferError(f"no message within {timeout}s") from None
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise TransferError(f"expected {tuple(tensor.shape)} {tensor.dtype}, got {tuple(got.shape)} {got.dtype}")
        tensor.copy_(got)


class TorchDistTransport:
    """send/recv to ``peer`` (its rank in the group) on a two-rank process group.

    With gloo, CUDA tensors go through CPU copies (two workers on one GPU). ``Work.wait(timeout)``
    raises on timeout for gloo; NCCL's ``wait`` only orders streams, so NCCL completion is polled.
    A gloo timeout closes the pair, so a link that timed out stays broken until it is re-created.
    """

    def __init__(self, group, peer: int, backend: str, store=None):
        self.group, self.peer, self.backend = group, peer, backend
        self._store = store  # the rendezvous client must outlive the group

    def close(self) -> None:
        """Drop the process group: once no thread waits on it its sockets close, so the peer's
        pending receive fails instead of waiting forever (NCCL: abort the communicator)."""
        group, self.group = self.group, None
        if group is not None and self.backend == "nccl":
            try:
                group.abort()
            except Exception:  # noqa: BLE001 - best effort on a dying link
                pass

    def _wait(self, work, timeout: float | None, what: str) -> None:
        try:
            if self.backend == "nccl":
                deadline = None if timeout is None else time.monotonic() + timeout
                while not work.is_completed():
                    if deadline is not None and time.monotonic() > deadline:
                        raise TransferError(f"{what} rank {self.peer}: no completion within {timeout}s")
                    time.sleep(0.0002)
                work.wait()
            elif timeout is None:
                work.wait()
            else:
                work.wait(timedelta(seconds=timeout))
        except TransferError:
            raise
        except RuntimeError as exc:  # gloo timeouts and closed connections
            raise TransferError(f"{what} rank {self.peer} failed: {exc}") from exc

    def _group(self):
        if self.group is None:
            raise TransferError(f"link to rank {self.peer} is closed")
        return self.group

    def send(self, tensor: torch.Tensor, timeout: float | None) -> None:
        if self.backend == "gloo" and tensor.device.type != "cpu":
            tensor = tensor.cpu()
        self._wait(self._group().send([tensor.contiguous()], self.peer, 0), timeout, "send to")

    def recv(self, tensor: torch.Tensor, timeout: float | None) -> None:
        buf = (
            tensor
            if (self.backend == "nccl" or tensor.device.type == "cpu")
            else torch.empty(tensor.shape, dtype=tensor.dtype)
        )
        self._wait(self._group().recv([buf], self.peer, 0), timeout, "receive from")
        if buf is not tensor:
            tensor.copy_(buf)


# Idle links wait for their next header without a deadline, so the process groups' own timeout must
# not fire in between (gloo applies it to every wait without an explicit timeout).
PROCESS_GROUP_TIMEOUT = timedelta(days=365)
PREFILL_RANK, DECODE_RANK = 0, 1


def host_pair_store(host: str, timeout_s: float = 60.0):
    """The rendezvous of one link, hosted by its prefill end on a fresh free port (``store.port``).

    Keep the store alive while the link is used: the peer's process group talks to it on connect.
    """
    import torch.distributed as dist

    return dist.TCPStore(host, 0, 2, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def link_signature(arch, dtype: torch.dtype) -> str:
    """What both ends of a link must agree on: the wire format and the K/V each layer of ``arch``
    (a ``ModelArch``) carries in ``dtype``."""
    return f"wire v{WIRE_VERSION}, {arch.num_layers} layers of K/V {arch.num_kv_heads}x{arch.head_dim} {str(dtype).removeprefix('torch.')}"


def check_peer_signature(store, rank: int, signature: str) -> None:
    """Publish this end's ``signature`` in the link's rendezvous store and compare the peer's
    (waiting for it up to the store's timeout); a mismatch fails both ends before any data moves."""
    store.set(f"pop_disagg/link_signature/{rank}", signature)
    try:
        peer = store.get(f"pop_disagg/link_signature/{1 - rank}").decode()
    except Exception as exc:  # the store's timeout (DistStoreError), or the peer's store went away
        raise TransferError(
            f"the peer of this link published no signature ({exc}): it did not connect, or it runs a "
            f"pop-disagg from before wire v{WIRE_VERSION}"
        ) from exc
    if peer != signature:
        role, peer_role = ("prefill", "decode") if rank == PREFILL_RANK else ("decode", "prefill")
        raise TransferError(
            f"the {peer_role} end of this link speaks [{peer}], this {role} end [{signature}]: "
            "both ends must run the same pop-disagg version and model"
        )


def connect_pair(
    store_or_address, rank: int, backend: str, timeout_s: float = 60.0, signature: str | None = None
) -> TorchDistTransport:
    """Create this end of a link's two-rank process group; blocks until the peer joins.

    ``store_or_address``: the store from ``host_pair_store`` (prefill end, rank 0) or its
    ``(host, port)`` (decode end, rank 1). No world group is involved, so a link can be rebuilt
    while every other link keeps running. ``signature`` (``link_signature``; default: the wire
    version alone) is compared with the peer's first (``check_peer_signature``).
    """
    import torch.distributed as dist

    if isinstance(store_or_address, tuple):
        host, port = store_or_address
        store = dist.TCPStore(host, port, 2, False, timeout=timedelta(seconds=timeout_s))
    else:
        store = store_or_address
    check_peer_signature(store, rank, signature or f"wire v{WIRE_VERSION}")
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = PROCESS_GROUP_TIMEOUT
        group = dist.ProcessGroupNCCL(store, rank, 2, opts)
    else:
        group = dist.ProcessGroupGloo(store, rank, 2, PROCESS_GROUP_TIMEOUT)
    return TorchDistTransport(group, 1 - rank, backend, store)


# ---- prefill side -------------------------------------------------------------------------------
@dataclass
class SendBatch:
    """The transfers one prefill batch sends over one link, and how that went."""

    transfer_ids: list[int]
    num_tokens: list[int]
    on_done: Callable[["SendBatch"], None]
    starts: list[int] | None = None  # first prefix position of each transfer's tokens; None: all 0
    error: str | None = None
    next_layer: int = 0  # next layer the producer may enqueue
    num_sent_layers: int = 0  # layers the transport has taken
    layers: "queue.Queue | None" = None  # (k, v) per layer, filled by the producer
    compute_end: float = 0.0  # wall clock when the prefill produced the last layer's K/V
    finish_time: float = 0.0  # wall clock when the last layer was handed to the transport

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class KVSender:
    """Prefill end of a link: one thread sends whole batches, one after another, in ``begin`` order.

    Each batch has its own queue of layers, so producers that interleave ``send_layer`` calls of
    different batches still put them on the wire batch by batch.
    """

    def __init__(
        self,
        transport: Transport,
        num_layers: int,
        kv_shape: tuple[int, int],
        dtype: torch.dtype,
        timeout_s: float,
        name: str = "kv-sender",
    ):
        self.transport = transport
        self.num_layers = num_layers
        self.kv_shape, self.kv_dtype = kv_shape, dtype  # (Hkv, D): for padding an abandoned batch
        self.timeout_s = timeout_s
        self.broken: str | None = None  # why the link is unusable, once it is
        self.stall_s = 0.0  # fault hook (tests, soak): the next batch pauses this long after layer 0
        self._closed: str | None = None  # set by close/retire: later batches fail at once
        self._lock = threading.Lock()
        self._batches: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def begin(self, batch: SendBatch) -> None:
        batch.layers = queue.Queue()
        with self._lock:
            if self._closed is None:
                self._batches.put(batch)
                return
        self._finish(batch, self._closed)

    def send_layer(self, batch: SendBatch, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (num_tokens, Hkv, D) of this batch's tokens on this link, layer by layer in order."""
        if layer != batch.next_layer:
            raise AssertionError(f"layers must be sent in order: expected {batch.next_layer}, got {layer}")
        batch.next_layer += 1
        batch.layers.put((k.contiguous(), v.contiguous()))

    def abandon(self, batch: SendBatch, why: str) -> None:
        """The producer failed mid-batch: zeros pad the missing layers (keeping the link in step)
        and the batch reports ``why``; the router fails its requests."""
        batch.error = why
        batch.layers.put(None)

    def close(self, timeout_s: float = 5.0) -> None:
        """Tell the receiver to stop (if the link still works) and end the thread."""
        with self._lock:
            self._closed = self._closed or "link is closed"
            self._batches.put(None)
        self._thread.join(timeout_s)

    def retire(self, why: str) -> None:
        """The link is being re-created: fail every queued batch without sending; do not wait."""
        with self._lock:
            self._closed = self.broken = why
            self._batches.put(None)

    def _run(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                if self.broken is None:
                    try:
                        self.transport.send(torch.tensor([MAGIC, KIND_CLOSE, 0, 0], dtype=torch.long), self.timeout_s)
                    except TransferError:
                        pass
                while not self._batches.empty():  # begun before the close: fail them, never drop them
                    if (late := self._batches.get_nowait()) is not None:
                        self._finish(late, self._closed)
                if hasattr(self.transport, "close"):
                    self.transport.close()
                return
            if self.broken is not None:
                self._finish(batch, f"link is broken: {self.broken}")
                continue
            try:
                self._send_batch(batch)
            except TransferError as exc:
                self.broken = str(exc)
                self._finish(batch, str(exc))
                continue
            self._finish(batch, batch.error)

    def _next_group(self, batch: SendBatch, abandoned: bool) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]:
        """The layers to send next: the next one (waiting for it) plus every one already queued.
        After the producer gave up (``None`` in the queue) the rest of the batch is zeros."""
        remaining = self.num_layers - batch.num_sent_layers
        # A pending stall (fault hook) pauses after the first layer, so it must go alone: a group
        # of every layer would leave nothing for the receiver to wait for.
        limit = 1 if self.stall_s else remaining
        items = [] if abandoned else [batch.layers.get()]
        while not abandoned and items[-1] is not None and len(items) < limit:
            try:
                items.append(batch.layers.get_nowait())
            except queue.Empty:
                break
        if abandoned or items[-1] is None:
            items = [it for it in items if it is not None]
            pad = torch.zeros(batch.total_tokens, *self.kv_shape, dtype=self.kv_dtype)
            items += [(pad, pad)] * (remaining - len(items))
            return items, True
        return items, False

    def _send_batch(self, batch: SendBatch) -> None:
        header = torch.tensor([MAGIC, KIND_DATA, len(batch.transfer_ids), batch.total_tokens], dtype=torch.long)
        starts = batch.starts or [0] * len(batch.transfer_ids)
        index = torch.tensor(
            [[t, a, n] for t, a, n in zip(batch.transfer_ids, starts, batch.num_tokens)], dtype=torch.long
        ).view(-1, 3)
        self.transport.send(header, self.timeout_s)
        self.transport.send(index, self.timeout_s)
        abandoned = False
        while batch.num_sent_layers < self.num_layers:
            items, abandoned = self._next_group(batch, abandoned)
            group = torch.stack([t for kv in items for t in kv]).view(
                len(items), 2, *items[0][0].shape
            )  # (n, 2, T, Hkv, D), one copy
            self.transport.send(torch.tensor([len(items)], dtype=torch.long), self.timeout_s)
            self.transport.send(group, self.timeout_s)
            batch.num_sent_layers += len(items)
            if self.stall_s:
                stall, self.stall_s = self.stall_s, 0.0
                time.sleep(stall)
            if self.broken is not None:  # retired while stalled: the peer no longer reads this link
                raise TransferError(self.broken)

    def _finish(self, batch: SendBatch, error: str | None) -> None:
        batch.error = error
        batch.finish_time = time.time()
        batch.on_done(batch)


# ---- decode side --------------------------------------------------------------------------------
@dataclass
class Transfer:
    transfer_id: int
    request_id: str
    num_tokens: int  # prefix length N-1
    slot_mapping: torch.Tensor  # (num_tokens,) flat cache slots of the reserved blocks
    link: int  # which prefill worker sends it
    state: TransferState = TransferState.RESERVED
    error: str | None = None
    received_time: float = 0.0  # wall clock
    num_received: int = 0  # prefix tokens whose every layer is in (chunks arrive in order; cache hits count)
    chunk_start: int = 0  # the message group being received: its first prefix position ...
    chunk_tokens: int = 0  # ... and its number of tokens (the whole prefix unless chunked)

    @property
    def chunk_slots(self) -> torch.Tensor:
        """Cache slots of the tokens of the message group being received."""
        return self.slot_mapping[self.chunk_start : self.chunk_start + self.chunk_tokens]


class ReceiverHost(Protocol):
    """What a ``KVReceiver`` needs from the decode worker (all calls take the worker's lock)."""

    def begin_transfer(self, transfer_id: int, num_tokens: int, start: int = 0) -> Transfer | None: ...

    def write_layer(self, transfer: Transfer, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def finish_transfer(self, transfer: Transfer) -> None:
        """Every layer of the message group begun last is written (the whole prefix, or a chunk of it)."""

    def fail_link(self, link: int, why: str, transfers: list[Transfer]) -> None: ...


class KVReceiver:
    """Decode end of a link: one thread reads message groups and writes K/V into reserved blocks."""

    def __init__(
        self,
        transport: Transport,
        link: int,
        host: ReceiverHost,
        num_layers: int,
        kv_shape: tuple[int, int],
        dtype: torch.dtype,
        timeout_s: float,
    ):
        self.transport, self.link, self.host = transport, link, host
        self.num_layers, self.kv_shape, self.dtype = num_layers, kv_shape, dtype
        self.timeout_s = timeout_s
        self.broken: str | None = None
        self.is_retired = False
        self._thread = threading.Thread(target=self._run, name=f"kv-receiver-{link}", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def retire(self) -> None:
        """A new receiver replaces this one: exit at the next message or error, failing nothing
        (the host fails what was reserved on the old link when it attaches the new one)."""
        self.is_retired = True
        if hasattr(self.transport, "close"):
            self.transport.close()

    def _run(self) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.long)
        while True:
            transfers: list[Transfer | None] = []
            try:
                self.transport.recv(header, None)  # idle until the next batch
                if self.is_retired:
                    return
                magic, kind, num_transfers, num_tokens = header.tolist()
                if magic != MAGIC:
                    raise TransferError(f"link {self.link} out of step (bad magic {magic:#x})")
                if kind == KIND_CLOSE:
                    return
                index = torch.zeros(num_transfers, 3, dtype=torch.long)
                self.transport.recv(index, self.timeout_s)
                rows = index.tolist()
                transfers = [self.host.begin_transfer(tid, n, start) for tid, start, n in rows]
                offsets = [0]
                for _, _, n in rows:
                    offsets.append(offsets[-1] + n)
                count = torch.zeros(1, dtype=torch.long)
                layer = 0
                while layer < self.num_layers:
                    self.transport.recv(count, self.timeout_s)
                    n = int(count[0])
                    if not 1 <= n <= self.num_layers - layer:
                        raise TransferError(
                            f"link {self.link} out of step (a group of {n} layers at layer {layer} of {self.num_layers})"
                        )
                    group = torch.empty((n, 2, num_tokens, *self.kv_shape), dtype=self.dtype)  # staging
                    self.transport.recv(group, self.timeout_s)
                    for kv in group:
                        for t, a, b in zip(transfers, offsets[:-1], offsets[1:]):
                            if t is not None:
                                self.host.write_layer(t, layer, kv[0, a:b], kv[1, a:b])
                        layer += 1
                for t in transfers:
                    if t is not None:
                        self.host.finish_transfer(t)
            except TransferError as exc:
                self.broken = str(exc)
                if not self.is_retired:
                    self.host.fail_link(self.link, str(exc), [t for t in transfers if t is not None])
                return


@dataclass
class TransferTable:
    """Transfers of one decode worker by id (plain bookkeeping; the worker holds the lock)."""

    transfers: dict[int, Transfer] = field(default_factory=dict)
    next_id: int = 1

    def new_id(self) -> int:
        tid = self.next_id
        self.next_id += 1
        return tid
