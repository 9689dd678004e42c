"""Garbage-collector pauses on /metrics: right buckets, and never a deadlock."""

from __future__ import annotations

import gc
import threading

from prometheus_client.metrics import MetricWrapperBase

from rtim import metrics


def samples(collector: metrics.GcPauses) -> dict[tuple[str, str, str], float]:
    (family,) = collector.collect()
    return {
        (s.name, s.labels["generation"], s.labels.get("le", "")): s.value for s in family.samples
    }


def test_a_pause_lands_in_its_bucket_and_generation(monkeypatch) -> None:
    pauses = metrics.GcPauses()
    clock = iter([10.0, 10.003, 20.0, 20.0005])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    pauses.on_gc("start", {"generation": 1})
    pauses.on_gc("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    pauses.on_gc("start", {"generation": 1})
    pauses.on_gc("stop", {"generation": 1, "collected": 0, "uncollectable": 0})

    got = samples(pauses)
    assert got[("rtim_gc_pause_seconds_bucket", "1", "0.0005")] == 1  # le: 0.5 ms is in it
    assert got[("rtim_gc_pause_seconds_bucket", "1", "0.0025")] == 1
    assert got[("rtim_gc_pause_seconds_bucket", "1", "0.005")] == 2  # 3 ms
    assert got[("rtim_gc_pause_seconds_bucket", "1", "+Inf")] == 2
    assert got[("rtim_gc_pause_seconds_count", "1", "")] == 2
    assert abs(got[("rtim_gc_pause_seconds_sum", "1", "")] - 0.0035) < 1e-9
    assert got[("rtim_gc_pause_seconds_count", "0", "")] == 0  # every generation is shown


def test_a_collection_never_waits_for_a_metric_lock() -> None:
    # A collection can start inside any allocation, also while a metric holds
    # its (non-reentrant) lock; the callback must not need any such lock.
    metrics.observe_gc_pauses()
    wrappers = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    # Labelled metrics lock in the parent (labels()), the others in their values.
    locks = [
        getattr(m, "_lock", None) or (getattr(m, "_value", None) or m._sum)._lock for m in wrappers
    ]
    before = samples(metrics.GC_PAUSES)[("rtim_gc_pause_seconds_count", "2", "")]
    for lock in locks:
        lock.acquire()
    try:
        done = threading.Event()
        collector = threading.Thread(target=lambda: (gc.collect(), done.set()), daemon=True)
        collector.start()
        assert done.wait(10), "a garbage collection blocked on a metric lock"
    finally:
        for lock in locks:
            lock.release()
    assert samples(metrics.GC_PAUSES)[("rtim_gc_pause_seconds_count", "2", "")] == before + 1
