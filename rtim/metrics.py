"""RTIM's Prometheus metrics: one place, ``rtim_`` prefix, base units.

No label ever carries a customer id or any other personal data: labels are
topics, partitions, channels, offers and error reasons only.
"""

from __future__ import annotations

import gc
import time

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

#: The decision latency objective (event in Kafka -> trigger acknowledged by Kafka);
#: the histogram has a bucket boundary exactly there.
LATENCY_OBJECTIVE_S = 0.1

EVENTS_CONSUMED = Counter(
    "rtim_events_consumed_total", "Clickstream records consumed.", ["topic"]
)
EVENTS_APPLIED = Counter(
    "rtim_events_applied_total", "Valid events applied to a customer context."
)
EVENTS_DUPLICATE = Counter(
    "rtim_events_duplicate_total",
    "Events not applied because already applied (same messageId, or redelivery).",
)
EVENTS_DEAD_LETTERED = Counter(
    "rtim_events_dead_lettered_total",
    "Events sent to the dead-letter topic, by reason.",
    ["reason"],
)
TRIGGERS_SENT = Counter(
    "rtim_triggers_total", "Triggers published, by channel and offer.", ["channel", "offer"]
)
DECISIONS_NO_OFFER = Counter(
    "rtim_decisions_no_offer_total",
    "Decision moments where no offer was eligible (the decision was to do nothing).",
)
DECISION_LATENCY = Histogram(
    "rtim_decision_latency_seconds",
    "End to end: clickstream record timestamp to trigger acknowledged by Kafka.",
    buckets=(0.005, 0.01, 0.025, 0.05, LATENCY_OBJECTIVE_S, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_SECONDS = Histogram(
    "rtim_batch_duration_seconds",
    "Time to process one fetched batch: core, persist, publish, acknowledge.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_STAGE_SECONDS = Histogram(
    "rtim_batch_stage_seconds",
    "Time per batch in each stage: core (decisioning), publish (until Kafka acks), store.",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_RECORDS = Histogram(
    "rtim_batch_records",
    "Records per processed batch.",
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
PUBLISH_RETRIES = Counter(
    "rtim_publish_retries_total", "Batches whose publish to Kafka failed and was retried."
)
CONSUMER_LAG = Gauge(
    "rtim_consumer_lag_records",
    "Records in the clickstream not yet processed, per partition (from fetch high watermarks).",
    ["topic", "partition"],
)
CONTEXT_CUSTOMERS = Gauge(
    "rtim_context_customers",
    "Customer contexts held by this worker's table (an estimate for RocksDB).",
)
CONTEXT_WRITES = Counter(
    "rtim_context_writes_total", "Customer context versions written (store + changelog)."
)
GC_PAUSE_SECONDS = Histogram(
    "rtim_gc_pause_seconds",
    "Pauses of Python's cyclic garbage collector (every thread stops), by generation.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)
WORKER_READY = Gauge(
    "rtim_worker_ready", "1 when the worker has its partitions, has recovered and processes."
)


_gc_started: list[float] = []


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started.append(time.perf_counter())
    elif _gc_started:
        GC_PAUSE_SECONDS.labels(str(info["generation"])).observe(
            time.perf_counter() - _gc_started.pop()
        )


def observe_gc_pauses() -> None:
    """Time every collection of the cyclic garbage collector into ``GC_PAUSE_SECONDS``."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
