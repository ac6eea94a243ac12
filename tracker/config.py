"""Settings: every knob of the service, read once from the environment and `.env`.

Names and defaults of the `TRACKER_*` variables are part of the contract (docs/configuration.md).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tracker.errors import ConfigError

ENV_PREFIX = "TRACKER_"
# A service's name, as registrations and the upstream's paths spell it.
SERVICE_NAME = re.compile(r"[a-z0-9-]{1,32}")

DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
SEVEN_DAYS = 7 * 24 * 3600
DEFAULT_MAX_POLL_INTERVAL = 60.0
# The longest receiver Retry-After honoured, in seconds.
DEFAULT_MAX_RETRY_AFTER = 300.0
# Webhook secrets are `whsec_` and the base64 key, as Standard Webhooks libraries expect.
WEBHOOK_SECRET_PREFIX = "whsec_"
# The dashboard (/ui): how long a sign-in lasts, and how long a one-time sign-in link
# (`tracker demo`, `tracker clients sign-in-link`) may wait to be opened.
DASHBOARD_SESSION_SECONDS = 12 * 3600
DASHBOARD_SIGN_IN_LINK_SECONDS = 600


class Settings(BaseSettings):
    """The service's configuration; every setting: docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        # `TRACKER_UPSTREAM_TOKEN=` (in the environment or `.env`) is no token, not an
        # empty one: an empty value counts as unset, for every variable.
        env_ignore_empty=True,
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
        DEFAULT_MAX_POLL_INTERVAL,
        gt=0,
        description=(
            "Polls of long-running tasks back off up to this many seconds; also the longest "
            "an upstream `Retry-After` pauses the token."
        ),
    )
    service_poll_intervals: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description=(
            "Seconds between polls of a fresh task, per service, as `suno=10,kling=15`; "
            "overrides the pace a service's vendor advises (`tracker services`). Never "
            "below `TRACKER_POLL_INTERVAL`; older tasks back off as any other."
        ),
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
    max_retry_after: float = Field(
        DEFAULT_MAX_RETRY_AFTER,
        ge=0,
        description=(
            "The longest receiver `Retry-After` honoured, in seconds; a larger, infinite or "
            "malformed one is clamped and logged."
        ),
    )
    api_host: str = Field("127.0.0.1", description="Where the API listens.")
    api_port: int = Field(8000, ge=0, le=65535, description="Port of the API.")
    secret_key: SecretStr | None = Field(
        None,
        description=(
            "Fernet key(s) that encrypt the clients' own upstream tokens, comma-separated: "
            "the first encrypts, every one decrypts (key rotation). Required once a client "
            "has a token of its own."
        ),
    )
    public_url: str | None = Field(
        None,
        description=(
            "The tracker's own public base URL; submissions give AceData "
            "`{public_url}/v1/doorbell/{token}` as `callback_url`. Unset: no doorbell."
        ),
    )
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
    doorbell_rps: float = Field(
        1000.0,
        gt=0,
        description=(
            "Doorbell requests per second one API process accepts (bursts of as many); "
            "more answer 429."
        ),
    )
    metrics_port: int = Field(
        9101, ge=0, le=65535, description="Port of the worker's Prometheus endpoint; 0 disables."
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: str = Field(
        "auto", description="`json`, `console`, or `auto` (console on a terminal, else json)."
    )

    @field_validator("service_poll_intervals", mode="before")
    @classmethod
    def _parse_service_paces(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        paces: dict[str, float] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            service, equals, seconds = part.partition("=")
            try:
                paces[service.strip()] = float(seconds)
            except ValueError:
                paces[service.strip()] = float("nan")
            if not equals or paces[service.strip()] != paces[service.strip()]:
                raise ValueError(f"expects service=seconds pairs, e.g. suno=10 (got {part!r})")
        return paces

    @field_validator("service_poll_intervals")
    @classmethod
    def _check_service_paces(cls, value: dict[str, float]) -> dict[str, float]:
        for service, seconds in value.items():
            if not SERVICE_NAME.fullmatch(service):
                raise ValueError(f"a service is 1-32 of a-z, 0-9 and - (got {service!r})")
            if not seconds > 0 or seconds == float("inf"):
                raise ValueError(f"{service}: seconds must be a positive number (got {seconds!r})")
        return value

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

    @field_validator("secret_key", "public_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
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
    def secret_keys(self) -> list[str]:
        """TRACKER_SECRET_KEY's keys, newest first; empty when unset."""
        if self.secret_key is None:
            return []
        return [key.strip() for key in self.secret_key.get_secret_value().split(",") if key.strip()]

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
