"""``n`` > 1: n independent samples of one prompt, as n router calls.

Each sample is a request of its own to the router (its own id, blocks, decode slot). They share
the prompt's blocks through the prefix cache: the first sample goes alone until its first token
(by then its prompt's full blocks are published), and the others start then, each taking those
blocks and computing from the first block it does not share (the boundary token's on; with
disaggregation nothing is transferred for them, see docs/serving.md). With a ``seed``, sample
``i`` uses ``seed + i``, so a seeded request is reproducible yet its samples differ. Unary: the n
results are awaited together. Streaming: every stream's first item is awaited before the response
starts (a refusal keeps its status), then ``merged`` interleaves the streams' items as they come,
tagged with their choice index; closing it (the client went away) cancels every stream, which
aborts each request on its workers, as for n = 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from ..control.calls import GenerateCall, GenerateResult


def sample_calls(call: GenerateCall, n: int) -> list[GenerateCall]:
    """The n calls of one request (the call itself when n == 1)."""
    if n == 1:
        return [call]
    seed = call.params.seed

    def child(i: int) -> GenerateCall:
        params = call.params if seed is None else call.params.model_copy(update={"seed": seed + i})
        rid = None if call.request_id is None else f"{call.request_id}-{i}"
        return dataclasses.replace(call, params=params, request_id=rid)

    return [child(i) for i in range(n)]


async def _gather_or_cancel(awaitables) -> list:
    """All results in order; if one fails (or this is cancelled), the rest are cancelled and awaited
    before the error propagates."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def generate_all(router, calls: list[GenerateCall]) -> list[GenerateResult]:
    """The n unary results (the others start at the first one's first token); if one fails, the
    others are cancelled (aborted on their workers)."""
    if len(calls) == 1:
        return [await router.generate(calls[0])]
    started = asyncio.Event()
    first = asyncio.ensure_future(router.generate(calls[0], on_first_token=started.set))
    waiting = asyncio.ensure_future(started.wait())
    try:
        await asyncio.wait([first, waiting], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        raise
    finally:
        waiting.cancel()
    return await _gather_or_cancel([first, *(router.generate(c) for c in calls[1:])])


async def first_items(streams: list) -> list:
    """Each stream's first item, the first stream's before the others start (they reuse its
    prompt's blocks); if one fails, the others are cancelled and closed and it raises."""
    try:
        head = await streams[0].__anext__()
        return [head, *await _gather_or_cancel(s.__anext__() for s in streams[1:])]
    except BaseException:
        for s in streams:
            await s.aclose()
        raise


async def merged(streams: list, firsts: list) -> AsyncIterator[tuple[int, object]]:
    """(choice index, item) from every stream until each has given its ``GenerateResult``."""
    if len(streams) == 1:  # no tasks, no queue: the common case stays as direct as before
        item = firsts[0]
        while True:
            yield 0, item
            if isinstance(item, GenerateResult):
                return
            item = await streams[0].__anext__()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            await queue.put((i, firsts[i]))
            if not isinstance(firsts[i], GenerateResult):
                async for item in streams[i]:
                    await queue.put((i, item))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((i, exc))
        finally:
            await streams[i].aclose()

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= isinstance(item, GenerateResult)
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
