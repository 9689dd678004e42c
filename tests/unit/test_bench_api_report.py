"""What ``rtim bench --api`` prints: the requests, their errors, their latency against the
objective."""

from __future__ import annotations

import orjson

from rtim.bench import Latency
from rtim.bench_api import (
    ApiReport,
    _channel,
    api_report_json,
    format_api_report,
    worker_account,
)


def report(p99: float, errors: dict[str, int] | None = None) -> ApiReport:
    return ApiReport(
        event_rate=5000,
        request_rate=500,
        seconds=10,
        sent=5000,
        ok=4990,
        offered=1200,
        errors=errors or {},
        events_sent=50_000,
        latency=Latency(samples=5000, p50_ms=1.2, p95_ms=2.5, p99_ms=p99, max_ms=12.0),
    )


def test_the_report_says_the_percentiles_and_whether_the_objective_is_met() -> None:
    good = format_api_report(report(4.1))
    assert "p50 1.20 ms  p95 2.50 ms  p99 4.10 ms  max 12.00 ms" in good
    assert "within the p99 objective of 5 ms" in good
    assert "errors           0" in good
    bad = format_api_report(report(7.5, {"503": 8, "timeout": 2}))
    assert "over the p99 objective" in bad and "503: 8, timeout: 2" in bad
    assert orjson.loads(api_report_json(report(4.1)))["latency"]["p99_ms"] == 4.1


def test_requests_come_on_the_channel_of_the_customers_latest_event() -> None:
    assert _channel({"context": {"app": {"name": "shop"}}}) == "app"
    assert _channel({"properties": {"channel": "email"}}) == "email"
    assert _channel({"properties": {"channel": "service"}}) == "web"
    assert _channel({}) == "web"


def test_the_workers_own_account_comes_from_its_histogram() -> None:
    got = report(4.1)
    name = 'rtim_api_seconds_bucket{endpoint="decide",le="%s"}'
    worker_account(
        got,
        {
            name % "0.001": 10.0,
            name % "0.002": 60.0,
            name % "0.005": 98.0,
            name % "0.01": 100.0,
            name % "+Inf": 100.0,
            'rtim_api_seconds_count{endpoint="decide"}': 100.0,
            'rtim_api_seconds_sum{endpoint="decide"}': 0.25,
            'rtim_api_seconds_bucket{endpoint="customer",le="0.001"}': 7.0,
        },
    )
    assert (got.worker_mean_ms, got.worker_p50_ms, got.worker_p99_ms) == (2.5, 2.0, 10.0)
    assert "worker    mean 2.50 ms, p50 <= 2 ms, p99 <= 10 ms" in format_api_report(got)


def test_the_report_says_whether_the_learner_worked_meanwhile() -> None:
    got = report(4.1)
    worker_account(
        got,
        {
            'rtim_examples_learned_total{result="learned"}': 5_468.0,
            'rtim_examples_learned_total{result="duplicate"}': 3.0,
            "rtim_model_snapshots_published_total": 52.0,
        },
    )
    assert (got.learned, got.snapshots) == (5_468, 52)
    assert "learner   5,468 training records learned, 52 model snapshots" in format_api_report(got)
