"""Group commit: requests that arrive while a batch is being written share the next batch.

A webhook costs a thread hand-off, a transaction with its commit, and a publish round to Redis.
Under load these fixed costs dominated (docs/performance.md), so ``GroupCommit`` runs one
``apply`` call for everything submitted while the previous call was running: one hand-off, one
commit and one publish round for many deliveries. An idle server still runs a lone item at
once; nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

# An outcome per item, in order: a value, or the exception that item's caller gets.
Apply = Callable[[list[Item]], Awaitable[Sequence[Outcome | Exception]]]


@dataclass
class _Queue(Generic[Item, Outcome]):
    waiting: list[tuple[Item, asyncio.Future[Outcome]]] = field(default_factory=list)
    runner: asyncio.Task[None] | None = None


class GroupCommit(Generic[Item, Outcome]):
    def __init__(self, apply: Apply[Item, Outcome], max_batch: int) -> None:
        self._apply = apply
        self._max_batch = max_batch
        # Futures and tasks belong to their event loop (tests run one per test).
        self._queues: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _Queue[Item, Outcome]
        ] = weakref.WeakKeyDictionary()

    async def submit(self, item: Item) -> Outcome:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        future: asyncio.Future[Outcome] = loop.create_future()
        queue.waiting.append((item, future))
        if queue.runner is None or queue.runner.done():
            queue.runner = loop.create_task(self._run(queue))
        # Shielded: a caller that gives up (a client that hangs up) leaves its item in the batch,
        # so a batch never loses an item half-way.
        return await asyncio.shield(future)

    async def wait_idle(self, timeout_secs: float) -> None:
        """Wait until this loop's queue has run dry (at most ``timeout_secs``)."""
        queue = self._queues.get(asyncio.get_running_loop())
        if queue is not None and queue.runner is not None and not queue.runner.done():
            await asyncio.wait([queue.runner], timeout=timeout_secs)

    async def _run(self, queue: _Queue[Item, Outcome]) -> None:
        while queue.waiting:
            batch = queue.waiting[: self._max_batch]
            del queue.waiting[: self._max_batch]
            try:
                outcomes = await self._apply([item for item, _ in batch])
            except Exception as error:  # the whole batch failed: each caller gets the error
                outcomes = [error] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
