# tracker: one image for every role (api, worker, beat, migrate, simulator).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TRACKER_API_HOST=0.0.0.0 \
    TRACKER_LOG_FORMAT=json

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY tracker ./tracker
COPY migrations ./migrations
RUN pip install . && useradd --system --uid 10001 tracker
USER tracker

EXPOSE 8000 9101
ENTRYPOINT ["tracker"]
CMD ["up"]
