# The chat server image: daphne (web), chat_worker and manage.py commands all run from it.
# docker-compose.yml builds it; the command decides which process a container is.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the package itself (not an editable checkout), then drop the sources.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chatserver ./chatserver
COPY consumers ./consumers
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /app --create-home chat
WORKDIR /app
COPY manage.py ./
ENV DJANGO_SETTINGS_MODULE=chatserver.settings \
    STATIC_ROOT=/app/var/static
# The admin's static files, for the proxy to serve (docker-compose.yml refreshes them on migrate).
RUN python manage.py collectstatic --noinput --verbosity 0 && chown -R chat:chat /app/var

USER chat
EXPOSE 8000
# Access log off: daphne's access log prints device ids and the webhook token; the server logs
# every request itself, redacted.
CMD ["daphne", "--access-log", "/dev/null", "-b", "0.0.0.0", "-p", "8000", "--ping-interval", "20", "chatserver.asgi:application"]
