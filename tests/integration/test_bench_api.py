"""``rtim bench --api`` end to end on a small load: requests answered while events flow."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rtim.bench_api import format_api_report, run_api_bench


def test_the_api_bench_times_requests_while_events_flow(tmp_path: Path) -> None:
    report = asyncio.run(
        run_api_bench(
            event_rate=500,
            request_rate=100,
            seconds=3,
            customers=300,
            workdir=tmp_path,
            echo=lambda line: None,
        )
    )
    assert report.sent >= 250 and report.events_sent >= 1_300
    assert report.errors == {} and report.ok == report.sent, format_api_report(report)
    assert report.offered > 0, "customers with live contexts get actions"
    lat = report.latency
    assert lat is not None and lat.samples == report.sent
    assert 0 < lat.p50_ms <= lat.p95_ms <= lat.p99_ms <= lat.max_ms
