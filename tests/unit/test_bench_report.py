"""The worker profile ``rtim bench`` prints, from two scrapes of the worker's metrics."""

from __future__ import annotations

from rtim.bench import worker_profile


def scrape(
    events: float, batches: float, core: float, publish: float, store: float, cpu: float, gc: float
) -> dict[str, float]:
    return {
        'rtim_events_consumed_total{topic="rtim.clickstream"}': events,
        "rtim_batch_records_count": batches,
        'rtim_batch_stage_seconds_sum{stage="core"}': core,
        'rtim_batch_stage_seconds_sum{stage="publish"}': publish,
        'rtim_batch_stage_seconds_sum{stage="store"}': store,
        "process_cpu_seconds_total": cpu,
        'rtim_gc_pause_seconds_sum{generation="0"}': gc,
        'rtim_gc_pause_seconds_sum{generation="2"}': gc / 2,
    }


def test_per_event_times_come_from_the_window_between_the_scrapes() -> None:
    before = scrape(1_000, 1, 0.5, 0.1, 0.01, 3.0, 0.02)
    # 10,000 more events in 10 batches over 0.5 s of wall time.
    after = scrape(11_000, 11, 0.5 + 0.3, 0.1 + 0.04, 0.01 + 0.01, 3.0 + 0.45, 0.02 + 0.01)
    prof = worker_profile(before, after, wall_s=0.5)
    assert prof is not None
    assert prof.batches == 10 and prof.records_per_batch == 1_000
    assert (prof.core_us, prof.publish_us, prof.store_us) == (30.0, 4.0, 1.0)
    assert prof.other_us == 50.0 - 35.0  # 0.5 s / 10,000 events = 50 us per event
    assert prof.cpu_cores == 0.9
    assert prof.gc_us == 1.5  # both generations counted


def test_no_profile_without_work_in_the_window() -> None:
    same = scrape(1_000, 1, 0.5, 0.1, 0.01, 3.0, 0.0)
    assert worker_profile(same, same, wall_s=1.0) is None
    assert worker_profile({}, {}, wall_s=1.0) is None
