"""docker-compose.yml cannot run here (no Docker engine): its structure is checked instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool
from typer.testing import CliRunner

from tracker.cli.app import app
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
