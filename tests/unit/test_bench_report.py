"""What ``rtim bench`` computes and prints: the worker profile (from two scrapes of the
worker's metrics), the responses it sends, the cost of one decision."""

from __future__ import annotations

import orjson
from aiokafka.partitioner import DefaultPartitioner

from rtim.bench import (
    DECISIONS_CATALOG,
    BenchReport,
    ResponsesSent,
    decision_cost,
    format_report,
    plan_responses,
    run_core,
    worker_profile,
)
from rtim.engine import Record
from rtim.events import customer_key, parse_event
from rtim.learn.attribution import parse_response
from rtim.offers.catalog import load_catalog
from rtim.simulate import JourneySimulator, past_start_ms


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


def test_the_profile_counts_decisions_responses_and_examples_learned() -> None:
    before = scrape(1_000, 1, 0.5, 0.1, 0.01, 3.0, 0.02)
    after = scrape(11_000, 11, 0.8, 0.14, 0.02, 3.45, 0.03)
    after['rtim_decisions_total{offer="yes"}'] = 2_000
    after['rtim_decisions_total{offer="no"}'] = 500
    after['rtim_events_consumed_total{topic="rtim.responses"}'] = 700
    before['rtim_decisions_total{offer="yes"}'] = 100
    before['rtim_examples_learned_total{result="learned"}'] = 40
    after['rtim_examples_learned_total{result="learned"}'] = 1_040
    after['rtim_examples_learned_total{result="duplicate"}'] = 9  # not learned
    prof = worker_profile(before, after, wall_s=0.5)
    assert prof is not None
    assert prof.decisions_per_event == 0.24  # (1,900 + 500) / 10,000 events
    assert prof.responses == 700
    assert prof.learned == 1_000 and prof.events == 10_000
    report = format_report(
        BenchReport(events=11_000, partitions=4, customers=10, store="memory", rtim_profile=prof)
    )
    assert "training records learned 1,000 (10.0% of the events)" in report


def test_a_run_too_short_for_the_learner_says_so() -> None:
    before = scrape(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
    after = scrape(10_000, 10, 0.3, 0.04, 0.01, 0.45, 0.01)
    after['rtim_examples_learned_total{result="learned"}'] = 100
    prof = worker_profile(before, after, wall_s=0.5)
    sent = ResponsesSent(decisions=1_200, offered=1_000)

    def report(learned: int) -> str:
        assert prof is not None
        prof.learned = learned
        return format_report(
            BenchReport(
                events=10_000,
                partitions=4,
                customers=10,
                store="memory",
                rtim_profile=prof,
                responses=sent,
            )
        )

    # 100 training records: 50 of the 1,000 decisions with an offer.
    assert "note: the learner learned 5% of the decisions with an offer" in report(100)
    assert "-n 400000" in report(100)
    # Most of them learned (two records each): nothing to say.
    assert "the learner learned" not in report(1_800)


def simulated(n: int, customers: int = 300) -> list[Record]:
    """Simulated events as the worker reads them: keyed, on their customer's partition."""
    partitioner = DefaultPartitioner()
    offsets = [0] * 4
    out = []
    sim = JourneySimulator(customers=customers, seed=3, start_ms=past_start_ms())
    for event in sim.events(n):
        key = customer_key(event).encode()
        part = partitioner(key, [0, 1, 2, 3], [0, 1, 2, 3])
        out.append(Record(part, offsets[part], key, orjson.dumps(event)))
        offsets[part] += 1
    return sorted(out, key=lambda r: (r.offset, r.partition))


def test_responses_answer_the_decisions_after_they_are_made() -> None:
    records = simulated(6_000)
    _, made = run_core(records, load_catalog(DECISIONS_CATALOG))
    offered = {orjson.loads(d.value)["decision_id"]: d for d in made if d.offered}
    plan, kinds = plan_responses(records, made)

    sent = [item for items in plan.values() for item in items]
    assert len(sent) == sum(kinds.values())
    # A realistic mix: most decisions get no response, some every outcome, a few
    # late, unknown and repeated ones.
    assert 0.3 * len(offered) < kinds["impression"] < 0.5 * len(offered)
    assert 0 < kinds["conversion"] < kinds["click"] < kinds["impression"]
    assert all(kinds[k] > 0 for k in ("dismissal", "late", "unknown", "duplicate"))
    stream_ms = {
        (r.partition, r.offset): parse_event(r.value).timestamp_ms
        for r in records
        if r.value is not None
    }
    for part, items in plan.items():
        # In the order of their dues, and of their times among those due together.
        assert [item[:2] for item in items] == sorted(item[:2] for item in items)
        for due, at_ms, key, value in items:
            # Every one is a valid response of the customer it is keyed by...
            response = parse_response(value)
            assert response.customer_id.encode() == key and response.timestamp_ms == at_ms
            made_it = offered.get(response.decision_id)
            if made_it is None:
                continue  # one of the unknown ones
            cause = made_it.cause
            assert isinstance(cause, Record) and cause.partition == part
            # ... stamped after its decision, and sent once the worker has committed
            # the decision's event and its partition's stream time has reached it.
            assert response.timestamp_ms > stream_ms[(part, cause.offset)]
            assert due > cause.offset
            reached = [
                o for (p, o), t in stream_ms.items() if p == part and t >= response.timestamp_ms
            ]
            assert (
                due
                == max(
                    cause.offset, min(reached, default=max(o for (p, o) in stream_ms if p == part))
                )
                + 1
            )


def test_one_decision_costs_the_difference_with_and_without_decisions() -> None:
    records = simulated(3_000)
    cost = decision_cost(records, load_catalog(DECISIONS_CATALOG), runs=2)
    # The decision-heavy mix: at least a fifth of the events decide, nearly all on
    # the twelve offers.
    assert cost.events == 3_000 and cost.runs == 2
    assert cost.share >= 0.2 and cost.share == round(cost.decisions / 3_000, 3)
    assert cost.candidates > 11
    assert cost.event_us > cost.event_us_without > 0
    assert 0 < cost.us_min <= cost.us <= cost.us_max

    report = BenchReport(events=3_000, partitions=4, customers=300, store="memory")
    report.mix = "decisions"
    report.decision_cost = cost
    text = format_report(report)
    assert "decision-heavy mix (12 offers)" in text
    assert f"{cost.us:.1f} us per decision (median of 2 runs" in text
    assert f"{cost.candidates:.1f} candidates each" in text


def test_the_report_says_what_became_of_the_responses() -> None:
    report = BenchReport(events=100, partitions=4, customers=20, store="memory")
    report.responses = ResponsesSent(
        decisions=40,
        offered=30,
        planned={"impression": 12, "click": 3},
        sent=15,
        consumed=15,
        joined={"joined": 14, "duplicate": 1},
    )
    text = format_report(report)
    assert "the raw baseline reads the clickstream alone" in text
    assert "15 sent for 30 decisions with an offer (of 40), 15 consumed" in text
    assert "joined 14" in text
