"""Settings from the environment and `.env`: an empty value counts as unset, for every one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracker.config import Settings, env_name, load_settings

FIELDS = sorted(Settings.model_fields)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TRACKER_* variable from the machine running the tests."""
    import os

    for name in list(os.environ):
        if name.startswith("TRACKER_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("field", FIELDS)
def test_an_empty_variable_in_the_environment_counts_as_unset(
    clean_env: pytest.MonkeyPatch, field: str
) -> None:
    clean_env.setenv(env_name(field), "")
    settings = load_settings(_env_file=None)
    assert getattr(settings, field) == Settings.model_fields[field].get_default(
        call_default_factory=True
    )


@pytest.mark.parametrize("field", FIELDS)
def test_an_empty_variable_in_the_env_file_counts_as_unset(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, field: str
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"{env_name(field)}=\n{env_name(field).lower()}=''\n")
    settings = load_settings(_env_file=env_file)
    assert getattr(settings, field) == Settings.model_fields[field].get_default(
        call_default_factory=True
    )


def test_an_empty_upstream_token_is_no_token(clean_env: pytest.MonkeyPatch) -> None:
    """So the start-up warning about a missing token shows (`tracker up`)."""
    clean_env.setenv("TRACKER_UPSTREAM_TOKEN", "")
    settings = load_settings(_env_file=None)
    assert settings.upstream_token is None
    assert settings.upstream_bearer is None


def test_an_empty_variable_leaves_the_value_of_the_env_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("TRACKER_UPSTREAM_TOKEN=from-the-file\nTRACKER_POLL_INTERVAL=7\n")
    clean_env.setenv("TRACKER_UPSTREAM_TOKEN", "")
    clean_env.setenv("TRACKER_POLL_INTERVAL", "")
    settings = load_settings(_env_file=env_file)
    assert settings.upstream_bearer == "from-the-file"
    assert settings.poll_interval == 7.0
