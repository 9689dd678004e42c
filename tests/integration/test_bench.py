"""``rtim bench`` end to end on a small load: both pipelines measured, in one run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rtim.bench import format_report, run_bench


def test_bench_measures_both_pipelines_and_explains_the_worker(tmp_path: Path) -> None:
    report = asyncio.run(
        run_bench(
            events=60_000, customers=2_000, rate=300.0, latency_seconds=3.0,
            workdir=tmp_path, echo=lambda line: None,
        )
    )

    assert report.raw is not None and report.rtim is not None, report.notes
    assert report.raw.events_per_s > 0 and report.rtim.events_per_s > 0
    # Each throughput counts committed offsets; the start-up's first commit is left out.
    assert 0 < report.rtim.events < 60_000 and 0 < report.raw.events < 60_000
    assert report.ratio == round(report.rtim.events_per_s / report.raw.events_per_s, 3)
    # Live events went through both pipelines and their outputs were timed.
    assert report.raw_latency is not None and report.raw_latency.samples > 100
    assert report.raw_latency.p50_ms <= report.raw_latency.p99_ms <= report.raw_latency.max_ms
    assert report.rtim_latency is not None and report.rtim_triggers == report.rtim_latency.samples

    # The worker's account of where its time went, from its own metrics.
    prof = report.rtim_profile
    assert prof is not None, report.notes
    assert prof.batches >= 1 and prof.records_per_batch > 0
    assert prof.core_us > 0 and prof.publish_us > 0 and prof.store_us >= 0
    assert 0 < prof.cpu_cores < 3

    text = format_report(report)
    assert "ratio RTIM / raw" in text
    assert f"{prof.batches:,} batches" in text and "garbage collection" in text


def test_bench_says_when_the_load_is_too_small_to_measure(tmp_path: Path) -> None:
    report = asyncio.run(
        run_bench(events=200, customers=20, latency_seconds=0, workdir=tmp_path, echo=lambda line: None)
    )
    # 200 events fit in one fetch and one commit: no rate is made up for either pipeline.
    assert report.raw is None and report.rtim is None and report.ratio is None
    assert any("all 200 events were in the first commit" in n for n in report.notes)
    assert "load more events" in format_report(report)
