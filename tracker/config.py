"""Settings: every knob of the service, read once from the environment and `.env`.

Names and defaults of the `TRACKER_*` variables are part of the contract (docs/configuration.md).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tracker.errors import ConfigError

ENV_PREFIX = "TRACKER_"

DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
SEVEN_DAYS = 7 * 24 * 3600
# Webhook secrets are `whsec_` and the base64 key, as Standard Webhooks libraries expect.
WEBHOOK_SECRET_PREFIX = "whsec_"


class Settings(BaseSettings):
    """The service's configuration; every setting: docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    database_url: str = Field(
        "sqlite:///tracker.db", description="SQLAlchemy URL; PostgreSQL in production."
    )
    broker_url: str | None = Field(
        None,
        description=(
            "Celery broker, `redis://localhost:6379/0` in production. Unset: an embedded "
            "broker in a SQLite file beside the database, needing no server."
        ),
    )
    upstream_url: str = Field(
        "https://api.acedata.cloud", description="Base URL of the AceData task APIs."
    )
    upstream_token: SecretStr | None = Field(None, description="Bearer token for the upstream.")
    poll_interval: float = Field(5.0, gt=0, description="Seconds between polls of a fresh task.")
    max_poll_interval: float = Field(
        60.0, gt=0, description="Polls of long-running tasks back off up to this many seconds."
    )
    batch_size: int = Field(50, ge=1, le=500, description="Ids per `retrieve_batch` call.")
    upstream_rps: float = Field(
        20.0, gt=0, description="Upstream requests per second per token, across all workers."
    )
    task_timeout: int = Field(
        3600,
        ge=1,
        le=SEVEN_DAYS,
        description="Seconds before a non-terminal task is `timed_out`.",
    )
    not_found_after: int = Field(
        10, ge=1, description="Consecutive batch misses before a task is checked for `not_found`."
    )
    webhook_timeout: float = Field(15.0, gt=0, description="Seconds per webhook attempt.")
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        DEFAULT_RETRY_SCHEDULE,
        description="Seconds before each webhook attempt, comma-separated.",
    )
    webhook_allow_private: bool = Field(
        False, description="Allow callbacks to non-public addresses (development, tests)."
    )
    api_host: str = Field("127.0.0.1", description="Where the API listens.")
    api_port: int = Field(8000, ge=0, le=65535, description="Port of the API.")
    destination_concurrency: int = Field(
        8, ge=1, description="Webhook attempts in flight to one destination, across all workers."
    )
    destination_failures: int = Field(
        20, ge=1, description="Consecutive failed attempts that open a destination's circuit."
    )
    destination_probe: float = Field(
        60.0, gt=0, description="Seconds between probe attempts to an open destination."
    )
    destination_disable_after: float = Field(
        432000.0,
        gt=0,
        description="Seconds a destination fails without a success before it is disabled.",
    )
    retention_days: float = Field(
        0.0,
        ge=0,
        description="Days a terminal task and its history are kept; 0 keeps them for ever.",
    )

    # Beyond the contract: operational knobs with safe defaults.
    secret_rotation_grace: int = Field(
        86400, ge=0, description="Seconds an old webhook secret stays valid after a rotation."
    )
    poll_lease: float = Field(
        60.0, gt=0, description="Seconds a worker holds claimed tasks before others may retry."
    )
    delivery_lease: float | None = Field(
        None,
        gt=0,
        description="Seconds a worker holds a claimed delivery; default webhook timeout + 30.",
    )
    sweep_interval: float = Field(
        5.0, gt=0, description="Seconds between sweeps for deadlines and due deliveries."
    )
    upstream_timeout: float = Field(
        30.0, gt=0, description="Read timeout of one upstream request, in seconds."
    )
    metrics_port: int = Field(
        9101, ge=0, le=65535, description="Port of the worker's Prometheus endpoint; 0 disables."
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: str = Field(
        "auto", description="`json`, `console`, or `auto` (console on a terminal, else json)."
    )

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            if not parts:
                raise ValueError("needs at least one delay, e.g. 0,5,300")
            try:
                return tuple(float(part) for part in parts)
            except ValueError:
                raise ValueError(
                    f"must be comma-separated seconds, e.g. 0,5,300 (got {value!r})"
                ) from None
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _check_schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("needs at least one delay, e.g. 0,5,300")
        if any(delay < 0 for delay in value):
            raise ValueError(f"delays cannot be negative (got {value!r})")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql", "postgres")):
            raise ValueError(f"must be a sqlite:// or postgresql:// URL (got {value!r})")
        return value

    @field_validator("upstream_url")
    @classmethod
    def _check_upstream_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https:// (got {value!r})")
        return value.rstrip("/")

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in {"auto", "json", "console"}:
            raise ValueError(f"must be auto, json or console (got {value!r})")
        return value

    @property
    def upstream_bearer(self) -> str | None:
        """The upstream token in clear, for the Authorization header; None when unset."""
        return self.upstream_token.get_secret_value() if self.upstream_token else None

    @property
    def webhook_lease(self) -> float:
        """How long a claimed delivery stays with its worker."""
        return self.delivery_lease or self.webhook_timeout + 30.0

    @property
    def effective_broker_url(self) -> str:
        """The broker to use: the configured one, or the embedded SQLite broker."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{embedded_broker_path(self.database_url)}"

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.broker_url


def embedded_broker_path(database_url: str) -> Path:
    """Where the embedded broker keeps its queue: beside a SQLite database, else here."""
    prefix = "sqlite:///"
    if database_url.startswith(prefix) and database_url != "sqlite:///:memory:":
        db_path = Path(database_url[len(prefix) :])
        return db_path.with_name(db_path.stem + "-broker.db").absolute()
    return Path("tracker-broker.db").absolute()


def env_name(field: str) -> str:
    """The environment variable that sets a Settings field."""
    return ENV_PREFIX + field.upper()


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one message per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"{env_name(field)}={error.get('input')!r}: {error['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return load_settings()
