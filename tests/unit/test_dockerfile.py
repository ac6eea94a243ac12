"""The Dockerfile, .dockerignore and the lock files cannot be built or installed here in a
test: their structure is checked instead (like docker-compose.yml in test_compose.py)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# What the image is built from: every other path may be left out of the build context.
IMAGE_NEEDS = [
    "requirements.lock",
    "pyproject.toml",
    "README.md",
    "alembic.ini",
    "tracker/__init__.py",
    "migrations/env.py",
]


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def _index(instructions: list[tuple[str, str]], keyword: str, pattern: str) -> int:
    for i, (kw, args) in enumerate(instructions):
        if kw == keyword and re.search(pattern, args):
            return i
    raise AssertionError(f"no {keyword} matching {pattern!r} in the Dockerfile")


def _pins(lock: str) -> dict[str, str]:
    """name -> pinned version of every requirement in a lock file."""
    text = (ROOT / lock).read_text()
    return {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, re.M)
    }


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def test_the_base_image_is_pinned_to_a_patch_release() -> None:
    bases = [args for kw, args in _instructions() if kw == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        image = base.split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image), (
            f"{image}: pin the base to an exact Python 3.11 patch release (python:3.11.N-slim-...)"
        )


def test_dependencies_come_from_the_lock_before_the_code() -> None:
    steps = _instructions()
    copy_lock = _index(steps, "COPY", r"(^|\s)requirements\.lock(\s|$)")
    install_lock = _index(steps, "RUN", r"pip install (.* )?-r requirements\.lock")
    install_package = _index(steps, "RUN", r"pip install (\. --no-deps|--no-deps \.)(\s|$)")
    copy_code = _index(steps, "COPY", r"(^|\s)tracker(\s|$)")
    assert copy_lock < install_lock < copy_code < install_package
    # Nothing else is installed from the index with its dependencies resolved afresh.
    for keyword, args in steps:
        if keyword == "RUN" and "pip install" in args:
            assert "-r requirements.lock" in args or "--no-deps" in args, args


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    patterns = _dockerignore()
    for keyword, args in _instructions():
        if keyword != "COPY":
            continue
        *sources, _destination = shlex.split(args)
        for source in sources:
            assert not source.startswith("--"), f"COPY {args}: no --from/--chown expected"
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source, patterns), f"COPY {source}: .dockerignore leaves it out"


def test_the_image_runs_as_an_unprivileged_user() -> None:
    steps = _instructions()
    users = [args.strip() for kw, args in steps if kw == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1] not in {"root", "0", "0:0"}
    name = users[-1].split(":")[0]
    created = _index(steps, "RUN", rf"useradd .*\b{re.escape(name)}\b")
    assert created < _index(steps, "USER", rf"^{re.escape(users[-1])}$")


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out (its last matching pattern wins; a pattern
    that matches a parent folder leaves out everything under it)."""
    ignored = False
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        globs = [glob, glob.removeprefix("**/")] if glob.startswith("**/") else [glob]
        for candidate in candidates:
            names = [candidate, candidate.rsplit("/", 1)[-1]] if "**/" in glob else [candidate]
            if any(fnmatch.fnmatchcase(n, g) for n in names for g in globs):
                ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path", [".env", ".env.production", ".venv/bin/python", "tracker.db", "tracker.db-wal", ".git"]
)
def test_dockerignore_keeps_secrets_and_local_state_out(path: str) -> None:
    assert _ignored(path, _dockerignore())


@pytest.mark.parametrize("path", IMAGE_NEEDS)
def test_dockerignore_keeps_what_the_image_needs(path: str) -> None:
    assert not _ignored(path, _dockerignore())


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-dev.lock"])
def test_locks_pin_every_requirement_with_hashes_and_say_how_to_regenerate(lock: str) -> None:
    lines = (ROOT / lock).read_text().splitlines()
    body = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert "uv pip compile pyproject.toml" in "\n".join(lines[:body]), (
        f"{lock}: its header should give the command that regenerates it"
    )
    entries = re.split(r"\n(?=[A-Za-z0-9])", "\n".join(lines[body:]))
    assert len(entries) > 10
    for entry in entries:
        assert re.match(r"[A-Za-z0-9._-]+==\S+", entry), entry.splitlines()[0]
        assert "--hash=sha256:" in entry, f"{lock}: {entry.splitlines()[0]} has no hash"


def test_the_locks_satisfy_pyproject_and_agree() -> None:
    project = _project()
    runtime, dev = _pins("requirements.lock"), _pins("requirements-dev.lock")
    for lock, pins, requirements in [
        ("requirements.lock", runtime, project["dependencies"]),
        ("requirements-dev.lock", dev, project["optional-dependencies"]["dev"]),
    ]:
        for line in requirements:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock} lacks {name}: regenerate it (see its header)"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{lock} pins {name}=={pins[name]}, pyproject.toml wants {requirement}: "
                "regenerate it (see its header)"
            )
    assert {name: dev[name] for name in runtime if name in dev} == runtime, (
        "requirements.lock and requirements-dev.lock pin different versions"
    )


def test_the_distribution_has_a_name_of_its_own() -> None:
    # PyPI's `tracker` is an unrelated project; the import package and command stay `tracker`.
    project = _project()
    assert project["name"] == "acedata-tracker"
    assert project["scripts"] == {"tracker": "tracker.cli.app:app"}


def test_every_package_of_the_source_tree_is_in_the_distribution() -> None:
    """pyproject.toml lists the packages by hand (migrations/ ships as tracker._migrations):
    a package missing there works in a checkout and is absent from every install."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "tracker").rglob("__init__.py")
    }
    assert found - listed == set()
