"""Prometheus series (operations.md, "Health and metrics"). Names are a stable interface."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SOCKETS_OPEN = Gauge("chat_sockets_open", "WebSocket connections open in this process")
MESSAGES = Counter(
    "chat_messages_total",
    "Chat messages by direction (in: from devices, out: to devices) and route",
    ["direction", "route"],
)
WEBHOOKS = Counter("chat_webhooks_total", "Zammad webhook deliveries by outcome", ["outcome"])
PENDING_WORK = Gauge("chat_pending_work", "Background work items waiting or running")
PENDING_WORK_OLDEST = Gauge(
    "chat_pending_work_oldest_seconds", "Age of the oldest background work item waiting"
)
PUSH_LATENCY = Histogram(
    "chat_push_latency_seconds",
    "From webhook received to frame sent to a socket",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
UPSTREAM_SECONDS = Histogram(
    "chat_upstream_seconds",
    "Duration of calls to Zammad and the chat bot",
    ["service"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90),
)
UPSTREAM_ERRORS = Counter(
    "chat_upstream_errors_total", "Failed calls to Zammad and the chat bot", ["service", "kind"]
)
POLL_CACHE_LISTENING = Gauge(
    "chat_poll_cache_listening",
    "1 while this process hears PostgreSQL's chat changes and answers unchanged polls from memory",
)
NOTIFICATION_QUEUE_USAGE = Gauge(
    "chat_notification_queue_usage",
    "How full PostgreSQL's notification queue is, 0 to 1 (read every 5 s by the poll cache's "
    "listener; at 1 commits that notify fail)",
)
POLL_ANSWERS = Counter(
    "chat_poll_answers_total",
    "REST reads of a conversation by where the answer came from (memory: no query)",
    ["source"],
)
