"""KV transfer between a prefill and a decode worker over the in-process fake transport and gloo.

The decode worker's cache must hold exactly the K/V the prefill computed, the disaggregated pair
must generate what the single-process engine generates, and failures must free every block.
"""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch
import torch.multiprocessing as mp

from pop_disagg.config import EngineConfig, PruneConfig
from pop_disagg.disagg.decode_worker import DecodeWorker, Failed, KVReceived, Tokens
from pop_disagg.disagg.kv_transfer import FakeTransport, KVReceiver, KVSender, SendBatch, TransferState
from pop_disagg.disagg.prefill_worker import PrefillTask, PrefillWorker
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.attention import PrefillAttention
from pop_disagg.models.loader import load_model

PROMPT_LENS = (1, 2, 5, 13, 30)


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _config(path, **prune):
    return EngineConfig(model=path, prune=PruneConfig(**prune), kv_cache_memory_mb=4, block_size=4)


class Pair:
    """One prefill worker and one decode worker joined by a fake link, each with its loop thread."""

    def __init__(self, path, timeout_s=5.0, drop_after=None, chunk_tokens=None, **prune):
        cfg = _config(path, **prune)
        self.engine = LLMEngine(cfg, model=load_model(path))
        self.plan = self.engine.plan
        self.decode = DecodeWorker(self.engine, transfer_timeout_s=timeout_s)
        a, b = FakeTransport.pair(drop_after=drop_after)
        arch = self.engine.arch
        self.sender = KVSender(a, arch.num_layers, (arch.num_kv_heads, arch.head_dim), torch.float32, timeout_s)
        self.decode.attach_link(0, b)
        chunking = (
            {} if chunk_tokens is None else dict(max_num_batched_tokens=chunk_tokens, enable_chunked_prefill=True)
        )
        self.prefill = PrefillWorker(
            load_model(path, prefill_only_plan=self.plan), self.plan, {0: self.sender}, **chunking
        )
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=w.run, args=(self.stop,), daemon=True) for w in (self.prefill, self.decode)
        ]
        for t in self.threads:
            t.start()
        self.events: dict[str, list] = {}
        self.outcomes: dict[str, object] = {}

    def submit(self, request_id, prompt, params, deadline=None):
        events = self.events.setdefault(request_id, [])
        res = self.decode.reserve(request_id, prompt, params, 0, events.append, deadline=deadline)
        assert res is not None
        tid = res.transfer_id
        if len(prompt) > 1:
            self.prefill.submit(
                PrefillTask(
                    request_id,
                    tid,
                    0,
                    prompt[:-1],
                    lambda o: self.outcomes.__setitem__(o.request_id, o),
                    deadline=deadline,
                )
            )
        return tid

    def first_chunk_by_hand(self, request_id, prompt, deadline=None):
        """Submit ``prompt`` with the worker loop held back and run its first 8-token chunk in this
        thread; returns its ``PrefillTask`` (queued again for its next chunk)."""
        self.prefill.pause_until = float("inf")  # the worker loop takes nothing
        self.submit(request_id, prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), deadline)
        with self.prefill._cv:
            items = self.prefill._take_batch()
        assert [(t.request_id, a, n) for t, a, n in items] == [(request_id, 0, 8)]
        self.prefill.step(items)
        assert self.prefill.num_waiting_tokens == len(prompt) - 1 - 8
        return items[0][0]

    def wait_done(self, request_ids, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(
                any(isinstance(e, Failed) or (isinstance(e, Tokens) and e.is_finished) for e in self.events.get(r, []))
                for r in request_ids
            ):
                return
            time.sleep(0.005)
        raise AssertionError(f"requests not finished: {self.events}")

    def tokens(self, request_id):
        return [t for e in self.events[request_id] if isinstance(e, Tokens) for t in e.token_ids]

    def close(self):
        self.sender.close()
        self.stop.set()
        for t in self.threads:
            t.join(2)


@pytest.mark.parametrize("prune", [{}, {"no_prune": True}, {"skip_layers": (1, 3)}], ids=["pop", "full", "every-other"])
def test_disaggregated_pair_equals_engine(tiny_ckpt, prune):
    path = tiny_ckpt("qwen3")
    prompts = _prompts()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ref = LLMEngine(_config(path, **prune), model=load_model(path)).generate(prompts, params)
    pair = Pair(path, **prune)
    try:
        free0 = pair.decode.num_free_blocks
        for i, p in enumerate(prompts):
            pair.submit(f"r{i}", p, params)
        pair.wait_done([f"r{i}" for i in range(len(prompts))])
        for i, r in enumerate(ref):
            assert pair.tokens(f"r{i}") == r.token_ids, f"prompt {i} (len {len(prompts[i])})"
            assert isinstance(pair.events[f"r{i}"][0], KVReceived)
        assert pair.decode.num_free_blocks == free0
        assert all(o.error is None for o in pair.outcomes.values())
    finally:
        pair.close()


def test_received_kv_equals_computed_kv(tiny_ckpt):
    """Block by block, the decode cache holds the K/V a full-model POP prefill computes."""
    path = tiny_ckpt("llama")
    prompt = _prompts(1)[3]
    pair = Pair(path)
    try:
        req = pair.engine.reserve_request(prompt, SamplingParams(max_new_tokens=2), "kv")
        tid = pair.decode.table.new_id()
        from pop_disagg.disagg.kv_transfer import Transfer

        n = len(prompt) - 1
        slots = torch.tensor(pair.engine.blocks.slots(req.block_table, 0, n))
        transfer = Transfer(tid, "kv", n, slots, 0)
        pair.decode.table.transfers[tid] = transfer
        done = threading.Event()
        pair.prefill.submit(PrefillTask("kv", tid, 0, prompt[:-1], lambda o: done.set()))
        assert done.wait(10)
        deadline = time.monotonic() + 10
        while transfer.state != TransferState.RECEIVED and time.monotonic() < deadline:
            time.sleep(0.005)
        assert transfer.state == TransferState.RECEIVED
        expected: dict[int, tuple] = {}
        full = load_model(path)
        # As the prefill worker computes: without autograd (which takes other CPU GEMMs, models/cpu_blas.py)
        # and one skipped-layer GEMM per layer (a streaming sink; equal to one GEMM per run to rounding).
        with torch.inference_mode():
            full(
                torch.tensor(prompt[:-1]),
                torch.arange(n),
                PrefillAttention(
                    [0, n], sink=lambda l, k, v: expected.__setitem__(l, (k.clone(), v.clone())), stream_kv=True
                ),
                plan=pair.plan,
            )
        assert sorted(expected) == list(range(full.arch.num_layers))
        for layer, (k, v) in expected.items():
            got_k, got_v = pair.engine.kv_cache.read(layer, slots)
            torch.testing.assert_close(got_k, k, rtol=0, atol=0)
            torch.testing.assert_close(got_v, v, rtol=0, atol=0)
    finally:
        pair.close()


def _record_prefill_steps(pair):
    steps, step = [], pair.prefill.step

    def recording(items):
        steps.append([(t.request_id, a, n) for t, a, n in items])
        step(items)

    pair.prefill.step = recording
    return steps


@pytest.mark.parametrize(
    "family,prune",
    [("qwen3", {}), ("qwen3", {"no_prune": True}), ("gemma3", {})],
    ids=["qwen3-pop", "qwen3-full", "gemma3-pop"],
)
def test_chunked_prefill_worker_pair_equals_engine(tiny_ckpt, family, prune):
    """Prefixes sent in 8-token chunks at their offsets: the pair still generates what the engine does."""
    path = tiny_ckpt(family)
    prompts = _prompts() + _prompts(4)[3:]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ref = LLMEngine(_config(path, **prune), model=load_model(path)).generate(prompts, params)
    pair = Pair(path, chunk_tokens=8, **prune)
    steps = _record_prefill_steps(pair)
    try:
        free0 = pair.decode.num_free_blocks
        pair.prefill.pause_until = float("inf")  # queue everything, then let the worker take it
        for i, p in enumerate(prompts):
            pair.submit(f"r{i}", p, params)
        pair.prefill.pause_until = 0.0
        pair.wait_done([f"r{i}" for i in range(len(prompts))])
        for i, r in enumerate(ref):
            assert pair.tokens(f"r{i}") == r.token_ids, f"prompt {i} (len {len(prompts[i])})"
        assert pair.decode.num_free_blocks == free0
        assert all(o.error is None for o in pair.outcomes.values()) and len(pair.outcomes) == sum(
            len(p) > 1 for p in prompts
        )
        assert all(sum(n for _, _, n in step) <= 8 for step in steps)
        chunks: dict[str, list] = {}
        for step in steps:
            for rid, a, n in step:
                chunks.setdefault(rid, []).append((a, n))
        for i, p in enumerate(prompts):  # each prefix in order, in pieces that tile it; long ones in several
            got = chunks.get(f"r{i}", [])
            assert [a for a, _ in got] == [sum(n for _, n in got[:j]) for j in range(len(got))] and sum(
                n for _, n in got
            ) == len(p) - 1
            assert len(got) >= -(-(len(p) - 1) // 8)
        assert pair.prefill.num_waiting_tokens == 0
    finally:
        pair.close()


def test_chunked_prefill_worker_kv_equals_one_shot_and_short_prompts_pass_long_ones(tiny_ckpt):
    path = tiny_ckpt("gemma3")
    long, short = _prompts(2)[4], _prompts(2)[2]  # 30 and 5 tokens
    pair = Pair(path, chunk_tokens=8)
    steps = _record_prefill_steps(pair)
    order = []
    try:
        pair.prefill.pause_until = float("inf")
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        for rid, prompt in (("long", long), ("short", short)):
            tid = pair.decode.reserve(rid, prompt, params, 0, pair.events.setdefault(rid, []).append).transfer_id
            pair.prefill.submit(PrefillTask(rid, tid, 0, prompt[:-1], lambda o: order.append(o.request_id)))
        req = pair.engine._requests["long"]
        slots = torch.tensor(pair.engine.blocks.slots(req.block_table, 0, len(long) - 1))
        pair.prefill.pause_until = 0.0
        pair.wait_done(["long", "short"])
        # Round robin: the short prompt went in the second step, not after the long one's last chunk.
        assert order == ["short", "long"]
        assert steps[0] == [("long", 0, 8)] and steps[1] == [("short", 0, 4), ("long", 8, 4)]
        expected: dict[int, tuple] = {}
        n = len(long) - 1
        full = load_model(path)
        full(
            torch.tensor(long[:-1]),
            torch.arange(n),
            PrefillAttention([0, n], sink=lambda l, k, v: expected.__setitem__(l, (k.clone(), v.clone()))),
            plan=pair.plan,
        )
        for layer, (k, v) in expected.items():  # the finished request's blocks still hold its prefix
            got_k, got_v = pair.engine.kv_cache.read(layer, slots)
            torch.testing.assert_close(got_k, k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_v, v, rtol=1e-5, atol=1e-5)
    finally:
        pair.close()


def test_abort_between_chunks_reports_once_and_frees_blocks(tiny_ckpt):
    path = tiny_ckpt("llama")
    pair = Pair(path, chunk_tokens=8)
    try:
        prompt = _prompts()[4]
        free0 = pair.decode.num_free_blocks
        pair.first_chunk_by_hand("r", prompt)
        deadline = time.monotonic() + 10
        transfer = next(iter(pair.decode.table.transfers.values()))
        while transfer.num_received < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert transfer.state == TransferState.SENDING and transfer.num_received == 8
        assert pair.prefill.abort("r") and pair.decode.abort("r")
        assert (
            pair.outcomes["r"].error == "aborted" and pair.prefill.num_waiting_tokens == 0 and not pair.prefill.waiting
        )
        assert pair.decode.num_free_blocks == free0
    finally:
        pair.close()


def test_deadline_between_chunks_stops_the_prefill_and_frees_blocks(tiny_ckpt):
    """A chunked prompt whose deadline passes after its first chunk gets no more chunks: the
    prefill side drops it (one "deadline exceeded" outcome, its K/V buffer released, nothing left
    queued) and the decode side frees its blocks at the same deadline."""
    path = tiny_ckpt("llama")
    pair = Pair(path, chunk_tokens=8)
    try:
        prompt = _prompts()[4]
        free0 = pair.decode.num_free_blocks
        deadline = time.time() + 60
        task = pair.first_chunk_by_hand("r", prompt, deadline)
        assert task.kv_buffer
        task.deadline = time.time() - 1  # it passes between the chunks
        with pair.prefill._cv:
            assert pair.prefill._take_batch() == []
        assert pair.outcomes["r"].error == "deadline exceeded" and not task.kv_buffer
        assert pair.prefill.num_waiting_tokens == 0 and not pair.prefill.waiting
        assert pair.decode.expire(now=deadline) == ["r"]
        assert isinstance(pair.events["r"][-1], Failed) and pair.events["r"][-1].kind == "deadline"
        assert pair.decode.num_free_blocks == free0
    finally:
        pair.close()


def test_lost_message_times_out_and_frees_blocks(tiny_ckpt):
    path = tiny_ckpt("llama")
    pair = Pair(path, timeout_s=0.3, drop_after=3)  # header, index, the first layer group's count, then silence
    try:
        free0 = pair.decode.num_free_blocks
        pair.submit("lost", _prompts()[3], SamplingParams(max_new_tokens=4))
        pair.wait_done(["lost"], timeout=10)
        assert isinstance(pair.events["lost"][-1], Failed)
        assert pair.decode.num_free_blocks == free0
        assert pair.decode.is_link_broken(0)
        # Later requests on the broken link fail at once instead of hanging.
        with pytest.raises(RuntimeError, match="broken"):
            pair.decode.reserve("next", [5, 6, 7], SamplingParams(max_new_tokens=2), 0, lambda e: None)
        assert pair.decode.num_free_blocks == free0
    finally:
        pair.close()


def test_abort_before_and_during_transfer_frees_blocks(tiny_ckpt):
    path = tiny_ckpt("llama")
    pair = Pair(path)
    try:
        free0 = pair.decode.num_free_blocks
        params = SamplingParams(max_new_tokens=50, ignore_eos=True)
        pair.decode.reserve("early", _prompts()[4], params, 0, lambda e: None)
        assert pair.decode.num_free_blocks < free0
        assert pair.decode.abort("early")
        assert pair.decode.num_free_blocks == free0
        # Aborted after the prefill was submitted: its K/V are drained and the link stays usable.
        pair.submit("mid", _prompts()[4], params)
        pair.decode.abort("mid")
        pair.submit("after", _prompts()[3], SamplingParams(max_new_tokens=3, ignore_eos=True))
        pair.wait_done(["after"])
        assert len(pair.tokens("after")) == 3
        assert not pair.decode.is_link_broken(0)
        deadline = time.monotonic() + 5
        while pair.decode.num_free_blocks != free0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pair.decode.num_free_blocks == free0
    finally:
        pair.close()


def test_concurrent_batches_on_one_link_stay_in_order():
    """Two producers' batches queue on one sender; the receiver sees each batch whole."""
    a, b = FakeTransport.pair()
    num_layers, shape = 3, (2, 4)
    sender = KVSender(a, num_layers, shape, torch.float32, 1.0)
    written: dict[int, list] = {}
    finished = []

    class Host:
        def begin_transfer(self, tid, n, start=0):
            from pop_disagg.disagg.kv_transfer import Transfer

            return Transfer(tid, f"r{tid}", n, torch.zeros(n, dtype=torch.long), 0, TransferState.SENDING)

        def write_layer(self, t, layer, k, v):
            written.setdefault(t.transfer_id, []).append((layer, k.clone(), v.clone()))

        def finish_transfer(self, t):
            finished.append(t.transfer_id)

        def fail_link(self, link, why, transfers):
            raise AssertionError(why)

    receiver = KVReceiver(b, 0, Host(), num_layers, shape, torch.float32, 1.0)
    batches = [SendBatch([1, 2], [3, 1], lambda _: None), SendBatch([3], [2], lambda _: None)]
    for batch in batches:
        sender.begin(batch)
    for layer in range(num_layers):
        for batch in batches:
            n = batch.total_tokens
            k = torch.full((n, *shape), float(batch.transfer_ids[0] * 10 + layer))
            sender.send_layer(batch, layer, k, -k)
    sender.close()
    receiver.join(5)
    assert finished == [1, 2, 3]
    for tid, rows in written.items():
        assert [layer for layer, _, _ in rows] == list(range(num_layers))
        first = 1 if tid in (1, 2) else 3
        for layer, k, v in rows:
            assert torch.all(k == first * 10 + layer) and torch.all(v == -k)
    assert [k.shape[0] for _, k, _ in written[1]] == [3] * num_layers
    assert [k.shape[0] for _, k, _ in written[2]] == [1] * num_layers


class _GatedTransport(FakeTransport):
    """A fake link whose first send waits for ``gate``: layers queue up behind it meanwhile."""

    def __init__(self, outbox, inbox, gate: threading.Event):
        super().__init__(outbox, inbox)
        self.gate, self.sent_shapes = gate, []

    def send(self, tensor, timeout):
        self.gate.wait(5)
        self.sent_shapes.append(tuple(tensor.shape))
        super().send(tensor, timeout)


def test_queued_layers_travel_as_one_group_and_land_per_layer():
    """Layers already waiting when the sender gets to them (POP's skipped run at the end of a
    prefill) go as one message; the receiver still writes each layer's own K/V."""
    import queue

    out, inbox = queue.Queue(), queue.Queue()
    gate = threading.Event()
    a, b = _GatedTransport(out, inbox, gate), FakeTransport(inbox, out)
    num_layers, shape = 5, (2, 4)
    sender = KVSender(a, num_layers, shape, torch.float32, 1.0)
    written, finished = [], []

    class Host:
        def begin_transfer(self, tid, n, start=0):
            from pop_disagg.disagg.kv_transfer import Transfer

            return Transfer(tid, f"r{tid}", n, torch.zeros(n, dtype=torch.long), 0, TransferState.SENDING)

        def write_layer(self, t, layer, k, v):
            written.append((layer, k.clone(), v.clone()))

        def finish_transfer(self, t):
            finished.append(t.transfer_id)

        def fail_link(self, link, why, transfers):
            raise AssertionError(why)

    receiver = KVReceiver(b, 0, Host(), num_layers, shape, torch.float32, 1.0)
    batch = SendBatch([7], [3], lambda _: None)
    sender.begin(batch)
    for layer in range(num_layers):  # all queued while the header waits at the gate
        sender.send_layer(batch, layer, torch.full((3, *shape), float(layer)), torch.full((3, *shape), layer - 0.5))
    gate.set()
    sender.close()
    receiver.join(5)
    assert finished == [7]
    # header, index (rows [transfer_id, start, num_tokens]), then one group: its count and (5, 2, T, Hkv, D); then the close header.
    assert a.sent_shapes == [(4,), (1, 3), (1,), (num_layers, 2, 3, *shape), (4,)]
    assert [layer for layer, _, _ in written] == list(range(num_layers))
    for layer, k, v in written:
        assert torch.all(k == layer) and torch.all(v == layer - 0.5)


def _gloo_peer(rank, address, q):
    from pop_disagg.disagg.kv_transfer import connect_pair

    if rank == 0:  # the prefill end hosts the link's rendezvous and tells the peer its port
        from pop_disagg.disagg.kv_transfer import host_pair_store

        store = host_pair_store("127.0.0.1")
        address.put(("127.0.0.1", store.port))
        link = connect_pair(store, 0, "gloo")
    else:
        link = connect_pair(address.get(timeout=30), 1, "gloo")
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    if rank == 0:
        link.send(t * 2, 5.0)
        link.send(t * 3, 5.0)
    else:
        got = torch.empty(3, 4)
        link.recv(got, 5.0)
        ok = torch.equal(got, t * 2)
        link.recv(got, 5.0)
        ok = ok and torch.equal(got, t * 3)
        try:  # nothing more comes: a bounded receive must fail, not hang
            link.recv(got, 0.5)
            ok = False
        except Exception as exc:
            ok = ok and "failed" in str(exc)
        q.put(ok)
    link.close()


def test_link_ends_compare_signatures_before_linking():
    """Both ends publish their signature in the link's store: equal ones link, a mismatch (another
    wire version or K/V geometry) fails both ends with both signatures named, and a peer that never
    publishes one (an older version) fails at the store's timeout instead of hanging."""
    from datetime import timedelta

    import torch.distributed as dist

    from pop_disagg.disagg.kv_transfer import (
        DECODE_RANK,
        PREFILL_RANK,
        TransferError,
        check_peer_signature,
        host_pair_store,
        link_signature,
    )

    arch = types.SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
    ours = link_signature(arch, torch.float32)
    assert "wire v" in ours and "30 layers" in ours and "3x64 float32" in ours
    for decode_sig, ok in (
        (ours, True),
        (link_signature(arch, torch.bfloat16), False),
        (ours.replace("wire v", "wire v9"), False),
    ):
        host = host_pair_store("127.0.0.1", timeout_s=10)
        client = dist.TCPStore("127.0.0.1", host.port, 2, False, timeout=timedelta(seconds=10))
        errors: dict[int, Exception] = {}

        def end(store, rank, sig):
            try:
                check_peer_signature(store, rank, sig)
            except TransferError as exc:
                errors[rank] = exc

        threads = [
            threading.Thread(target=end, args=a)
            for a in ((host, PREFILL_RANK, ours), (client, DECODE_RANK, decode_sig))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if ok:
            assert errors == {}
        else:
            assert set(errors) == {PREFILL_RANK, DECODE_RANK}
            assert all(ours in str(e) and decode_sig in str(e) for e in errors.values()), errors
    lonely = host_pair_store("127.0.0.1", timeout_s=1)
    with pytest.raises(TransferError, match="published no signature"):
        check_peer_signature(lonely, PREFILL_RANK, ours)


def test_gloo_transport_between_processes():
    ctx = mp.get_context("spawn")
    q, address = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_gloo_peer, args=(r, address, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        assert q.get(timeout=60) is True
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
