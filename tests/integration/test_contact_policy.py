"""The contact policy on a real worker: caps and consent hold in the durable context.

A cap counts the contacts kept in the customer's context, so a worker killed after its
commit and replaced by one that rebuilds the table from the changelog must refuse what
a worker that never stopped refuses. Consent is read from the clickstream (identify
traits, Segment's consent events) and decides which channel topic a trigger goes to.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from rtim.engine import Engine, Record
from rtim.names import CLICKSTREAM_TOPIC, DECISIONS_TOPIC, TRIGGER_TOPIC_PREFIX
from rtim.offers.catalog import load_catalog

from .support import CHANGELOG, latest_values, produce, read_topic, segment, wait_committed
from .test_pipeline import iso

HERE = Path(__file__).parent
CAPPED_CATALOG = HERE / "capped_catalog.yaml"
CONSENT_CATALOG = HERE / "consent_catalog.yaml"
NOW_MS = int(time.time() * 1000)


def event(user: str, ms: int, kind: str = "track", **fields: Any) -> dict[str, Any]:
    """A Segment event on the web (a page context) at event time ``ms``."""
    base: dict[str, Any] = {
        "type": kind,
        "messageId": str(uuid.uuid4()),
        "userId": user,
        "context": {"page": {"path": "/coupons"}},
        "timestamp": iso(ms),
    }
    for name, value in fields.items():
        if name == "context":
            base["context"] = {**base["context"], **value}
        else:
            base[name] = value
    return base


def coupon_viewed(user: str, ms: int) -> dict[str, Any]:
    return event(user, ms, event="Coupon Viewed", properties={"coupon": "SPRING15"})


def decisions_by_message(bootstrap: str) -> dict[str, dict[str, Any]]:
    """Every decision record on rtim.decisions, by the message id of its event."""
    records = asyncio.run(read_topic(bootstrap, DECISIONS_TOPIC))
    return {d["message_id"]: d for d in (orjson.loads(r.value) for r in records)}


def triggers_by_message(bootstrap: str, channel: str) -> dict[str, dict[str, Any]]:
    """Every trigger on ``rtim.triggers.<channel>``, by the message id of its event."""
    records = asyncio.run(read_topic(bootstrap, TRIGGER_TOPIC_PREFIX + channel))
    data = [orjson.loads(r.value)["data"] for r in records]
    return {d["event"]["message_id"]: d for d in data}


def uninterrupted(catalog: Path, records: list[Any]) -> dict[str, dict[str, Any]]:
    """The decision records the pure core makes of these clickstream records in one
    uninterrupted run, by message id."""
    store: dict[bytes, bytes] = {}
    engine = Engine(catalog=load_catalog(catalog), load=lambda p, k: store.get(k))
    made: dict[str, dict[str, Any]] = {}
    for record in records:
        result = engine.process(
            CLICKSTREAM_TOPIC, [Record(record.partition, record.offset, record.key, record.value)]
        )
        for items in result.updates.values():
            store.update(items)
        for decision in result.decisions:
            value = orjson.loads(decision.value)
            made[value["message_id"]] = value
    return made


def outcome(decision: dict[str, Any]) -> tuple[Any, ...]:
    """What a decision did, without what depends on the models' state (draws, scores)."""
    return decision["offer_id"], decision["channel"], decision["reasons"]


def test_a_cap_holds_across_a_worker_killed_after_its_commit(kafka, workers, tmp_path) -> None:
    env = {"RTIM_CATALOG": str(CAPPED_CATALOG)}
    t = NOW_MS - 600_000
    before = [coupon_viewed("capped", t), coupon_viewed("capped", t + 1000)]
    before.append(coupon_viewed("other", t + 2000))
    after = [coupon_viewed("capped", t + 60_000), coupon_viewed("capped", t + 61_000)]
    after.append(coupon_viewed("other", t + 62_000))

    doomed = workers("doomed", env=env).wait_ready()
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in before]))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=doomed, timeout=60))
    sent = triggers_by_message(kafka.bootstrap, "web")
    assert sorted(sent) == sorted(e["messageId"] for e in before)
    # The contacts are in the changelog: that is all a fresh worker has to go on.
    changelog = latest_values(asyncio.run(read_topic(kafka.bootstrap, CHANGELOG)))
    assert len(changelog["capped"]["contacts"]) == 2
    doomed.kill()

    # A fresh data dir: the table is rebuilt from the changelog alone.
    survivor = workers("survivor", datadir=tmp_path / "fresh-data", env=env)
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in after]))
    survivor.wait_ready(timeout=90)
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=survivor, timeout=90))

    sent = triggers_by_message(kafka.bootstrap, "web")
    decided = decisions_by_message(kafka.bootstrap)
    capped, other = [e["messageId"] for e in after[:2]], after[2]["messageId"]
    # The capped customer got no third offer that day, on any channel, and the record says why.
    assert survivor.metric("rtim_offers_rejected_total", reason="capped") == len(capped)
    for message_id in capped:
        assert message_id not in sent
        assert decided[message_id]["offer_id"] is None
        assert "rejected:spring-sale:capped:daily-total" in decided[message_id]["reasons"]
    assert asyncio.run(read_topic(kafka.bootstrap, TRIGGER_TOPIC_PREFIX + "app")) == []
    # Another customer, under the cap, still gets offers.
    assert sent[other]["offer"]["id"] == "spring-sale"
    assert decided[other]["offer_id"] == "spring-sale"
    # Exactly what a worker that never stopped decides for the same clickstream.
    clickstream = asyncio.run(read_topic(kafka.bootstrap, CLICKSTREAM_TOPIC))
    expected = uninterrupted(CAPPED_CATALOG, clickstream)
    assert len(expected) == len(before) + len(after)
    assert {m: outcome(d) for m, d in decided.items()} == {
        m: outcome(d) for m, d in expected.items()
    }


def consent_by_trait(user: str, ms: int, **channels: bool) -> dict[str, Any]:
    return event(user, ms, "identify", traits={"consent": channels})


def consent_by_category(user: str, ms: int, advertising: bool) -> dict[str, Any]:
    """Segment's consent event: the customer's choice per consent category."""
    return event(
        user,
        ms,
        event="Segment Consent Preference Updated",
        context={"consent": {"categoryPreferences": {"Advertising": advertising}}},
    )


def test_a_consent_withdrawal_stops_the_triggers_on_its_channel(kafka, workers) -> None:
    t = NOW_MS - 600_000
    # Each step: a change of consent at event time ms, then the channel the coupon views
    # that follow it go to (None: none).
    by_trait = [
        (t, consent_by_trait("by-trait", t, email=True), "email"),
        (t + 10_000, consent_by_trait("by-trait", t + 10_000, email=False), None),
        # The offer's next channel, once the customer allows it.
        (t + 20_000, consent_by_trait("by-trait", t + 20_000, push=True), "push"),
        (t + 30_000, consent_by_trait("by-trait", t + 30_000, email=True), "email"),
    ]
    by_category = [
        (t, consent_by_category("by-category", t, True), "email"),
        (t + 10_000, consent_by_category("by-category", t + 10_000, False), None),
        (t + 20_000, consent_by_category("by-category", t + 20_000, True), "email"),
    ]
    steps = []
    for ms, change, channel in (*by_trait, *by_category):
        views = [coupon_viewed(change["userId"], ms + 1000 * k) for k in (1, 2)]
        steps.append((change, views, channel))
    worker = workers(env={"RTIM_CATALOG": str(CONSENT_CATALOG)}).wait_ready()
    events = [e for change, views, _ in steps for e in (change, *views)]
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in events]))
    asyncio.run(wait_committed(kafka.bootstrap, "rtim", worker=worker, timeout=60))

    sent = {c: triggers_by_message(kafka.bootstrap, c) for c in ("email", "push")}
    decided = decisions_by_message(kafka.bootstrap)
    got, wanted = [], []
    for change, views, channel in steps:
        for view in views:
            message_id = view["messageId"]
            topics = sorted(c for c in sent if message_id in sent[c])
            decision = decided[message_id]
            offered = decision["offer_id"] and decision["channel"]
            no_consent = "rejected:coupon-reminder:no-consent:email" in decision["reasons"]
            got.append((change["userId"], view["timestamp"], topics, offered, no_consent))
            want = [] if channel is None else [channel]
            wanted.append((change["userId"], view["timestamp"], want, channel, channel is None))
    assert got == wanted
    assert sum(len(s) for s in sent.values()) == sum(len(w[2]) for w in wanted)
