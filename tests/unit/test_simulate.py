"""Unit tests of the journey simulator (and of the producer against a fake)."""

from __future__ import annotations

import asyncio
import collections
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import islice, pairwise
from typing import Any, ClassVar

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords

import rtim.simulate_kafka
from rtim.events import InvalidEvent, customer_key, parse_event
from rtim.simulate import (
    CATALOG,
    CATEGORIES,
    CHANNELS,
    EVENT_NAMES,
    JourneySimulator,
    format_timestamp,
)

START_MS = 1_714_557_600_000  # 2024-05-01T10:00:00Z
SESSION_GAP_MS = 30 * 60_000  # inactivity that separates two sessions

ISO_MS_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
PRODUCT_FIELDS = {"product_id", "sku", "category", "name", "price", "quantity"}
REQUIRED_PROPERTIES: dict[str, set[str]] = {
    "Products Searched": {"query"},
    "Product List Viewed": {"category"},
    "Product Viewed": PRODUCT_FIELDS,
    "Product Added": PRODUCT_FIELDS,
    "Product Removed": PRODUCT_FIELDS,
    "Cart Viewed": {"cart_id", "products"},
    "Checkout Started": {"order_id", "value", "revenue", "currency", "products"},
    "Order Completed": {"order_id", "total", "revenue", "currency", "products"},
    "Signed In": {"username"},
    "Email Opened": {"campaign"},
    "Email Link Clicked": {"campaign"},
    "Support Ticket Opened": {"ticket_id", "issue_type"},
    "Support Ticket Resolved": {"ticket_id", "issue_type"},
    "Store Visited": {"store_id"},
}
CHANNELS_OF_EVENT: dict[str, set[str]] = {
    "Email Opened": {"email"},
    "Email Link Clicked": {"email"},
    "Store Visited": {"store"},
    "Support Ticket Resolved": {"call_centre"},
    "Support Ticket Opened": {"call_centre", "web", "app"},
    "Signed In": {"web", "app"},
}


def parse_ts(ts: str) -> int:
    """Epoch milliseconds of an ISO-8601 'Z' timestamp."""
    return round(datetime.fromisoformat(ts).timestamp() * 1000)


def assert_segment_event(e: dict[str, Any]) -> None:
    """Check one event against the Segment spec (as far as we rely on it)."""
    assert e["type"] in {"page", "screen", "track", "identify"}
    assert uuid.UUID(e["messageId"]).version == 4
    assert ISO_MS_UTC.match(e["timestamp"]), e["timestamp"]
    parse_ts(e["timestamp"])
    # Segment requires userId or anonymousId; both are strings when present.
    assert e.get("userId") or e.get("anonymousId")
    for id_field in ("userId", "anonymousId"):
        assert e.get(id_field) is None or (isinstance(e[id_field], str) and e[id_field])
    ctx = e["context"]
    assert ctx["channel"] in CHANNELS
    if ctx["channel"] == "web":
        assert {"path", "url", "title", "referrer"} <= ctx["page"].keys()
        assert ctx["page"]["url"].startswith("https://")
        assert isinstance(ctx["userAgent"], str) and ctx["userAgent"]
        assert e["anonymousId"]
    elif ctx["channel"] == "app":
        assert {"name", "version"} <= ctx["app"].keys()
        assert {"manufacturer", "model"} <= ctx["device"].keys()
        assert {"name", "version"} <= ctx["os"].keys()
        assert e["anonymousId"]
    else:  # server-side sources know the customer
        assert e["userId"]
    if e["type"] == "track":
        assert e["event"] in EVENT_NAMES
        assert REQUIRED_PROPERTIES[e["event"]] <= e["properties"].keys(), e
        if e["event"] in CHANNELS_OF_EVENT:
            assert ctx["channel"] in CHANNELS_OF_EVENT[e["event"]]
    elif e["type"] in ("page", "screen"):
        assert isinstance(e["name"], str) and e["name"]
        assert isinstance(e["properties"], dict)
        assert ctx["channel"] == ("web" if e["type"] == "page" else "app")
        if e["type"] == "page":
            assert e["properties"]["url"] == ctx["page"]["url"]
    else:
        assert e["userId"]
        assert {"email", "name", "plan"} <= e["traits"].keys()
        assert "@" in e["traits"]["email"]
    for product in e.get("properties", {}).get("products", []):
        assert product.keys() >= PRODUCT_FIELDS
    # What goes to Kafka is orjson; it must round-trip unchanged.
    assert orjson.loads(orjson.dumps(e)) == e


def owners(sim: JourneySimulator) -> dict[str, dict[str, Any]]:
    """Map every anonymousId / userId to the simulated person it belongs to."""
    out: dict[str, dict[str, Any]] = {}
    for profile in sim.profiles:
        for anon in profile["anonymous_ids"]:
            out[anon] = profile
        if profile["user_id"]:
            out[profile["user_id"]] = profile
    return out


def by_person(
    sim: JourneySimulator, events: list[dict[str, Any]]
) -> dict[int, list[dict[str, Any]]]:
    owner = owners(sim)
    out: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        out[owner[e["anonymousId"] or e["userId"]]["customer"]].append(e)
    return out


def sessions(events: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Split one person's events at gaps of SESSION_GAP_MS."""
    current: list[dict[str, Any]] = []
    last = None
    for e in events:
        t = parse_ts(e["timestamp"])
        if last is not None and t - last > SESSION_GAP_MS:
            yield current
            current = []
        current.append(e)
        last = t
    if current:
        yield current


@pytest.fixture(scope="module")
def world() -> tuple[JourneySimulator, list[dict[str, Any]]]:
    sim = JourneySimulator(customers=100, seed=42, start_ms=START_MS)
    return sim, list(sim.events(2000))


# ---------------------------------------------------------------- the stream


def test_every_event_is_valid_segment(world):
    _, events = world
    assert len(events) == 2000
    for e in events:
        assert_segment_event(e)


def test_all_channels_and_event_names_occur(world):
    _, events = world
    channels = collections.Counter(e["context"]["channel"] for e in events)
    names = collections.Counter(e["event"] for e in events if e["type"] == "track")
    types = collections.Counter(e["type"] for e in events)
    assert set(channels) == set(CHANNELS)
    assert set(names) == set(EVENT_NAMES)
    assert set(types) == {"page", "screen", "track", "identify"}
    # Clickstream dominates, as on a real site.
    assert channels["web"] + channels["app"] > 0.8 * len(events)


def test_same_seed_and_start_give_the_same_stream():
    a = list(JourneySimulator(customers=30, seed=7, start_ms=START_MS).events(500))
    b = list(JourneySimulator(customers=30, seed=7, start_ms=START_MS).events(500))
    c = list(JourneySimulator(customers=30, seed=8, start_ms=START_MS).events(500))
    assert a == b
    assert orjson.dumps(a) == orjson.dumps(b)  # key order too
    assert a != c
    assert not {e["messageId"] for e in a} & {e["messageId"] for e in c}


def test_message_ids_are_unique_uuids(world):
    _, events = world
    ids = [e["messageId"] for e in events]
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i for i in ids)


def test_events_continue_the_same_world_and_can_be_endless():
    sim = JourneySimulator(customers=20, seed=1, start_ms=START_MS)
    first = list(sim.events(100))
    more = list(islice(sim.events(), 300))  # n=None is endless
    whole = list(JourneySimulator(customers=20, seed=1, start_ms=START_MS).events(400))
    assert first + more == whole


def test_stream_is_time_ordered_and_interleaved(world):
    _, events = world
    stamps = [parse_ts(e["timestamp"]) for e in events]
    assert stamps == sorted(stamps)
    assert stamps[0] >= START_MS
    # Like real traffic, consecutive events mostly come from different people
    # and many customers are active within the first minutes.
    sim, _ = world
    owner = owners(sim)
    people = [owner[e["anonymousId"] or e["userId"]]["customer"] for e in events[:200]]
    assert len(set(people)) >= 15
    # (A page view and the track call it fires are usually adjacent.)
    switches = sum(a != b for a, b in pairwise(people))
    assert switches > len(people) / 4


def test_per_customer_time_is_realistic(world):
    sim, events = world
    for person, evs in by_person(sim, events).items():
        stamps = [parse_ts(e["timestamp"]) for e in evs]
        assert stamps == sorted(stamps), person
        for session in sessions(evs):
            clicks = [e for e in session if e["context"]["channel"] in ("web", "app")]
            t = [parse_ts(e["timestamp"]) for e in clicks]
            # Clicks are seconds (at most minutes) apart within a session.
            assert all(b - a <= 5 * 60_000 for a, b in pairwise(t))
    gaps = [
        parse_ts(s2[0]["timestamp"]) - parse_ts(s1[-1]["timestamp"])
        for evs in by_person(sim, events).values()
        for s1, s2 in zip(list(sessions(evs)), list(sessions(evs))[1:], strict=False)
    ]
    assert gaps and min(gaps) >= 45 * 60_000  # sessions are hours apart


def test_visitors_sign_in_then_carry_user_id_and_get_identified(world):
    sim, events = world
    owner = owners(sim)
    per_device: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        if e["anonymousId"]:
            per_device[e["anonymousId"]].append(e)
    transitions = 0
    for anon, evs in per_device.items():
        first_known = next((i for i, e in enumerate(evs) if e["userId"]), None)
        if first_known is None:
            continue
        transitions += first_known > 0
        sign_in = evs[first_known]
        # The first event that reveals the person is "Signed In"...
        assert sign_in["type"] == "track" and sign_in["event"] == "Signed In"
        user_id = sign_in["userId"]
        assert user_id == owner[anon]["user_id"]
        # ... and it is followed by an identify with the traits.
        if first_known + 1 < len(evs):
            identify = evs[first_known + 1]
            assert identify["type"] == "identify"
            assert identify["userId"] == user_id
            assert identify["traits"] == owner[anon]["traits"]
            assert {"email", "name", "plan"} <= identify["traits"].keys()
        # From then on that device's events carry the userId.
        assert all(e["userId"] == user_id for e in evs[first_known:])
    assert transitions >= 10
    # Some visitors never sign in at all.
    anonymous = [p for p in sim.profiles if p["user_id"] is None]
    assert 15 <= len(anonymous) <= 45  # anonymous_share=0.3 of 100
    assert any(per_device.get(a) for p in anonymous for a in p["anonymous_ids"])
    never_known = {e["anonymousId"] for e in events if e["anonymousId"]} - {
        e["anonymousId"] for e in events if e["userId"]
    }
    assert never_known


def test_carts_are_abandoned_and_orders_completed(world):
    sim, events = world
    abandoned = completed = 0
    for evs in by_person(sim, events).values():
        for session in sessions(evs):
            names = [e.get("event") for e in session]
            if "Product Added" in names and "Order Completed" not in names:
                abandoned += 1
            completed += names.count("Order Completed")
    assert abandoned >= 10
    assert completed >= 10
    # Abandoned baskets of known customers trigger reminder e-mails.
    campaigns = {e["properties"]["campaign"] for e in events if e.get("event") == "Email Opened"}
    assert "cart_reminder" in campaigns


def test_orders_add_up(world):
    _, events = world
    prices = {p.product_id: p.price for p in CATALOG}
    orders = [e for e in events if e.get("event") == "Order Completed"]
    assert orders
    for e in orders:
        props = e["properties"]
        subtotal = sum(prices[p["product_id"]] * p["quantity"] for p in props["products"])
        assert props["revenue"] == pytest.approx(subtotal - props.get("discount", 0.0), abs=0.011)
        assert props["total"] >= props["revenue"] > 0
        assert props["currency"] == "GBP"
    checkouts = {
        e["properties"]["order_id"]: e["properties"]
        for e in events
        if e.get("event") == "Checkout Started"
    }
    web_orders = [e for e in orders if e["context"]["channel"] in ("web", "app")]
    assert web_orders
    for e in web_orders:  # online orders go through the checkout first
        started = checkouts.get(e["properties"]["order_id"])
        if started is not None:
            assert started["value"] == pytest.approx(
                e["properties"]["revenue"] + e["properties"].get("discount", 0.0), abs=0.011
            )


def test_support_tickets_get_resolved(world):
    _, events = world
    opened = {
        e["properties"]["ticket_id"]: parse_ts(e["timestamp"])
        for e in events
        if e.get("event") == "Support Ticket Opened"
    }
    resolved = [e for e in events if e.get("event") == "Support Ticket Resolved"]
    assert opened and resolved
    for e in resolved:
        ticket = e["properties"]["ticket_id"]
        assert ticket in opened
        assert parse_ts(e["timestamp"]) > opened[ticket]


def test_personas_show_in_behaviour():
    sim = JourneySimulator(customers=200, seed=3, start_ms=START_MS)
    events = list(sim.events(6000))
    owner = owners(sim)
    stats: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    fav_views = collections.Counter()
    for e in events:
        profile = owner[e["anonymousId"] or e["userId"]]
        persona = profile["persona"]
        name = e.get("event")
        stats[persona][name] += 1
        if name == "Product Viewed" and persona == "loyal_buyer":
            fav = e["properties"]["category"] in profile["favourite_categories"]
            fav_views[fav] += 1

    def conversion(persona: str) -> float:
        s = stats[persona]
        return s["Order Completed"] / max(1, s["Checkout Started"])

    # Loyal buyers finish checkouts; cart abandoners mostly do not.
    assert conversion("loyal_buyer") > conversion("cart_abandoner")
    # Frustrated customers are the ones calling the call centre.
    tickets = {p: s["Support Ticket Opened"] for p, s in stats.items()}
    assert max(tickets, key=tickets.get) == "frustrated"
    # Loyal buyers stick to their favourite categories (category affinity).
    assert fav_views[True] > 2 * fav_views[False]


def test_catalog():
    assert 35 <= len(CATALOG) <= 45
    assert set(CATEGORIES) == {
        "electronics", "shoes", "apparel", "home", "beauty", "sports", "books", "toys",
    }  # fmt: skip
    assert {p.category for p in CATALOG} == set(CATEGORIES)
    assert len({p.product_id for p in CATALOG}) == len(CATALOG)
    assert len({p.sku for p in CATALOG}) == len(CATALOG)
    assert all(p.price > 0 for p in CATALOG)


def test_anonymous_share_extremes():
    everyone_known = JourneySimulator(customers=50, seed=1, anonymous_share=0.0)
    assert all(p["user_id"] for p in everyone_known.profiles)
    nobody_known = JourneySimulator(customers=50, seed=1, anonymous_share=1.0)
    events = list(nobody_known.events(1000))
    assert not any(e["userId"] for e in events)
    assert {e["context"]["channel"] for e in events} <= {"web", "app"}
    with pytest.raises(ValueError):
        JourneySimulator(customers=0)
    with pytest.raises(ValueError):
        JourneySimulator(anonymous_share=1.5)
    with pytest.raises(ValueError):
        nobody_known.events(-1)


def test_default_start_is_now_and_live_mode_uses_wall_clock():
    before = int(time.time() * 1000)
    simulated = JourneySimulator(customers=10, seed=1)
    first = parse_ts(next(simulated.events(1))["timestamp"])
    assert before <= first <= before + 2 * 3_600_000  # within the arrival window

    live = JourneySimulator(customers=10, seed=1, start_ms=0, live=True)
    events = list(live.events(200))
    after = int(time.time() * 1000)
    stamps = [parse_ts(e["timestamp"]) for e in events]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after + 1


def test_events_are_keyed_by_the_customer_id_the_parser_files_them_under():
    """A key that differs from the parser's customer id would put a customer's events
    on two partitions (two workers, two contexts)."""
    ids = [
        {"userId": "u1", "anonymousId": "a1"},
        {"userId": None, "anonymousId": "a1"},
        {"userId": " ", "anonymousId": "a1"},
        {"anonymousId": "a1"},
        {"userId": 42, "anonymousId": "a1"},
        {"anonymousId": 7},
    ]
    for event in ids:
        call = {"type": "page", "messageId": "m", "timestamp": "2024-05-01T10:00:00Z", **event}
        assert customer_key(call) == parse_event(orjson.dumps(call)).customer_id
    assert [customer_key(e) for e in ids] == ["u1", "a1", "a1", "a1", "42", "7"]
    with pytest.raises(InvalidEvent):
        customer_key({"type": "track"})


def test_format_timestamp():
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp(START_MS + 3_723_045) == "2024-05-01T11:02:03.045Z"
    for ms in (START_MS, START_MS + 86_399_999, 1_709_251_199_999):  # incl. a leap day
        expected = (
            datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
            + f".{ms % 1000:03d}Z"
        )
        assert format_timestamp(ms) == expected


def test_generation_is_fast_enough_for_the_benchmark():
    # The benchmark pushes 20k events/s; generation must not be the limit.
    # Best of three to be robust against a busy machine (typically >100k/s).
    best = 0.0
    for _ in range(3):
        sim = JourneySimulator(customers=1000, seed=1, start_ms=START_MS)
        t0 = time.perf_counter()
        for _ in sim.events(20_000):
            pass
        best = max(best, 20_000 / (time.perf_counter() - t0))
    assert best > 20_000, f"{best:,.0f} events/s"


# ------------------------------------------------------ producer (fake Kafka)


class FakeProducer:
    """Stands in for AIOKafkaProducer: real BatchBuilders, instant delivery."""

    instances: ClassVar[list[FakeProducer]] = []
    fail_delivery = False

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.started = self.stopped = False
        self.batches: list[tuple[str, int, bytes]] = []
        FakeProducer.instances.append(self)

    async def start(self) -> None:
        self.started = True

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3, 4}

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.config["max_batch_size"], 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int):
        # A real send_batch awaits the topic's metadata (other tasks run, and a
        # cancellation lands there), then hands the batch over without awaiting.
        await asyncio.sleep(0)
        assert not self.stopped
        self.batches.append((topic, partition, bytes(batch._build())))
        fut = asyncio.get_running_loop().create_future()
        if self.fail_delivery:
            fut.set_exception(RuntimeError("broker said no"))
        else:
            fut.set_result(None)
        return fut

    async def stop(self) -> None:
        self.stopped = True

    def records(self) -> list[tuple[int, bytes, bytes]]:
        out = []
        for _, partition, raw in self.batches:
            records = MemoryRecords(raw)
            while (batch := records.next_batch()) is not None:
                out.extend((partition, r.key, r.value) for r in batch)
        return out


@pytest.fixture
def fake_kafka(monkeypatch):
    FakeProducer.instances = []
    FakeProducer.fail_delivery = False
    monkeypatch.setattr(rtim.simulate_kafka, "AIOKafkaProducer", FakeProducer)
    return FakeProducer


async def test_produce_events_keys_partitions_and_counts(fake_kafka):
    from rtim.simulate_kafka import produce_events

    events = list(JourneySimulator(customers=50, seed=2, start_ms=START_MS).events(3000))
    progressed: list[int] = []
    sent = await produce_events(
        "kafka:9092", "clicks", events, progress=progressed.append, max_batch_bytes=16_384
    )
    assert sent == 3000 and sum(progressed) == 3000
    (producer,) = fake_kafka.instances
    assert producer.config["bootstrap_servers"] == ["kafka:9092"]
    assert producer.started and producer.stopped
    assert len(producer.batches) > 5  # full batches were shipped along the way
    records = producer.records()
    assert [orjson.loads(v) for _, _, v in sorted(records, key=lambda r: r[2])] == sorted(
        events, key=lambda e: orjson.dumps(e)
    )
    partitions = list(range(5))
    for partition, key, value in records:
        assert key == customer_key(orjson.loads(value)).encode()
        # Same partition as producer.send(key=...) and the Java client.
        assert partition == DefaultPartitioner()(key, partitions, partitions)
    # Each key's events keep their order.
    position = {e["messageId"]: i for i, e in enumerate(events)}
    per_key = collections.defaultdict(list)
    for _, key, value in records:
        per_key[key].append(position[orjson.loads(value)["messageId"]])
    assert all(v == sorted(v) for v in per_key.values())


async def test_produce_events_is_paced(fake_kafka):
    events = JourneySimulator(customers=20, seed=2, live=True).events(300)
    t0 = time.monotonic()
    sent = await rtim.simulate_kafka.produce_events("k:9092", "t", events, rate=1000)
    elapsed = time.monotonic() - t0
    assert sent == 300
    assert 0.25 <= elapsed < 2.0
    # Small batches as it goes, not one burst at the end.
    assert len(fake_kafka.instances[0].batches) >= 30


async def test_produce_events_stops_cleanly_when_cancelled(fake_kafka):
    sim = JourneySimulator(customers=20, seed=2, live=True)
    progressed: list[int] = []
    task = asyncio.create_task(
        rtim.simulate_kafka.produce_events(
            "k:9092", "t", sim.events(), rate=2000, progress=progressed.append
        )
    )
    deadline = time.monotonic() + 30
    while sum(progressed) <= 100:  # cancelled while producing
        assert time.monotonic() < deadline and not task.done(), progressed
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (producer,) = fake_kafka.instances
    assert producer.stopped
    delivered = len(producer.records())
    assert delivered > 100
    assert sum(progressed) == delivered


async def test_produce_events_raises_delivery_errors(fake_kafka):
    fake_kafka.fail_delivery = True
    events = JourneySimulator(customers=5, seed=2).events(50)
    with pytest.raises(RuntimeError, match="broker said no"):
        await rtim.simulate_kafka.produce_events("k:9092", "t", events)
    assert fake_kafka.instances[0].stopped
    with pytest.raises(ValueError):
        await rtim.simulate_kafka.produce_events("k:9092", "t", [], rate=0)
