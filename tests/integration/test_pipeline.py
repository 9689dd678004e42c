"""Clickstream in, triggers out: a real worker on the embedded broker."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
import uuid

import orjson
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka
from cloudevents.core.formats.json import JSONFormat

from rtim.names import TRIGGER_TOPIC_PREFIX
from rtim.offers.catalog import load_catalog
from rtim.simulate import JourneySimulator
from rtim.stream.worker import STATE_REPORT_END

from .support import (
    CHANGELOG,
    TEST_CATALOG,
    committed,
    expected_contexts,
    latest_values,
    produce,
    read_topic,
    segment,
    wait_committed,
)

NOW_MS = int(time.time() * 1000)


def iso(ms: int) -> str:
    return (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def track(user: str, name: str, channel: str, ms: int, **props: object) -> dict:
    ctx = (
        {"app": {"name": "shop", "version": "5.1"}}
        if channel == "app"
        else {"page": {"path": "/p"}}
    )
    return {
        "type": "track",
        "event": name,
        "messageId": str(uuid.uuid4()),
        "userId": user,
        "properties": props,
        "context": ctx,
        "timestamp": iso(ms),
    }


def scripted_moments() -> list[dict]:
    """Customers whose clickstream must produce a known trigger on a known channel."""
    t = NOW_MS - 600_000
    events = []
    # Web: a cart passing 100 -> cart-builder -> a web offer.
    for i, price in enumerate((40.0, 35.0, 50.0)):
        events.append(
            track(
                "cust-web",
                "Product Added",
                "web",
                t + i * 1000,
                product_id=f"p{i}",
                price=price,
                quantity=1,
                category="shoes",
            )
        )
    # App: same moment, on the app.
    for i, price in enumerate((90.0, 80.0)):
        events.append(
            track(
                "cust-app",
                "Product Added",
                "app",
                t + i * 1000,
                product_id=f"q{i}",
                price=price,
                quantity=1,
                category="electronics",
            )
        )
    # Service: an opened ticket -> service recovery on the call-centre channel.
    events.append(
        track("cust-svc", "Support Ticket Opened", "web", t, ticket_id="T1", issue_type="delivery")
    )
    return events


@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_triggers_arrive_on_channel_topics_as_cloudevents(kafka, workers, store) -> None:
    sim = JourneySimulator(customers=40, seed=3, start_ms=NOW_MS - 30 * 86_400_000)
    events = list(sim.events(400)) + scripted_moments()
    assert {"page", "track", "identify"} <= {e["type"] for e in events}
    worker = workers(store=store).wait_ready()
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in events]))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker))

    catalog = load_catalog(TEST_CATALOG)
    offers = {o.id: o for o in catalog.offers}
    triggers = {}
    for channel in sorted(catalog.channels):
        triggers[channel] = asyncio.run(read_topic(kafka.bootstrap, TRIGGER_TOPIC_PREFIX + channel))
    by_customer = {}
    seen_ids = set()
    for channel, records in triggers.items():
        for rec in records:
            ce = orjson.loads(rec.value)
            # CloudEvents 1.0 structured mode: required and RTIM's attributes.
            assert ce["specversion"] == "1.0"
            assert ce["type"] == "dev.rtim.trigger.v1"
            assert ce["source"] == "/rtim/rtim"
            assert ce["subject"] == rec.key.decode()
            assert ce["id"] not in seen_ids
            seen_ids.add(ce["id"])
            assert ce["id"] == ce["data"]["decision_id"]
            assert dict(rec.headers)["content-type"].startswith(b"application/cloudevents+json")
            sent = dt.datetime.fromisoformat(ce["time"].replace("Z", "+00:00"))
            # The official CloudEvents SDK reads the record as the Kafka protocol binding
            # says (it picks the content mode from the headers itself).
            message = KafkaMessage(headers=dict(rec.headers), key=rec.key, value=rec.value)
            event = from_kafka(message, JSONFormat())
            assert event.get_specversion() == "1.0"
            assert event.get_id() == ce["data"]["decision_id"]
            assert event.get_source() == "/rtim/rtim"
            assert event.get_type() == "dev.rtim.trigger.v1"
            assert event.get_subject() == rec.key.decode()
            assert event.get_time() == sent
            assert event.get_datacontenttype() == "application/json"
            assert event.get_extension("partitionkey") == rec.key.decode()
            assert event.get_extension("expiry") == ce["expiry"]
            assert event.get_data() == ce["data"]
            expiry = dt.datetime.fromisoformat(ce["expiry"].replace("Z", "+00:00"))
            assert expiry - sent == dt.timedelta(seconds=900)
            data = ce["data"]
            assert data["channel"] == channel
            offer = offers[data["offer"]["id"]]
            assert channel in offer.channels
            assert 0 < data["score"] <= offer.value * offer.priority
            assert data["reasons"][0] == f"trigger:{data['trigger']}"
            assert f"offer:{offer.id}" in data["reasons"]
            assert data["context"]["events_seen"] >= 1
            by_customer.setdefault(ce["subject"], []).append((channel, data))

    web = by_customer["cust-web"]
    assert [(c, d["trigger"]) for c, d in web] == [("web", "cart-builder")]
    assert web[0][1]["offer"]["id"] in {"free-shipping", "bundle-discount"}
    assert web[0][1]["context"]["cart_value"] == 125.0
    app = by_customer["cust-app"]
    assert [(c, d["trigger"]) for c, d in app] == [("app", "cart-builder")]
    svc = by_customer["cust-svc"]
    assert [(c, d["offer"]["id"]) for c, d in svc] == [("call_centre", "service-recovery")]
    # The simulated journeys triggered too, on more than one channel.
    assert sum(len(r) for r in triggers.values()) > 3
    assert len([c for c, r in triggers.items() if r]) >= 3

    # The contexts the worker wrote are the ones the core builds from the same records.
    clickstream = asyncio.run(read_topic(kafka.bootstrap, "rtim.clickstream"))
    changelog = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    assert changelog == expected_contexts(clickstream)
    assert worker.metric("rtim_events_applied_total") == len(events)
    assert worker.metric("rtim_context_customers") == len(changelog)
    assert worker.metric("rtim_triggers_total", channel="web", offer=web[0][1]["offer"]["id"]) >= 1
    assert worker.metric("rtim_decision_latency_seconds_count") == sum(
        len(r) for r in triggers.values()
    )
    # kill -USR1: the worker logs where each partition stands (and keeps running).
    state = worker.report_state()
    committed_now = asyncio.run(committed(kafka.bootstrap, "rtim"))
    for p, offset in committed_now.items():
        assert f"rtim.clickstream[{p}] position={offset} " in state
        assert re.search(rf"rtim\.clickstream\[{p}\] .* committed={offset} acked=0 ", state)
    assert "TASKS" in state  # Faust's stack dump of every task follows
    assert STATE_REPORT_END in state  # and the report says it is complete
    assert worker.status("/health/ready") == 200
    # Garbage-collector pauses are on /metrics (the worker collects once when it starts processing).
    assert sum(worker.metric("rtim_gc_pause_seconds_count", generation=g) for g in "012") >= 1


def test_a_worker_processing_its_partitions_logs_no_stall_errors(kafka, workers) -> None:
    """Faust's check of each partition's event path (an ERROR when records are fetched
    but never reach a stream) must see the batch path's progress: with the check's
    timeout at 3 s and a backlog of 60,000 events, nothing is logged as stalled."""
    worker = workers(env={"RTIM_STALL_ERROR_S": "3"}).wait_ready()
    sim = JourneySimulator(customers=2_000, seed=5, start_ms=NOW_MS - 86_400_000)
    events = [segment(e) for e in sim.events(60_000)]
    asyncio.run(produce(kafka.bootstrap, events))  # a backlog: fetched ahead of processing
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker))
    log = worker.log_tail(100_000)
    assert "Stream has not started processing" not in log
    assert "Stream stopped processing" not in log
    assert worker.metric("rtim_events_consumed_total", topic="rtim.clickstream") == 60_000
