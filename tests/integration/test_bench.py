"""``rtim bench`` end to end on a small load: both pipelines measured, in one run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from rtim.bench import BenchReport, TooFewEvents, format_report, measure_until_committed, run_bench
from rtim.broker import EmbeddedBroker
from rtim.names import CLICKSTREAM_TOPIC
from rtim.stream.endoffsets import true_end_offsets

from .support import PARTITIONS, produce


def test_bench_measures_both_pipelines_and_explains_the_worker(tmp_path: Path) -> None:
    report = asyncio.run(
        run_bench(
            events=60_000,
            customers=2_000,
            rate=300.0,
            latency_seconds=3.0,
            workdir=tmp_path,
            echo=lambda line: None,
            decisions_mix=True,
            cost_runs=1,
            cost_events=5_000,
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

    # The decision-heavy mix: the worker decided on at least a fifth of the events.
    assert prof.decisions_per_event >= 0.2

    # Responses to the worker's decisions flowed while it ran, and were joined to them.
    sent = report.responses
    assert sent is not None and sent.offered > 0
    assert sent.sent == sum(sent.planned.values()) > 0
    assert sent.consumed == sent.sent and prof.responses > 0
    assert sent.joined.get("joined", 0) > 0.8 * (sent.planned["impression"] + sent.planned["click"])
    # Every response is valid, so every one has a join result; the unknown ones too.
    assert sum(sent.joined.values()) == sent.sent
    assert sent.joined["unknown"] >= sent.planned["unknown"]

    # The cost of one decision, measured in-process on the same mix.
    cost = report.decision_cost
    assert cost is not None and cost.events == 5_000 and cost.share >= 0.2
    assert cost.candidates > 11 and cost.us > 0

    text = format_report(report)
    assert "ratio RTIM / raw" in text
    assert f"{prof.batches:,} batches" in text and "garbage collection" in text
    assert f"{sent.consumed:,} consumed" in text and "us per decision" in text


def test_a_load_committed_all_at_once_gives_no_made_up_rate(kafka: EmbeddedBroker) -> None:
    # 200 events committed by one commit of the group: the first commit seen is
    # already the last, so there is no interval to divide by.
    sent = asyncio.run(produce(kafka.bootstrap, ((b"k%d" % i, b"{}") for i in range(200))))
    tps = [TopicPartition(CLICKSTREAM_TOPIC, p) for p in range(PARTITIONS)]

    async def commit_everything_then_measure() -> None:
        ends = await true_end_offsets(kafka.bootstrap, tps)
        committer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap, group_id="tiny", enable_auto_commit=False
        )
        await committer.start()
        try:
            committer.assign(tps)
            await committer.commit(ends)
        finally:
            await committer.stop()
        await measure_until_committed(
            kafka.bootstrap, "tiny", sent, partitions=PARTITIONS, timeout=30
        )

    with pytest.raises(TooFewEvents, match="all 200 events were in the first commit seen"):
        asyncio.run(commit_everything_then_measure())

    # The report then says why there is no number instead of printing one.
    report = BenchReport(events=200, partitions=PARTITIONS, customers=20, store="rocksdb")
    report.notes.append(
        "rtim-bench: all 200 events were in the first commit seen; load more events (--events)"
    )
    text = format_report(report)
    assert (
        "RTIM worker" not in text and "raw aiokafka (ceiling)" not in text and "ratio" not in text
    )
    assert "note: rtim-bench: all 200 events were in the first commit seen" in text
