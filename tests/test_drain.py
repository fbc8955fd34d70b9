"""SIGTERM to a real ``pop-disagg serve`` process: the request in flight completes, new requests get
``UNAVAILABLE``, and the process exits 0 within the drain timeout leaving no process behind.

The server runs in its own process session (embedded Ray, 1P1D POP, tiny checkpoint), bound to
127.0.0.1 on a free port; the test kills the session if anything goes wrong.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import grpc

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg._proto import generation_pb2_grpc as pb_grpc

DRAIN_TIMEOUT_S = 60


def _read_lines(stream, lines: queue.Queue, log: list[str]) -> None:
    for line in stream:
        log.append(line)
        lines.put(line)


def _wait_for(lines: queue.Queue, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no log line matching {pattern!r} within {timeout}s")


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (Ray's actors have process groups of their own, not sessions)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        except (OSError, IndexError):
            continue
        if entry.isdigit() and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tiny_ckpt):
    cmd = [
        sys.executable,
        "-m",
        "pop_disagg.cli",
        "serve",
        "--model",
        tiny_ckpt("qwen2"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--threads",
        "1",
        "--kv-cache-mb",
        "2",
        "--max-model-len",
        "256",
        "--drain-timeout",
        str(DRAIN_TIMEOUT_S),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    lines, log = queue.Queue(), []
    threading.Thread(target=_read_lines, args=(proc.stderr, lines, log), daemon=True).start()
    try:
        port = int(_wait_for(lines, r"ready on 127\.0\.0\.1:(\d+)", 300).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            stream = stub.GenerateStream(
                pb.GenerateRequest(prompt_token_ids=list(range(3, 11)), max_new_tokens=200, ignore_eos=True),
                timeout=120,
            )
            chunks = [next(stream)]  # decoding now
            rest: list = []
            consumer = threading.Thread(target=lambda: rest.extend(stream), daemon=True)
            consumer.start()
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _wait_for(lines, r"draining", 60)
            is_in_flight = consumer.is_alive()
            try:
                stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_new_tokens=2), timeout=30)
                raise AssertionError("a request sent while draining was served")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                if is_in_flight and consumer.is_alive():  # refused by the drain, not by a closed port
                    assert "shutting down" in exc.details()
            consumer.join(DRAIN_TIMEOUT_S)
            chunks += rest
        assert is_in_flight, "the request finished before SIGTERM was handled: make it longer"
        assert sum(len(c.token_ids) for c in chunks) == 200
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(DRAIN_TIMEOUT_S) == 0, "".join(log[-30:])
        assert time.monotonic() - t_term < DRAIN_TIMEOUT_S
        # Ray's processes (raylet, GCS, the worker actors) lived in the server's session: all gone.
        assert _wait_for_gone(proc.pid, 30), f"processes of the server's session outlived it: {_session_pids(proc.pid)}"
        assert not any("Traceback" in line for line in log), "".join(log[-30:])
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(30)


def _wait_for_gone(sid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _session_pids(sid)
