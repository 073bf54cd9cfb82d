"""Settings of the stock Channels reference app: as little as a Channels project needs.

Environment: ``REDIS_URL``; ``STOCK_PREFIX`` (the layer's key prefix, so the run can delete its
keys afterwards); ``STOCK_CAPACITY`` (unset: channels-redis's default capacity of 100).
Everything else of the channel layer is channels-redis's default.
"""

from __future__ import annotations

import os
from typing import Any

SECRET_KEY = "bench-reference-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["channels"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "bench.reference.stock.urls"
ASGI_APPLICATION = "bench.reference.stock.asgi.application"
DATABASES: dict[str, Any] = {}
USE_TZ = True
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}

_config: dict[str, Any] = {
    "hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")],
    "prefix": os.environ.get("STOCK_PREFIX", "asgi"),
}
if os.environ.get("STOCK_CAPACITY"):
    _config["capacity"] = int(os.environ["STOCK_CAPACITY"])

CHANNEL_LAYERS = {
    "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": _config},
}
