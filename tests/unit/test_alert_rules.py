"""The alert rules load in Prometheus and behave as their unit tests say.

``promtool`` (Prometheus' own checker) is needed: .ci/run installs it. On a developer
machine without it these tests are skipped with the command that installs it; in CI
(``CI`` set) they fail instead, so a missing promtool can never pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
INSTALL = (
    "promtool is not installed: `apt-get install prometheus` (Debian, Ubuntu; .ci/run takes "
    "only promtool from that package), or promtool from a Prometheus release, on PATH"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL)
        pytest.skip(INSTALL)
    return subprocess.run(
        [path, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text(encoding="utf-8"))
    tests = yaml.safe_load((RULES_DIR / "alerts.test.yml").read_text(encoding="utf-8"))
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    cases: list[dict[str, Any]] = [c for t in tests["tests"] for c in t["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fires == set(), "alerts without a case where they fire"
    assert alerts - quiet == set(), "alerts without a case where they must not fire"
