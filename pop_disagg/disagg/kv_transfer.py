"""KV transfer from a prefill worker to a decode worker: state machine, wire format, transports.

Life cycle of one transfer (one request's prompt prefix ``x_1..x_{N-1}``), owned by the decode
worker's ``TransferTable`` and changed only under the decode worker's lock:

    RESERVED  the decode worker allocated the request's KV blocks and handed out a transfer id;
              the router then submits the prefix to a prefill worker together with that id.
    SENDING   the link's header naming this transfer id arrived; layer K/V are being received
              into a staging buffer and written into the reserved blocks (index_copy by slot).
    RECEIVED  every layer is written; the request joins the decode batch (first step: x_N).
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
    index   int64 (num_transfers, 2)   rows [transfer_id, num_tokens], in token order
    layer l = 0..L-1, ascending: K (num_tokens, Hkv, D), then V (num_tokens, Hkv, D)

Layers are sent as the prefill finishes them (the sink of ``PrefillAttention``), so transfer
overlaps compute; under POP the skipped run's K/V come from the fused projection when the run is
reached (at the end for the default plan). A transfer cancelled while in flight is still read off
the link (and discarded) so the link stays in step. A timeout or a transport error mid-message
leaves the link's position in the stream unknown, so the link is marked *broken*: every transfer
in flight on it fails, later submissions to it fail at once, and the router stops choosing that
pair; restarting the server re-creates the process groups. The header's magic number catches a
stream that is out of step anyway.

Transports: ``TorchDistTransport`` (torch.distributed isend/irecv on the pair's group: gloo on CPU
or when the two workers share a GPU, NCCL between distinct GPUs) and ``FakeTransport`` (in-process
queues, with fault injection, for unit tests).
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
    """isend/irecv to ``peer`` (a global rank) on a two-rank group.

    With gloo, CUDA tensors go through CPU copies (two workers on one GPU). ``Work.wait(timeout)``
    raises on timeout for gloo; NCCL's ``wait`` only orders streams, so NCCL completion is polled.
    """

    def __init__(self, group, peer: int, backend: str):
        self.group, self.peer, self.backend = group, peer, backend

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

    def send(self, tensor: torch.Tensor, timeout: float | None) -> None:
        import torch.distributed as dist

        if self.backend == "gloo" and tensor.device.type != "cpu":
            tensor = tensor.cpu()
        self._wait(dist.isend(tensor.contiguous(), dst=self.peer, group=self.group), timeout, "send to")

    def recv(self, tensor: torch.Tensor, timeout: float | None) -> None:
        import torch.distributed as dist

        buf = tensor if (self.backend == "nccl" or tensor.device.type == "cpu") else torch.empty(tensor.shape, dtype=tensor.dtype)
        self._wait(dist.irecv(buf, src=self.peer, group=self.group), timeout, "receive from")
        if buf is not tensor:
            tensor.copy_(buf)


# Idle links wait for their next header without a deadline, so the process groups' own timeout must
# not fire in between (gloo applies it to every wait without an explicit timeout).
PROCESS_GROUP_TIMEOUT = timedelta(days=365)


def init_links(rank: int, world_size: int, master_addr: str, master_port: int, pairs: list[tuple[int, int]], backends: list[str]) -> dict[int, TorchDistTransport]:
    """Join the world group and create one group per (prefill rank, decode rank) pair.

    Every rank calls ``new_group`` for every pair in the same order (a collective on the world
    group). Returns this rank's transports keyed by peer rank.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT)
    links = {}
    for (p, d), backend in zip(pairs, backends):
        group = dist.new_group([p, d], backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
        if rank in (p, d):
            peer = d if rank == p else p
            links[peer] = TorchDistTransport(group, peer, backend)
    return links


def destroy_links() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ---- prefill side -------------------------------------------------------------------------------
@dataclass
class SendBatch:
    """The transfers one prefill batch sends over one link, and how that went."""

    transfer_ids: list[int]
    num_tokens: list[int]
    on_done: Callable[["SendBatch"], None]
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

    def __init__(self, transport: Transport, num_layers: int, kv_shape: tuple[int, int], dtype: torch.dtype, timeout_s: float, name: str = "kv-sender"):
        self.transport = transport
        self.num_layers = num_layers
        self.kv_shape, self.kv_dtype = kv_shape, dtype  # (Hkv, D): for padding an abandoned batch
        self.timeout_s = timeout_s
        self.broken: str | None = None  # why the link is unusable, once it is
        self._batches: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def begin(self, batch: SendBatch) -> None:
        batch.layers = queue.Queue()
        self._batches.put(batch)

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
        self._batches.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                if self.broken is None:
                    try:
                        self.transport.send(torch.tensor([MAGIC, KIND_CLOSE, 0, 0], dtype=torch.long), self.timeout_s)
                    except TransferError:
                        pass
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

    def _send_batch(self, batch: SendBatch) -> None:
        header = torch.tensor([MAGIC, KIND_DATA, len(batch.transfer_ids), batch.total_tokens], dtype=torch.long)
        index = torch.tensor([[t, n] for t, n in zip(batch.transfer_ids, batch.num_tokens)], dtype=torch.long).view(-1, 2)
        self.transport.send(header, self.timeout_s)
        self.transport.send(index, self.timeout_s)
        pad = None
        for _ in range(self.num_layers):
            item = None if pad is not None else batch.layers.get()
            if item is None:
                if pad is None:
                    pad = torch.zeros(batch.total_tokens, *self.kv_shape, dtype=self.kv_dtype)
                item = (pad, pad)
            for tensor in item:
                self.transport.send(tensor, self.timeout_s)
            batch.num_sent_layers += 1

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


class ReceiverHost(Protocol):
    """What a ``KVReceiver`` needs from the decode worker (all calls take the worker's lock)."""

    def begin_transfer(self, transfer_id: int, num_tokens: int) -> Transfer | None: ...

    def write_layer(self, transfer: Transfer, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def finish_transfer(self, transfer: Transfer) -> None: ...

    def fail_link(self, link: int, why: str, transfers: list[Transfer]) -> None: ...


class KVReceiver:
    """Decode end of a link: one thread reads message groups and writes K/V into reserved blocks."""

    def __init__(self, transport: Transport, link: int, host: ReceiverHost, num_layers: int, kv_shape: tuple[int, int], dtype: torch.dtype, timeout_s: float):
        self.transport, self.link, self.host = transport, link, host
        self.num_layers, self.kv_shape, self.dtype = num_layers, kv_shape, dtype
        self.timeout_s = timeout_s
        self.broken: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-receiver-{link}", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.long)
        while True:
            transfers: list[Transfer | None] = []
            try:
                self.transport.recv(header, None)  # idle until the next batch
                magic, kind, num_transfers, num_tokens = header.tolist()
                if magic != MAGIC:
                    raise TransferError(f"link {self.link} out of step (bad magic {magic:#x})")
                if kind == KIND_CLOSE:
                    return
                index = torch.zeros(num_transfers, 2, dtype=torch.long)
                self.transport.recv(index, self.timeout_s)
                rows = index.tolist()
                transfers = [self.host.begin_transfer(tid, n) for tid, n in rows]
                offsets = [0]
                for _, n in rows:
                    offsets.append(offsets[-1] + n)
                k = torch.empty((num_tokens, *self.kv_shape), dtype=self.dtype)  # staging
                v = torch.empty_like(k)
                for layer in range(self.num_layers):
                    self.transport.recv(k, self.timeout_s)
                    self.transport.recv(v, self.timeout_s)
                    for t, a, b in zip(transfers, offsets[:-1], offsets[1:]):
                        if t is not None:
                            self.host.write_layer(t, layer, k[a:b], v[a:b])
                for t in transfers:
                    if t is not None:
                        self.host.finish_transfer(t)
            except TransferError as exc:
                self.broken = str(exc)
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
