"""The configuration page lists exactly the settings the service reads."""

from __future__ import annotations

import re
from pathlib import Path

from tracker.config import Settings, env_name

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
CONFIGURATION = ROOT / "docs" / "configuration.md"


def test_configuration_table_matches_settings() -> None:
    text = CONFIGURATION.read_text()
    documented = set(re.findall(r"`(TRACKER_[A-Z_]+)`", text))
    expected = {env_name(field) for field in Settings.model_fields}
    assert documented == expected, (
        f"missing from docs/configuration.md: {sorted(expected - documented)}; "
        f"not settings: {sorted(documented - expected)}"
    )
