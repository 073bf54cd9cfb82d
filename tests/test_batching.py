"""Group commit (chatserver/batching.py): what arrives while a batch runs shares the next one;
every caller gets its own item's outcome, even when the caller gives up waiting."""

from __future__ import annotations

import asyncio

import pytest

from chatserver.batching import GroupCommit


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def apply(self, items: list[int]) -> list[str | Exception]:
        self.batches.append(items)
        self.started.set()
        await self.release.wait()
        return [ValueError(f"odd {item}") if item % 2 else f"even {item}" for item in items]


async def test_items_arriving_during_a_batch_share_the_next_one() -> None:
    recorder = Recorder()
    commit: GroupCommit[int, str] = GroupCommit(recorder.apply, max_batch=50)
    first = asyncio.ensure_future(commit.submit(0))
    await asyncio.wait_for(recorder.started.wait(), 5)
    rest = [asyncio.ensure_future(commit.submit(item)) for item in range(1, 8)]
    recorder.release.set()
    assert await first == "even 0"
    outcomes = await asyncio.gather(*rest, return_exceptions=True)
    assert recorder.batches == [[0], [1, 2, 3, 4, 5, 6, 7]]
    assert [str(outcome) for outcome in outcomes] == [
        "odd 1", "even 2", "odd 3", "even 4", "odd 5", "even 6", "odd 7",
    ]  # fmt: skip
    assert all(isinstance(outcome, ValueError) for outcome in outcomes[::2])


async def test_batches_are_capped() -> None:
    recorder = Recorder()
    recorder.release.set()
    commit: GroupCommit[int, str] = GroupCommit(recorder.apply, max_batch=3)
    await asyncio.gather(*(commit.submit(item) for item in range(0, 14, 2)))
    assert [len(batch) for batch in recorder.batches] == [3, 3, 1]
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(0, 14, 2))


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    calls = 0

    async def broken(items: list[int]) -> list[str | Exception]:
        nonlocal calls
        calls += 1
        raise RuntimeError("database away")

    commit: GroupCommit[int, str] = GroupCommit(broken, max_batch=10)
    outcomes = await asyncio.gather(*(commit.submit(i) for i in range(4)), return_exceptions=True)
    assert [str(outcome) for outcome in outcomes] == ["database away"] * 4
    # The next item starts a new batch: one failure does not stop the queue.
    with pytest.raises(RuntimeError):
        await commit.submit(9)
    assert calls == 2


async def test_a_caller_that_gives_up_leaves_its_item_in_the_batch() -> None:
    recorder = Recorder()
    commit: GroupCommit[int, str] = GroupCommit(recorder.apply, max_batch=10)
    impatient = asyncio.ensure_future(commit.submit(2))
    await asyncio.wait_for(recorder.started.wait(), 5)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    patient = asyncio.ensure_future(commit.submit(4))
    recorder.release.set()
    assert await patient == "even 4"
    assert recorder.batches == [[2], [4]]  # the abandoned item was applied all the same
