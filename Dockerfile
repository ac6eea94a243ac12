# tracker: one image for every role (api, worker, beat, migrate, simulator).
# The base is pinned to a patch release (bump it on purpose); the dependencies are the
# hash-checked pins of requirements.lock, the same versions CI tests.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRACKER_API_HOST=0.0.0.0 \
    TRACKER_LOG_FORMAT=json

WORKDIR /app
# Dependencies first: this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md alembic.ini ./
COPY tracker ./tracker
COPY migrations ./migrations
RUN pip install . --no-deps && useradd --system --uid 10001 tracker
USER tracker

EXPOSE 8000 9101
ENTRYPOINT ["tracker"]
CMD ["up"]
