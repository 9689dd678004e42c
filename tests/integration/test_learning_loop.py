"""Decisions recorded, responses joined, examples written: a real worker on the embedded broker.

The worker's side of the learning loop: every decision goes to rtim.decisions; responses on
rtim.responses join the decisions kept open in the customers' contexts; a conversion within
the attribution window is a positive example on rtim.training, a window that ends without one
a negative example, also after the worker was SIGKILLed and replaced.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import jsonschema
import orjson

from rtim.learn.models import POOLED
from rtim.names import DECISIONS_TOPIC, DLQ_TOPIC, RESPONSES_TOPIC, TRAINING_TOPIC

from .support import produce, read_topic, segment, wait_committed
from .test_pipeline import iso, track

SCHEMAS = Path(__file__).resolve().parents[2] / "topics" / "schemas"
HOUR = 3_600_000
T0 = int(time.time() * 1000) - 5 * HOUR
CUSTOMERS = [f"loop-{i}" for i in range(8)]


def schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


def response(decision: dict, outcome: str, at_ms: int) -> tuple[bytes, bytes]:
    body = {
        "decision_id": decision["decision_id"],
        "customer_id": decision["customer_id"],
        "outcome": outcome,
        "timestamp": iso(at_ms),
    }
    return decision["customer_id"].encode(), orjson.dumps(body)


def values(bootstrap: str, topic: str) -> list[dict]:
    return [orjson.loads(r.value) for r in asyncio.run(read_topic(bootstrap, topic))]


def offer_examples(bootstrap: str) -> list[dict]:
    """The training records keyed by an offer (each example is also on rtim.training
    under the pooled model's key)."""
    return [e for e in values(bootstrap, TRAINING_TOPIC) if e["offer_id"] != POOLED]


def pooled_examples(bootstrap: str) -> list[dict]:
    return [e for e in values(bootstrap, TRAINING_TOPIC) if e["offer_id"] == POOLED]


def test_decisions_responses_and_examples_survive_a_sigkill(kafka, workers) -> None:
    env = {"RTIM_ATTRIBUTION_WINDOW_S": "3600"}
    worker = workers("w1", env=env).wait_ready()
    # A ticket opened: the service-recovery trigger fires for each customer.
    tickets = [track(c, "Support Ticket Opened", "web", T0, ticket_id="T") for c in CUSTOMERS]
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in tickets]))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker))

    decisions = {d["customer_id"]: d for d in values(kafka.bootstrap, DECISIONS_TOPIC)}
    assert set(decisions) == set(CUSTOMERS)
    valid = schema("decision.schema.json")
    for d in decisions.values():
        assert not list(valid.iter_errors(d)), d
        assert d["offer_id"] == "service-recovery" and d["source"] == "trigger"
        assert d["decided_ms"] == T0 and d["window_end_ms"] == T0 + HOUR  # event time
        assert d["candidates"][0]["offer_id"] == "service-recovery"
        assert d["features"], "the features the decision was scored on"
    assert worker.metric("rtim_decisions_total", offered="yes") == len(CUSTOMERS)

    # Responses, all stamped within the windows (a later one would move the stream
    # time of its partition past them, and close them).
    first, second, third, fourth = (decisions[c] for c in CUSTOMERS[:4])
    stranger = dict(fourth, decision_id="no-such-decision")
    answers = [
        response(first, "impression", T0 + 60_000),
        response(first, "conversion", T0 + 10 * 60_000),  # in the window: positive
        response(first, "conversion", T0 + 11 * 60_000),  # the same again: duplicate
        response(second, "click", T0 + 5 * 60_000),  # joined, nothing to learn yet
        response(stranger, "conversion", T0 + 60_000),  # no such decision: unknown
        (b"loop-5", b"{not json"),  # invalid: dead-lettered
    ]
    asyncio.run(produce(kafka.bootstrap, answers, topic=RESPONSES_TOPIC))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker, topic=RESPONSES_TOPIC))

    examples = offer_examples(kafka.bootstrap)
    assert [(e["decision_id"], e["converted"], e["why"]) for e in examples] == [
        (first["decision_id"], True, "conversion")
    ]
    assert not list(schema("training-example.schema.json").iter_errors(examples[0]))
    # The same example, for the pooled model every offer is scored on as a prior.
    assert pooled_examples(kafka.bootstrap) == [{**examples[0], "offer_id": POOLED}]
    results = {
        r: worker.metric("rtim_responses_total", outcome=o, result=r)
        for o, r in [
            ("impression", "joined"),
            ("conversion", "joined"),
            ("conversion", "duplicate"),
            ("click", "joined"),
        ]
    }
    assert results == {"joined": 1, "duplicate": 1}
    assert worker.metric("rtim_responses_total", outcome="conversion", result="unknown") == 1
    letters = asyncio.run(read_topic(kafka.bootstrap, DLQ_TOPIC))
    assert [dict(r.headers)["rtim.errors.reason"] for r in letters] == [b"malformed_json"]
    assert dict(letters[0].headers)["__connect.errors.topic"] == RESPONSES_TOPIC.encode()

    # The worker dies; a fresh one (empty data directory) recovers the open decisions
    # from the changelog. Events two hours later move every partition's stream time
    # past the windows: each open decision closes once, as a negative example.
    worker.kill()
    fresh = workers("w2", env=env).wait_ready(timeout=90)
    later = [track(c, "Page Viewed", "web", T0 + 2 * HOUR) for c in CUSTOMERS]
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in later]))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=fresh))
    deadline = time.monotonic() + 20
    while len(examples := offer_examples(kafka.bootstrap)) < len(CUSTOMERS):
        assert time.monotonic() < deadline, examples
        time.sleep(0.2)
    by_decision = {e["decision_id"]: e for e in examples}
    assert len(examples) == len(by_decision) == len(CUSTOMERS)  # none twice
    assert {d["decision_id"] for d in decisions.values()} == set(by_decision)
    negatives = [e for e in examples if not e["converted"]]
    assert len(negatives) == len(CUSTOMERS) - 1
    assert {(e["why"], e["closed_ms"]) for e in negatives} == {("window", T0 + HOUR)}
    assert fresh.metric("rtim_training_examples_total", label="negative", why="window") == 7
    # A conversion for a decision whose window has closed is late, and not learned.
    late = [response(third, "conversion", T0 + 30 * 60_000)]
    asyncio.run(produce(kafka.bootstrap, late, topic=RESPONSES_TOPIC))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=fresh, topic=RESPONSES_TOPIC))
    assert fresh.metric("rtim_responses_total", outcome="conversion", result="late") == 1
    assert len(offer_examples(kafka.bootstrap)) == len(CUSTOMERS)


def test_an_idle_partition_closes_its_windows_on_wall_clock_time(kafka, workers) -> None:
    # Stream time stops when traffic stops; after RTIM_IDLE_CLOSE_S without records, a
    # partition's stream time moves with the wall clock, so open windows still close.
    env = {"RTIM_ATTRIBUTION_WINDOW_S": "3", "RTIM_IDLE_CLOSE_S": "1"}
    worker = workers("w1", env=env).wait_ready()
    now = int(time.time() * 1000)
    tickets = [track(c, "Support Ticket Opened", "web", now, ticket_id="T") for c in CUSTOMERS]
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in tickets]))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker))
    assert offer_examples(kafka.bootstrap) == []  # nothing closed yet
    deadline = time.monotonic() + 20
    while len(examples := offer_examples(kafka.bootstrap)) < len(CUSTOMERS):
        assert time.monotonic() < deadline, examples
        time.sleep(0.5)
    assert {(e["converted"], e["why"]) for e in examples} == {(False, "window")}
    assert len({e["decision_id"] for e in examples}) == len(CUSTOMERS)


def test_two_workers_learn_from_each_others_decisions_and_survive_a_sigkill(kafka, workers) -> None:
    # The whole loop with two workers: each decides for its own partitions' customers,
    # responses are joined where the decisions are, the offer's learner (one of them)
    # learns every example, and both decide with the model within seconds. A worker
    # SIGKILLed and replaced resumes from rtim.models: nothing learned twice or lost.
    from .test_shared_models import wait_models

    env = {"RTIM_ATTRIBUTION_WINDOW_S": "3600", "RTIM_MODEL_SNAPSHOT_INTERVAL_S": "0.5"}
    first = workers("w1", env=env).wait_ready()
    second = workers("w2", env=env).wait_ready()
    wait_until(lambda: all(w.status("/health/ready") == 200 for w in (first, second)))

    def round_of(customers: list[str], start: int) -> dict[str, dict]:
        """Tickets, then a conversion for every other decision, then time passing."""
        tickets = [
            track(c, "Support Ticket Opened", "web", start, ticket_id="T") for c in customers
        ]
        asyncio.run(produce(kafka.bootstrap, [segment(e) for e in tickets]))
        made: dict[str, dict] = {}
        wait_until(lambda: len(made.update(decisions_of(customers)) or made) == len(customers))
        converted = [made[c] for c in customers[::2]]
        answers = [response(d, "conversion", start + 5 * 60_000) for d in converted]
        asyncio.run(produce(kafka.bootstrap, answers, topic=RESPONSES_TOPIC))
        # Joined before the later events move the stream time past the windows (the two
        # topics are read side by side, in no set order).
        asyncio.run(wait_committed(kafka.bootstrap, "rtim", topic=RESPONSES_TOPIC))
        later = [track(c, "Page Viewed", "web", start + 2 * HOUR) for c in customers]
        asyncio.run(produce(kafka.bootstrap, [segment(e) for e in later]))
        return made

    def decisions_of(customers: list[str]) -> dict[str, dict]:
        return {
            d["customer_id"]: d
            for d in values(kafka.bootstrap, DECISIONS_TOPIC)
            if d["customer_id"] in customers
        }

    batch_one = [f"duo-{i}" for i in range(24)]
    round_of(batch_one, T0)
    # Both workers decided (each owns two of the four partitions) ...
    assert first.metric("rtim_decisions_total", offered="yes") > 0
    assert second.metric("rtim_decisions_total", offered="yes") > 0
    # ... and both see the model learned from all of it: 12 conversions, 12 windows ended.
    for worker in (first, second):
        wait_models(worker, {"service-recovery": (24, 12), POOLED: (24, 12)}, timeout=60)

    first.kill()
    third = workers("w3", env=env).wait_ready()
    batch_two = [f"trio-{i}" for i in range(16)]
    round_of(batch_two, T0 + 3 * HOUR)
    for worker in (second, third):
        wait_models(worker, {"service-recovery": (40, 20), POOLED: (40, 20)}, timeout=90)
    examples = offer_examples(kafka.bootstrap)
    assert len({e["decision_id"] for e in examples}) == 40


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
