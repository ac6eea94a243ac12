"""docker-compose.yml cannot run here (no Docker engine): its structure is checked instead."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool
from typer.testing import CliRunner

from tracker.cli.app import app
from tracker.config import load_settings
from tracker.db.engine import autocommit_engine, make_engine
from tracker.worker.roles import DEFAULT_CONCURRENCY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_services_are_the_documented_ones(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "postgres",
        "redis",
        "migrate",
        "api",
        "worker",
        "beat",
        "simulator",
    }
    assert compose["services"]["simulator"]["profiles"] == ["dev"]


def test_every_tracker_command_exists_in_the_cli(compose: dict[str, Any]) -> None:
    runner = CliRunner()
    for name, service in compose["services"].items():
        if "command" not in service or name in {"postgres", "redis"}:
            continue
        args = list(service["command"])
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"service {name}: `tracker {' '.join(args)}` is not a command"


def test_data_services_have_health_checks_and_named_volumes(compose: dict[str, Any]) -> None:
    for name in ("postgres", "redis"):
        service = compose["services"][name]
        assert service["healthcheck"]["test"], f"{name} has no health check"
        volume = service["volumes"][0].split(":")[0]
        assert volume in compose["volumes"], f"{name} does not use a named volume"


def test_roles_wait_for_migration_and_healthy_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for role in ("api", "worker", "beat"):
        depends = services[role]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"


def test_worker_can_be_scaled(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    # A fixed name or host port would make `--scale worker=N` fail.
    assert "container_name" not in worker
    assert "ports" not in worker


def test_settings_come_from_the_environment(compose: dict[str, Any]) -> None:
    env = compose["services"]["api"]["environment"]
    for variable in ("TRACKER_DATABASE_URL", "TRACKER_BROKER_URL", "TRACKER_UPSTREAM_TOKEN"):
        assert variable in env
    assert compose["services"]["api"]["env_file"][0]["path"] == ".env"


def test_dockerfile_installs_the_package_and_runs_the_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install ." in dockerfile
    assert 'ENTRYPOINT ["tracker"]' in dockerfile


def _peak_connections(engine: Engine) -> int:
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    return pool.size() + pool._max_overflow


def test_postgresql_has_room_for_four_workers_the_api_and_beat_at_their_peaks(
    compose: dict[str, Any],
) -> None:
    command = compose["services"]["postgres"]["command"]
    (setting,) = [arg for arg in command if arg.startswith("max_connections=")]
    max_connections = int(setting.split("=", 1)[1])
    url = "postgresql://tracker@postgres/tracker"  # engines connect lazily: none is opened
    jobs = make_engine(url, pool_size=DEFAULT_CONCURRENCY)  # `tracker.worker.jobs.worker_context`
    single_statements = autocommit_engine(jobs)
    assert single_statements is not None
    worker = _peak_connections(jobs) + _peak_connections(single_statements)
    api = beat = _peak_connections(make_engine(url))
    assert max_connections >= 4 * worker + api + beat, (max_connections, worker, api)


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR:-default}` interpolation (nested defaults too), for a test."""
    pattern = re.compile(r"\$\{([A-Z_][A-Z0-9_]*):-((?:[^${}]|\$\{[^{}]*\})*)\}")
    while (match := pattern.search(value)) is not None:
        name, default = match.groups()
        value = value[: match.start()] + (env.get(name) or default) + value[match.end() :]
    return value


def test_the_database_url_follows_postgres_password(compose: dict[str, Any]) -> None:
    """Setting only POSTGRES_PASSWORD must not leave every role with the old password."""
    postgres = compose["services"]["postgres"]["environment"]
    env = {"POSTGRES_PASSWORD": "s3cret"}
    url = _interpolate(compose["services"]["worker"]["environment"]["TRACKER_DATABASE_URL"], env)
    assert _interpolate(postgres["POSTGRES_PASSWORD"], env) == "s3cret"
    assert url == "postgresql://tracker:s3cret@postgres:5432/tracker"
    default = _interpolate(compose["services"]["api"]["environment"]["TRACKER_DATABASE_URL"], {})
    assert default == "postgresql://tracker:tracker@postgres:5432/tracker"
    override = {"TRACKER_DATABASE_URL": "postgresql://u:p@db/x", **env}
    assert _interpolate(postgres["POSTGRES_PASSWORD"], override) == "s3cret"
    assert (
        _interpolate(compose["services"]["beat"]["environment"]["TRACKER_DATABASE_URL"], override)
        == "postgresql://u:p@db/x"
    )


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(
        float(amount) * units[unit] for amount, unit in re.findall(r"([0-9.]+)([smh])", duration)
    )


def test_the_worker_may_finish_an_attempt_and_a_poll_before_it_is_killed(
    compose: dict[str, Any],
) -> None:
    settings = load_settings(_env_file=None)
    grace = _seconds(compose["services"]["worker"]["stop_grace_period"])
    assert grace >= settings.webhook_timeout + 15  # one attempt, with a margin
    assert grace >= settings.upstream_timeout + 15  # one poll, with a margin


@pytest.mark.parametrize("role", ["api", "worker", "beat"])
def test_every_role_has_a_health_check(compose: dict[str, Any], role: str) -> None:
    check = compose["services"][role]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert _seconds(check["timeout"]) < _seconds(check["interval"])


def test_the_worker_health_check_pings_this_worker_through_the_broker(
    compose: dict[str, Any],
) -> None:
    command = compose["services"]["worker"]["healthcheck"]["test"][1]
    assert "tracker.worker.app:celery_app" in command
    assert "inspect ping --destination celery@$$HOSTNAME" in command
    from tracker.worker.app import celery_app  # the module path the check names

    assert celery_app.main == "tracker"


def test_pulled_images_are_pinned_to_a_release(compose: dict[str, Any]) -> None:
    for name in ("postgres", "redis"):
        image = compose["services"][name]["image"]
        assert re.fullmatch(r"[a-z0-9./-]+:[0-9]+\.[0-9]+(\.[0-9]+)?(-[a-z0-9]+)?", image), image


def test_the_build_context_leaves_out_secrets_databases_and_environments() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".env", ".venv", "*.db", ".git"):
        assert pattern in ignored, pattern
    assert "!.env.example" in ignored


def test_the_image_does_not_run_as_root() -> None:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert users, "the Dockerfile sets no USER: the image would run as root"
    assert users[-1] not in ("root", "0", "0:0")
