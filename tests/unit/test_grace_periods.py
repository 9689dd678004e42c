"""Orchestrators wait longer for a stopping worker than the worker waits for Kafka.

A worker cut off from Kafka exits by itself after RTIM_SHUTDOWN_TIMEOUT_S, logging
what it was still waiting for; a grace period shorter than that would SIGKILL it
first, with nothing in the log.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from rtim.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: Seconds a worker needs after the bound: logs flushed, the process gone.
MARGIN_S = 5


def test_kubernetes_grace_period_exceeds_the_shutdown_timeout() -> None:
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "statefulset.yaml").read_text(encoding="utf-8"))
    (statefulset,) = [d for d in docs if d and d.get("kind") == "StatefulSet"]
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= Settings().shutdown_timeout_s + MARGIN_S


def test_compose_grace_period_exceeds_the_shutdown_timeout() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    workers = {n: s for n, s in compose["services"].items() if n.startswith("rtim-")}
    assert workers
    for name, service in workers.items():
        match = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert match, name
        assert int(match.group(1)) >= Settings().shutdown_timeout_s + MARGIN_S, name
