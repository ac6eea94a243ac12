"""The README's configuration table lists exactly the settings the service reads."""

from __future__ import annotations

import re
from pathlib import Path

from tracker.config import Settings, env_name

README = Path(__file__).resolve().parents[2] / "README.md"


def test_configuration_table_matches_settings() -> None:
    text = README.read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(TRACKER_[A-Z_]+)`", section))
    expected = {env_name(field) for field in Settings.model_fields}
    assert documented == expected, (
        f"missing from README: {sorted(expected - documented)}; "
        f"not settings: {sorted(documented - expected)}"
    )
