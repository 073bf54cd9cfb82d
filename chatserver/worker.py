"""The worker: claims due ``Work`` with row locks, runs its handler, retries with backoff.

Any number of workers may run against one database. A claimed item carries a lease that its
worker extends while the handler runs; an item whose lease ran out (its worker died) is claimed
again, and its handler recognises what the first attempt already did. Within a chat and a lane,
items run one at a time in id order, so a chat's messages reach Zammad in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import Exists, Min, OuterRef, Q
from django.utils import timezone

from . import background, metrics
from .errors import UpstreamError
from .models import WebhookDelivery, Work

logger = logging.getLogger(__name__)

# Translations are a courtesy: after this many temporary failures they are given up. Messages
# are never given up while Zammad is only unreachable.
FINISHED_WORK_RETENTION_DAYS = 7
PURGE_INTERVAL_SECS = 3600

GIVE_UP_AFTER_ATTEMPTS = {Work.Kind.TRANSLATE_QUESTION: 20, Work.Kind.TRANSLATE_REPLY: 20}


def claim() -> int | None:
    now = timezone.now()
    earlier_unfinished = Work.objects.filter(
        chat_id=OuterRef("chat_id"),
        lane=OuterRef("lane"),
        id__lt=OuterRef("id"),
        state__in=[Work.State.QUEUED, Work.State.RUNNING],
    )
    with transaction.atomic():
        work = (
            Work.objects.select_for_update(skip_locked=True)
            .filter(
                Q(state=Work.State.QUEUED, run_after__lte=now)
                | Q(state=Work.State.RUNNING, lease_until__lt=now)
            )
            .exclude(Exists(earlier_unfinished))
            .order_by("id")
            .first()
        )
        if work is None:
            return None
        work.state = Work.State.RUNNING
        work.attempts += 1
        work.lease_until = now + timedelta(seconds=settings.WORKER_LEASE_SECS)
        work.save(update_fields=["state", "attempts", "lease_until"])
        return work.pk


def extend_lease(work_id: int) -> None:
    Work.objects.filter(pk=work_id, state=Work.State.RUNNING).update(
        lease_until=timezone.now() + timedelta(seconds=settings.WORKER_LEASE_SECS)
    )


def finish(work_id: int, error: UpstreamError | None) -> Work:
    work = Work.objects.get(pk=work_id)
    now = timezone.now()
    if error is None:
        work.state = Work.State.DONE
        work.finished_at = now
        work.last_error = ""
    elif not error.temporary or work.attempts >= GIVE_UP_AFTER_ATTEMPTS.get(
        Work.Kind(work.kind), 1_000_000
    ):
        work.state = Work.State.FAILED
        work.finished_at = now
        work.last_error = str(error)
    else:
        work.state = Work.State.QUEUED
        work.run_after = now + timedelta(seconds=backoff_secs(work.attempts))
        work.last_error = str(error)
    work.lease_until = None
    work.save(update_fields=["state", "finished_at", "last_error", "run_after", "lease_until"])
    return work


def backoff_secs(attempts: int) -> float:
    """Exponential with jitter: 1, 2, 4 ... seconds, capped."""
    ceiling: float = settings.WORKER_MAX_BACKOFF_SECS
    base = min(ceiling, 2.0 ** max(0, attempts - 1))
    return base * random.uniform(0.8, 1.2)


def queue_depth() -> tuple[int, float]:
    unfinished = Work.objects.filter(state__in=[Work.State.QUEUED, Work.State.RUNNING])
    oldest = unfinished.aggregate(oldest=Min("created_at"))["oldest"]
    age = (timezone.now() - oldest).total_seconds() if oldest else 0.0
    return unfinished.count(), age


async def run_one() -> bool:
    """Claim and run one item; False when nothing was due."""
    work_id = await database_sync_to_async(claim)()
    if work_id is None:
        return False
    heartbeat = asyncio.create_task(_keep_lease(work_id))
    error: UpstreamError | None = None
    try:
        work = await background.run(work_id)
    except UpstreamError as caught:
        error = caught
        work = None
    finally:
        heartbeat.cancel()
    done = await database_sync_to_async(finish)(work_id, error)
    if error is not None:
        level = logging.ERROR if done.state == Work.State.FAILED else logging.WARNING
        logger.log(
            level,
            "work %s (%s, chat %s) attempt %s: %s%s",
            done.pk,
            done.kind,
            done.chat_id,
            done.attempts,
            error,
            "; giving up" if done.state == Work.State.FAILED else "; will retry",
        )
        if done.state == Work.State.FAILED:
            await background.mark_failed(await background.load_work(work_id))
    elif work is not None:
        logger.debug("work %s (%s) done", work.pk, work.kind)
    return True


async def _keep_lease(work_id: int) -> None:
    while True:
        await asyncio.sleep(settings.WORKER_LEASE_SECS / 3)
        await database_sync_to_async(extend_lease)(work_id)


async def run_slot(stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            ran = await run_one()
        except Exception:
            # A bug or a database outage: keep the worker alive, the item's lease brings it back.
            logger.exception("worker slot failed")
            ran = False
        if not ran:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.WORKER_POLL_INTERVAL_SECS)


async def report_depth(stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            depth, age = await database_sync_to_async(queue_depth)()
            metrics.PENDING_WORK.set(depth)
            metrics.PENDING_WORK_OLDEST.set(age)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5)


def purge_old_records() -> tuple[int, int]:
    """Webhook deliveries are kept for the replay window only, finished work for a week."""
    now = timezone.now()
    deliveries, _ = WebhookDelivery.objects.filter(
        received_at__lt=now - timedelta(days=settings.WEBHOOK_DELIVERY_RETENTION_DAYS)
    ).delete()
    finished, _ = Work.objects.filter(
        state=Work.State.DONE, finished_at__lt=now - timedelta(days=FINISHED_WORK_RETENTION_DAYS)
    ).delete()
    return deliveries, finished


async def purge_periodically(stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            deliveries, finished = await database_sync_to_async(purge_old_records)()
            if deliveries or finished:
                logger.info("purged %s webhook deliveries, %s finished work", deliveries, finished)
        except Exception:
            logger.warning("purging old records failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PURGE_INTERVAL_SECS)


async def run_worker(stop: asyncio.Event, concurrency: int | None = None) -> None:
    slots = concurrency or settings.WORKER_CONCURRENCY
    logger.info("worker started with %s slots", slots)
    await asyncio.gather(
        report_depth(stop), purge_periodically(stop), *(run_slot(stop) for _ in range(slots))
    )
    logger.info("worker stopped")
