"""Settings, read from the environment with embedded defaults.

Nothing set gives a working development server: SQLite, an in-process channel layer.
Every variable is documented in docs/configuration.md.
"""

import os
from pathlib import Path

import dj_database_url
import django_stubs_ext

# Lets the admin classes carry their model as a type parameter (``ModelAdmin[Region]``).
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "insecure-development-key-change-me")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chatserver",
]

MIDDLEWARE = [
    "chatserver.middleware.RequestLogMiddleware",
    "chatserver.middleware.ApiMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chatserver.urls"
ASGI_APPLICATION = "chatserver.asgi.application"
APPEND_SLASH = True

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Python's garbage collector thresholds (gc.set_threshold) for the server process: young
# collections after this many allocations, then every n-th of those older ones.
GC_THRESHOLDS = tuple(int(part) for part in env_str("GC_THRESHOLDS", "50000,20,20").split(","))

DATABASE_URL = env_str("DATABASE_URL", "")
DB_POOL_MAX_SIZE = env_int("DB_POOL_MAX_SIZE", 16)
# Threads in which views and sockets reach the database (chatserver/db.py); each holds a pooled
# connection while it works, so keep it below DB_POOL_MAX_SIZE.
DB_THREADS = env_int("DB_THREADS", 8)
# How long a request waits for a free connection: long enough for a burst to queue, short
# enough that a database outage is answered 503 rather than hanging.
DB_POOL_TIMEOUT_SECS = env_float("DB_POOL_TIMEOUT_SECS", 3)
# Connections of the event loop's own pool for the reads of polls and sockets
# (chatserver/reads.py), on top of DB_POOL_MAX_SIZE.
DB_READ_CONNECTIONS = env_int("DB_READ_CONNECTIONS", 4)
# Memory for the answers of polls of unchanged chats, per process (chatserver/poll_cache.py;
# PostgreSQL only, 0 switches it off).
POLL_CACHE_BYTES = env_int("POLL_CACHE_BYTES", 64 * 1024 * 1024)
if DATABASE_URL:
    # A connection pool per process (psycopg's, through Django 5.1+). Under ASGI every request
    # and every socket's database call runs in a thread of its own: connections kept per thread
    # (CONN_MAX_AGE > 0) outlive their threads and exhaust PostgreSQL (50 concurrent webhooks
    # held 80+ connections, tests/test_abuse.py), and none kept at all costs a connect per call.
    # The pool checks a connection before handing it out, so a database restart costs nothing
    # more than the outage itself.
    # (Django passes the health checks to the pool as its connection check.)
    DATABASES = {
        "default": dj_database_url.parse(DATABASE_URL, conn_max_age=0, conn_health_checks=True)
    }
    # Parameters travel apart from the query (psycopg's server-side binding) instead of being
    # quoted into it in Python, and queries run often are prepared once per connection.
    DATABASES["default"].setdefault("OPTIONS", {})["server_side_binding"] = True
    DATABASES["default"]["OPTIONS"]["pool"] = {
        "min_size": 2,
        "max_size": DB_POOL_MAX_SIZE,
        "timeout": DB_POOL_TIMEOUT_SECS,
    }
else:
    # The embedded default. IMMEDIATE transactions and a busy timeout keep a separate worker
    # process from turning concurrent writes into "database is locked" errors.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
            # Tests on a file too, like the server: the default in-memory test database shares
            # one cache between connections, whose table locks ("database table is locked")
            # ignore the busy timeout that the server's database threads rely on.
            "TEST": {"NAME": str(BASE_DIR / "test-db.sqlite3")},
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "")
# channels-redis as shipped loses pushes under load; see docs/operations.md, "Channel layer".
CHANNEL_CAPACITY = env_int("CHANNEL_CAPACITY", 10_000)
REDIS_MAX_CONNECTIONS = env_int("REDIS_MAX_CONNECTIONS", 64)
# Prefix of every Redis key the server writes (channel layer, limits): one Redis, many deployments.
CHANNEL_PREFIX = env_str("CHANNEL_PREFIX", "chat")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "chatserver.layer.ChatChannelLayer",
            "CONFIG": {
                "hosts": [{"address": REDIS_URL}],
                "capacity": CHANNEL_CAPACITY,
                # Seconds a push may wait in Redis before it is dropped (then caught up from
                # the store); above the longest burst a process has to work through.
                "expiry": 300,
                "group_expiry": 86400,
                "prefix": CHANNEL_PREFIX,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": CHANNEL_CAPACITY, "expiry": 60},
        }
    }

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env_str("STATIC_ROOT", str(BASE_DIR / "var" / "static"))

# --- Chat behaviour -------------------------------------------------------------------------

CHATBOT_URL = env_str("CHATBOT_URL", "").rstrip("/")
ZAMMAD_TIMEOUT_SECS = env_float("ZAMMAD_TIMEOUT_SECS", 10)
CHATBOT_ANSWER_TIMEOUT_SECS = env_float("CHATBOT_ANSWER_TIMEOUT_SECS", 90)
CHATBOT_TRANSLATE_TIMEOUT_SECS = env_float("CHATBOT_TRANSLATE_TIMEOUT_SECS", 20)

CHAT_EXPIRY_DAYS = env_float("CHAT_EXPIRY_DAYS", 30)
CHAT_MESSAGE_MAX_CHARS = env_int("CHAT_MESSAGE_MAX_CHARS", 10_000)
CHAT_BOT_HISTORY_MESSAGES = 10
CHAT_ZAMMAD_TICKET_GROUP = env_str("CHAT_ZAMMAD_TICKET_GROUP", "integreat-chat")

CHAT_ATTACHMENT_MAX_BYTES = env_int("CHAT_ATTACHMENT_MAX_BYTES", 10 * 1024 * 1024)
CHAT_ATTACHMENT_MAX_COUNT = env_int("CHAT_ATTACHMENT_MAX_COUNT", 3)
CHAT_ATTACHMENT_TYPES = env_list(
    "CHAT_ATTACHMENT_TYPES",
    "image/png,image/jpeg,image/gif,image/webp,application/pdf,text/plain",
)
WEBHOOK_MAX_BODY_BYTES = env_int("WEBHOOK_MAX_BODY_BYTES", 1024 * 1024)
WEBHOOK_DELIVERY_RETENTION_DAYS = env_int("WEBHOOK_DELIVERY_RETENTION_DAYS", 7)
WS_MAX_FRAME_BYTES = env_int("WS_MAX_FRAME_BYTES", 64 * 1024)
# Connections waiting to be accepted (Twisted's default of 50 drops handshakes when a thousand
# sockets reconnect at once).
LISTEN_BACKLOG = env_int("LISTEN_BACKLOG", 1024)
WS_PING_INTERVAL_SECS = env_float("WS_PING_INTERVAL_SECS", 20)
# How long a WebSocket's opening handshake may take before daphne drops the connection (its
# default, 5 s, turned a reconnect storm that queued for a few seconds into mass failures).
WS_HANDSHAKE_TIMEOUT_SECS = env_float("WS_HANDSHAKE_TIMEOUT_SECS", 20)
WS_ALLOWED_ORIGINS = env_list("WS_ALLOWED_ORIGINS", "")

CHAT_RATE_LIMITS_ENABLED = env_bool("CHAT_RATE_LIMITS_ENABLED", True)
RATE_LIMIT_WINDOW_SECS = env_int("RATE_LIMIT_WINDOW_SECS", 60)
RATE_LIMIT_REST_PER_DEVICE = env_int("RATE_LIMIT_REST_PER_DEVICE", 120)
RATE_LIMIT_REST_PER_IP = env_int("RATE_LIMIT_REST_PER_IP", 600)
RATE_LIMIT_SENDS_PER_DEVICE = env_int("RATE_LIMIT_SENDS_PER_DEVICE", 30)
WS_MAX_CONNECTIONS_PER_DEVICE = env_int("WS_MAX_CONNECTIONS_PER_DEVICE", 5)
WS_MAX_CONNECTIONS_PER_IP = env_int("WS_MAX_CONNECTIONS_PER_IP", 200)
TRUSTED_PROXY_HEADER = env_str("TRUSTED_PROXY_HEADER", "")

WORKER_POLL_INTERVAL_SECS = env_float("WORKER_POLL_INTERVAL_SECS", 0.2)
WORKER_CONCURRENCY = env_int("WORKER_CONCURRENCY", 8)
WORKER_LEASE_SECS = env_float("WORKER_LEASE_SECS", 120)
WORKER_MAX_BACKOFF_SECS = env_float("WORKER_MAX_BACKOFF_SECS", 300)

# The browser demo client at /demo/ (chatserver/demo.py): development only. `manage.py demo`
# turns it on and points the agent console link at its fake Zammad.
CHAT_DEMO_PAGE = env_bool("CHAT_DEMO_PAGE", DEBUG)
CHAT_DEMO_ZAMMAD_CONSOLE_URL = env_str("CHAT_DEMO_ZAMMAD_CONSOLE_URL", "")

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
# "plain" (default) or "json" (one object per line). Both carry the request, chat and webhook
# delivery ids where known (chatserver/logging.py).
LOG_FORMAT = env_str("LOG_FORMAT", "plain").strip().lower()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {"()": "chatserver.logging.ContextFilter"},
        "redact_paths": {"()": "chatserver.logging.RedactPathsFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s%(context)s %(message)s"},
        "json": {"()": "chatserver.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.request": {"level": "ERROR", "filters": ["redact_paths"]},
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
    },
}
