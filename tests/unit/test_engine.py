"""The batch engine: records in; contexts, triggers and dead letters out."""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable
from random import Random
from typing import Any

import orjson
import pytest

import rtim.context.model
import rtim.engine
from rtim.context.model import (
    MAX_CART_ITEMS,
    MAX_CATEGORY_CHARS,
    MAX_CONTEXT_BYTES,
    MAX_NAME_CHARS,
    MAX_NAMES,
    MAX_PAGE_CHARS,
    MAX_PAGES,
    MAX_PRODUCT_ID_CHARS,
    MAX_TRAIT_CHARS,
    context_version,
)
from rtim.decide.arbitrate import decision_id
from rtim.decide.cloudevent import CONTENT_TYPE, TRIGGER_TYPE
from rtim.engine import BatchResult, Engine, Record
from rtim.learn.models import ModelSet
from rtim.names import TRIGGER_TOPIC_PREFIX
from rtim.offers.catalog import parse_catalog

from .segment_calls import segment_call


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1000


NOW = ms(2026, 11, 25, 12)
T0 = NOW - 3_600_000  # events from an hour ago
MINUTE = 60_000
TOPIC = "rtim.clickstream"

CATALOG = parse_catalog(
    {
        "triggers": [
            {
                "id": "cart-builder",
                "when": {"type": "track", "event": "Product Added"},
                "if": ["cart.value >= 100"],
                "cooldown": 1800,
            },
            {"id": "service-issue", "when": {"event": "Support Ticket Opened"}, "cooldown": 0},
            {
                "id": "browse",
                "when": {"event": "Product Viewed"},
                "if": ["events.Product Viewed >= 2"],
            },
        ],
        "offers": [
            {
                "id": "free-shipping",
                "channels": ["web", "app"],
                "value": 6,
                "triggers": ["cart-builder"],
                "eligibility": ["issues == 0"],
            },
            {
                "id": "callback",
                "channels": ["call_centre", "email"],
                "value": 25,
                "triggers": ["service-issue"],
            },
            {
                "id": "big-spender",
                "channels": ["email"],
                "triggers": ["browse"],
                "eligibility": ["revenue >= 1000000"],
            },
        ],
    }
)


def segment(
    kind: str,
    name: str | None = None,
    *,
    user: str = "u-1",
    ts: int = T0,
    message_id: str | None = None,
    app: bool = False,
    **props: Any,
) -> dict[str, Any]:
    """A Segment call as analytics.js (or, with app=True, a mobile SDK) sends it."""
    context: dict[str, Any] = {"library": {"name": "analytics.js", "version": "5.2.0"}}
    if app:
        context = {"app": {"name": "Shop", "version": "3.1"}, "os": {"name": "iOS"}}
    else:
        context["page"] = {"path": props.pop("path", "/"), "title": "Shop"}
    return segment_call(
        kind,
        name,
        ts=ts,
        user=user,
        message_id=message_id,
        id_prefix="ajs",
        anonymous_id=f"anon-{user}",
        context=context,
        properties=props,
    )


def page(path: str, **kw: Any) -> dict[str, Any]:
    return segment("page", None, path=path, **kw)


def track(name: str, **kw: Any) -> dict[str, Any]:
    return segment("track", name, **kw)


class Store:
    """The changelog-backed context store, as a dict."""

    def __init__(self) -> None:
        self.data: dict[tuple[int, bytes], bytes] = {}
        self.loads = 0

    def load(self, partition: int, key: bytes) -> bytes | None:
        self.loads += 1
        return self.data.get((partition, key))

    def persist(self, result: BatchResult) -> None:
        for partition, contexts in result.updates.items():
            for key, value in contexts.items():
                self.data[(partition, key)] = value


class Log:
    """A clickstream partition log: appends records with increasing offsets."""

    def __init__(self) -> None:
        self.next: dict[int, int] = {}

    def records(self, *events: dict[str, Any] | bytes | None, partition: int = 0) -> list[Record]:
        out = []
        for e in events:
            offset = self.next.get(partition, 0)
            self.next[partition] = offset + 1
            if isinstance(e, dict):
                key: bytes | None = e.get("userId", "").encode()
                value = orjson.dumps(e)
            else:
                key, value = b"?", e
            out.append(Record(partition, offset, key, value, (("trace", b"t-1"),), NOW - 5))
        return out


def engine(store: Store, **kw: Any) -> Engine:
    return Engine(catalog=CATALOG, load=store.load, clock=lambda: NOW / 1000, **kw)


def run(eng: Engine, records: Iterable[Record], store: Store | None = None) -> BatchResult:
    result = eng.process(TOPIC, records)
    if store is not None:
        store.persist(result)
    return result


def ctx_of(result: BatchResult, key: bytes, partition: int = 0) -> dict[str, Any]:
    return orjson.loads(result.updates[partition][key])


# --------------------------------------------------------------------------
# Valid and invalid records
# --------------------------------------------------------------------------


def test_valid_events_are_applied() -> None:
    store, log = Store(), Log()
    records = log.records(
        page("/shoes", ts=T0),
        track("Product Viewed", ts=T0 + 1, product_id="p1", category="Shoes", price=60),
        track("Product Added", ts=T0 + 2, product_id="p1", category="Shoes", price=60, quantity=1),
        segment("identify", ts=T0 + 3, traits={"email": "jane@example.com", "plan": "gold"}),
    )
    result = run(engine(store), records)
    assert (result.consumed, result.applied, result.duplicates, result.new_customers) == (
        4,
        4,
        0,
        1,
    )
    assert result.dead_letters == [] and not result.invalid
    ctx = ctx_of(result, b"u-1")
    assert ctx["n"] == 4
    assert ctx["pages"] == ["/shoes"]
    assert ctx["cart"]["value"] == 60.0
    assert ctx["types"] == {"page": 1, "track": 2, "identify": 1}
    assert ctx["src"] == [0, 3]
    assert b"jane@example.com" not in result.updates[0][b"u-1"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b"{oops", "malformed_json"),
        (b"[1, 2]", "not_an_object"),
        (orjson.dumps({**track("Product Viewed"), "type": "click"}), "unknown_type"),
        (
            orjson.dumps({k: v for k, v in track("Product Viewed").items() if k != "messageId"}),
            "missing_id",
        ),
        (
            orjson.dumps({**track("Product Viewed"), "userId": None, "anonymousId": None}),
            "missing_id",
        ),
        (orjson.dumps({**track("Product Viewed"), "properties": []}), "wrong_type"),
        (orjson.dumps({**track("Product Viewed"), "timestamp": "yesterday"}), "bad_timestamp"),
        (orjson.dumps({**track("Product Viewed"), "timestamp": NOW + 2 * 3_600_000}), "clock_skew"),
        (orjson.dumps(track("Product Viewed", blob="x" * 40_000)), "oversize"),
    ],
)
def test_invalid_records_become_dead_letters_with_the_original_bytes(
    value: bytes | None, reason: str
) -> None:
    store, log = Store(), Log()
    bad = log.records(value)[0]
    good = log.records(track("Product Viewed"))
    result = run(engine(store), [bad, *good])
    assert (result.consumed, result.applied) == (2, 1)
    assert result.invalid == {reason: 1}
    (letter,) = result.dead_letters
    assert letter.value is value  # byte for byte, the very object
    assert letter.key == b"?"
    assert letter.reason == reason
    headers = dict(letter.headers)
    assert letter.headers[0] == ("trace", b"t-1")  # original headers first
    assert headers["rtim.errors.reason"] == reason.encode()
    assert headers["__connect.errors.topic"] == TOPIC.encode()
    assert headers["__connect.errors.offset"] == b"0"
    assert headers["__connect.errors.stage"] == b"validate"
    assert list(result.updates) == [0] and list(result.updates[0]) == [b"u-1"]


def test_updates_hold_one_latest_context_per_changed_customer_per_partition() -> None:
    store, log = Store(), Log()
    records = [
        *log.records(page("/", user="u-1"), page("/a", user="u-1"), partition=0),
        *log.records(page("/", user="u-2"), partition=1),
        *log.records(page("/b", user="u-1"), b"{oops", partition=0),
        *log.records(page("/", user="u-3"), partition=0),
        *log.records(page("/c", user="u-2"), partition=1),
    ]
    result = run(engine(store), records)
    assert {p: sorted(v) for p, v in result.updates.items()} == {0: [b"u-1", b"u-3"], 1: [b"u-2"]}
    u1, u2 = ctx_of(result, b"u-1"), ctx_of(result, b"u-2", partition=1)
    assert (u1["n"], u1["pages"], u1["src"]) == (3, ["/", "/a", "/b"], [0, 2])
    assert (u2["n"], u2["pages"], u2["src"]) == (2, ["/", "/c"], [1, 1])
    assert result.new_customers == 3


def test_a_batch_with_nothing_valid_updates_nothing() -> None:
    store, log = Store(), Log()
    result = run(engine(store), log.records(b"{", b"[]", None))
    assert result.updates == {} and result.triggers == []
    assert result.applied == 0 and len(result.dead_letters) == 3
    assert run(engine(store), []) == BatchResult()


# --------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------


def cart_events(user: str = "u-1") -> list[dict[str, Any]]:
    return [
        page("/kitchen", user=user, ts=T0),
        track("Product Added", user=user, ts=T0 + 1, product_id="k1", price=80, category="Kitchen"),
        track("Product Added", user=user, ts=T0 + 2, product_id="k2", price=40, category="Kitchen"),
    ]


def test_the_same_message_id_twice_is_applied_once_and_triggers_once() -> None:
    store, log = Store(), Log()
    events = cart_events()
    retry = dict(events[2])  # the SDK retried the request: same messageId, new offset
    result = run(engine(store), log.records(*events, retry))
    assert (result.applied, result.duplicates) == (3, 1)
    assert len(result.triggers) == 1
    assert ctx_of(result, b"u-1")["cart"]["value"] == 120.0


def test_redelivery_after_a_crash_is_not_applied_twice() -> None:
    store, log = Store(), Log()
    batch = log.records(*cart_events())
    first = run(engine(store), batch, store)
    assert len(first.triggers) == 1
    # The process died after writing the contexts but before committing offsets:
    # a new engine gets the same records again, then new ones.
    later = log.records(page("/checkout", ts=T0 + 3))
    second = run(engine(store), [*batch, *later], store)
    assert (second.applied, second.duplicates, second.new_customers) == (1, 3, 0)
    assert second.triggers == []
    ctx = orjson.loads(store.data[(0, b"u-1")])
    assert ctx["n"] == 4
    assert ctx["cart"]["value"] == 120.0
    assert ctx["pages"] == ["/kitchen", "/checkout"]


def test_redelivery_with_regenerated_message_ids_is_caught_by_offset() -> None:
    store, log = Store(), Log()
    events = cart_events()
    batch = log.records(*events)
    run(engine(store), batch, store)
    replayed = [
        r._replace(value=orjson.dumps({**e, "messageId": f"new-{i}"}))
        for i, (r, e) in enumerate(zip(batch, events, strict=True))
    ]
    result = run(engine(store), replayed, store)
    assert (result.applied, result.duplicates) == (0, 3)
    assert result.updates == {}


def test_a_replay_before_contexts_were_saved_yields_the_same_decision_id() -> None:
    # Crash before the contexts were written: the events are applied again and
    # the trigger is produced again, with the same CloudEvent id so that the
    # channel can drop the repeat.
    log = Log()
    batch = log.records(*cart_events())
    first = run(engine(Store()), batch)
    again = run(engine(Store()), batch)
    assert len(first.triggers) == len(again.triggers) == 1
    assert first.triggers[0].value == again.triggers[0].value
    assert (
        orjson.loads(first.triggers[0].value)["id"] == orjson.loads(again.triggers[0].value)["id"]
    )


# --------------------------------------------------------------------------
# Triggers
# --------------------------------------------------------------------------


def test_a_trigger_fires_and_yields_a_cloudevent() -> None:
    store, log = Store(), Log()
    events = cart_events()
    result = run(engine(store, source="/rtim/test"), log.records(*events))
    (trigger,) = result.triggers
    assert trigger.topic == TRIGGER_TOPIC_PREFIX + "web" == "rtim.triggers.web"
    assert (trigger.channel, trigger.offer_id, trigger.key) == ("web", "free-shipping", b"u-1")
    assert trigger.source_ms == NOW - 5
    ce = orjson.loads(trigger.value)
    expected_id = decision_id("u-1", events[2]["messageId"], "cart-builder")
    # Structured mode of the CloudEvents Kafka binding: no ce_ header.
    assert trigger.headers == [("content-type", CONTENT_TYPE)]
    assert (ce["specversion"], ce["id"], ce["type"]) == ("1.0", expected_id, TRIGGER_TYPE)
    assert (ce["source"], ce["subject"]) == ("/rtim/test", "u-1")
    assert ce["time"] == "2026-11-25T12:00:00.000Z"
    assert ce["data"]["offer"]["id"] == "free-shipping"
    assert ce["data"]["trigger"] == "cart-builder"
    assert ce["data"]["context"]["cart_value"] == 120.0
    assert ce["data"]["event"]["message_id"] == events[2]["messageId"]
    assert result.no_offer == 0
    assert ctx_of(result, b"u-1")["fired"] == {"cart-builder": T0 + 2}


def test_a_trigger_goes_to_the_channel_the_customer_is_on() -> None:
    store, log = Store(), Log()
    events = [track("Product Added", app=True, product_id="t1", price=150)]
    events.append(track("Support Ticket Opened", app=True, ts=T0 + 1))
    result = run(engine(store), log.records(*events))
    assert [(t.topic, t.offer_id) for t in result.triggers] == [
        ("rtim.triggers.app", "free-shipping"),
        ("rtim.triggers.call_centre", "callback"),  # the callback offer has no app channel
    ]


def test_cooldown_suppresses_a_second_trigger() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    first = run(eng, log.records(*cart_events()), store)
    assert len(first.triggers) == 1
    adds = [
        (T0 + 10 * MINUTE, 0),  # inside the 30-minute cooldown
        (T0 + 29 * MINUTE, 0),
        (T0 + 2 + 30 * MINUTE, 1),  # 30 minutes after the first trigger
        (T0 + 35 * MINUTE, 0),
    ]
    for i, (ts, expected) in enumerate(adds):
        batch = log.records(track("Product Added", ts=ts, product_id=f"x{i}", price=10))
        result = run(eng, batch, store)
        assert len(result.triggers) == expected, ts


def test_cooldown_survives_a_restart() -> None:
    store, log = Store(), Log()
    run(engine(store), log.records(*cart_events()), store)
    later = log.records(track("Product Added", ts=T0 + 5 * MINUTE, product_id="z", price=10))
    result = run(engine(store), later, store)
    assert result.applied == 1 and result.triggers == []


def test_a_trigger_with_no_eligible_offer_is_counted() -> None:
    store, log = Store(), Log()
    views = [track("Product Viewed", ts=T0 + i, product_id=f"p{i}") for i in range(3)]
    result = run(engine(store), log.records(*views))
    assert result.triggers == []
    assert result.no_offer == 1  # the second view fired "browse"; the third is in cooldown
    assert ctx_of(result, b"u-1")["fired"] == {"browse": T0 + 1}


def test_an_engine_without_rules_only_keeps_contexts() -> None:
    store, log = Store(), Log()
    eng = Engine(catalog=parse_catalog({}), load=store.load, clock=lambda: NOW / 1000)
    result = run(eng, log.records(*cart_events()))
    assert result.applied == 3 and result.triggers == [] and result.no_offer == 0
    assert ctx_of(result, b"u-1")["fired"] == {}


# --------------------------------------------------------------------------
# Failures inside the update
# --------------------------------------------------------------------------


def test_an_exception_for_one_event_dead_letters_it_and_the_batch_continues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_apply = rtim.engine.apply_event

    def flaky_apply(ctx: dict[str, Any], event: Any, *args: Any) -> None:
        if ctx["id"] == "u-bad":
            raise RuntimeError("disk on fire")
        real_apply(ctx, event, *args)

    monkeypatch.setattr(rtim.engine, "apply_event", flaky_apply)
    store, log = Store(), Log()
    records = log.records(
        page("/", user="u-1"),
        page("/", user="u-bad"),
        *cart_events(user="u-2"),
    )
    result = run(engine(store), records)
    assert (result.consumed, result.applied) == (5, 4)
    assert result.invalid == {"internal_error": 1}
    (letter,) = result.dead_letters
    assert letter.value is records[1].value
    assert letter.key == b"u-bad"
    headers = dict(letter.headers)
    assert headers["__connect.errors.stage"] == b"process"
    assert headers["__connect.errors.offset"] == b"1"
    assert headers["__connect.errors.exception.class.name"] == b"RuntimeError"
    assert headers["__connect.errors.exception.message"] == b"disk on fire"
    assert headers["rtim.errors.reason"] == b"internal_error"
    assert sorted(result.updates[0]) == [b"u-1", b"u-2"]
    assert [t.key for t in result.triggers] == [b"u-2"]


def test_an_exception_while_deciding_dead_letters_the_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_decide(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("bad model")

    monkeypatch.setattr(rtim.engine, "decide", broken_decide)
    store, log = Store(), Log()
    result = run(engine(store), log.records(*cart_events(), page("/after")))
    assert [d.reason for d in result.dead_letters] == ["internal_error"]
    assert dict(result.dead_letters[0].headers)["__connect.errors.stage"] == b"process"
    assert result.triggers == []
    assert ctx_of(result, b"u-1")["pages"] == ["/kitchen", "/after"]


# --------------------------------------------------------------------------
# The context cache
# --------------------------------------------------------------------------


def test_contexts_are_cached_between_batches_and_invalidate_reloads_them() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    run(eng, log.records(page("/one")), store)
    assert eng.context(0, b"u-1")["n"] == 1
    loads = store.loads
    # Someone else (the previous owner of the partition) moved the context on.
    foreign = orjson.loads(store.data[(0, b"u-1")])
    foreign.update(n=41, pages=["/elsewhere"], src=[0, 40])
    store.data[(0, b"u-1")] = orjson.dumps(foreign)
    assert eng.context(0, b"u-1")["n"] == 1  # still the cached one
    assert store.loads == loads
    eng.invalidate()
    assert eng.context(0, b"u-1")["n"] == 41
    assert store.loads == loads + 1
    log.next[0] = 41
    result = run(eng, log.records(page("/two")), store)
    ctx = ctx_of(result, b"u-1")
    assert (ctx["n"], ctx["pages"], ctx["src"]) == (42, ["/elsewhere", "/two"], [0, 41])


def test_an_unknown_customer_has_no_context() -> None:
    eng = engine(Store())
    assert eng.context(0, b"nobody") is None


def test_a_small_cache_reloads_evicted_contexts_from_the_store() -> None:
    store, log = Store(), Log()
    eng = engine(store, cache_size=2)
    for round_ in range(3):
        users = [page(f"/r{round_}", user=f"u-{i}", ts=T0 + round_) for i in range(6)]
        result = run(eng, log.records(*users), store)
        assert result.new_customers == (6 if round_ == 0 else 0)
        assert result.applied == 6
    for i in range(6):
        ctx = orjson.loads(store.data[(0, f"u-{i}".encode())])
        assert (ctx["n"], ctx["pages"]) == (3, ["/r0", "/r1", "/r2"])


def test_batches_begun_before_the_previous_is_persisted_keep_the_cache_bounded() -> None:
    """Decision requests answered at once begin each batch while the previous one is
    being persisted (trim=False): trimmed once that one is, the cache stays within its
    size, and a context the begun batch changed is not reloaded from the older store."""
    store, log = Store(), Log()
    eng = engine(store, cache_size=4)
    begun = eng.start_batch(TOPIC)
    seen = []
    for round_ in range(5):
        users = [page(f"/r{round_}", user=f"u-{round_}-{i}", ts=T0 + round_) for i in range(6)]
        seen.append(f"/b{round_}")
        begun.add(log.records(*users, page(seen[-1], user="regular", ts=T0 + round_)))
        result = begun.finish()
        # The next batch begins before this one is persisted, and changes the regular customer ...
        begun = eng.start_batch(TOPIC, trim=False)
        seen.append(f"/a{round_}")
        begun.add(log.records(page(seen[-1], user="regular", ts=T0 + round_)))
        store.persist(result)
        eng.trim_cache(keep=begun)
        assert sum(len(c) for c in eng._cache.values()) <= 4 + 1
        # ... and goes on after the trim (the next fetch takes it over).
    store.persist(begun.finish())
    ctx = orjson.loads(store.data[(0, b"regular")])
    assert ctx["n"] == len(seen)


# --------------------------------------------------------------------------
# Replays within the dedupe window
# --------------------------------------------------------------------------


def outputs(result: BatchResult) -> tuple[Any, ...]:
    """What a batch wrote and published, for comparing two runs."""
    return (
        result.updates,
        [(t.topic, t.key, t.value) for t in result.triggers],
        [(d.reason, d.value) for d in result.dead_letters],
    )


def shop(customers: int, per_customer: int) -> list[dict[str, Any]]:
    """Browsing and carts of several customers over a few hours, interleaved."""
    events = []
    for i in range(per_customer):
        for c in range(customers):
            ts = T0 - 6 * 3_600_000 + i * 2 * MINUTE + c
            if i % 5 == 4:
                events.append(
                    track("Product Added", user=f"u-{c}", ts=ts, product_id=f"p{i}", price=60)
                )
            else:
                events.append(page(f"/p/{i}", user=f"u-{c}", ts=ts))
    return events


def test_events_sent_again_later_are_not_applied_twice() -> None:
    store, log = Store(), Log()
    events = shop(customers=50, per_customer=100)
    eng = engine(store)
    first = [run(eng, log.records(*events[i : i + 500]), store) for i in range(0, 5000, 500)]
    assert sum(r.applied for r in first) == 5000
    assert sum(len(r.triggers) for r in first) > 50
    before = dict(store.data)
    # The producer sends all 5,000 again (new records, same messageIds), to a
    # worker that restarted meanwhile.
    eng = engine(store)
    again = [run(eng, log.records(*events[i : i + 500]), store) for i in range(0, 5000, 500)]
    assert sum(r.applied for r in again) == 0
    assert sum(r.duplicates for r in again) == 5000
    assert [t for r in again for t in r.triggers] == []
    assert store.data == before


def test_a_replay_gives_the_same_result_whatever_the_batches() -> None:
    events = shop(customers=5, per_customer=40)
    late = track("Product Viewed", user="u-1", ts=T0 - 40 * 3_600_000)  # 34 h before the rest
    stream = [*events, *events[:30], late, *events[100:], late]

    def replay(batch: int) -> tuple[Any, ...]:
        store, log = Store(), Log()
        eng = engine(store)
        records = log.records(*stream)
        triggers, letters = [], []
        for i in range(0, len(records), batch):
            result = run(eng, records[i : i + batch], store)
            triggers += [t.value for t in result.triggers]
            letters += [d.reason for d in result.dead_letters]
        return store.data, triggers, letters

    one_by_one = replay(1)
    assert one_by_one == replay(7) == replay(len(stream))
    assert one_by_one[1]  # triggers, none twice
    assert len(set(one_by_one[1])) == len(one_by_one[1])
    # The late event is further back than the window: applied (nothing of its
    # time was forgotten yet) and forgotten at once; sent again, it is refused.
    assert one_by_one[2] == ["too_old"]
    assert orjson.loads(one_by_one[0][(0, b"u-1")])["n"] == 41


# --------------------------------------------------------------------------
# Finite numbers; stored contexts always load
# --------------------------------------------------------------------------


def test_huge_order_totals_are_dead_lettered_and_the_customer_goes_on() -> None:
    store, log = Store(), Log()
    huge = [track("Order Completed", ts=T0 + i, total=1.7e308) for i in range(2)]
    result = run(
        engine(store), log.records(*huge, track("Order Completed", ts=T0 + 5, total=30)), store
    )
    assert [d.reason for d in result.dead_letters] == ["out_of_range", "out_of_range"]
    assert result.invalid == {"out_of_range": 2}
    headers = dict(result.dead_letters[0].headers)
    assert headers["rtim.errors.reason"] == b"out_of_range"
    assert b"properties.total" in headers["__connect.errors.exception.message"]
    assert (orjson.loads(store.data[(0, b"u-1")])["revenue"], result.applied) == (30.0, 1)
    # After a restart the customer's orders are still applied.
    later = run(engine(store), log.records(track("Order Completed", ts=T0 + 9, total=12.5)), store)
    assert (later.applied, later.dead_letters) == (1, [])
    assert orjson.loads(store.data[(0, b"u-1")])["revenue"] == 42.5


def test_a_customer_stored_with_a_null_revenue_keeps_taking_orders() -> None:
    # What versions before 2 stored after an infinite revenue.
    store, log = Store(), Log()
    old = {
        "id": "u-1",
        "first_ms": T0,
        "last_ms": T0 + 1,
        "n": 2,
        "types": {"track": 2},
        "events": {"Order Completed": 2},
        "channels": {"web": {"n": 2, "last_ms": T0 + 1}},
        "pages": [],
        "cart": {"items": {}, "value": 0.0, "updated_ms": T0 + 1},
        "affinity": {},
        "aff_ms": None,
        "orders": 2,
        "revenue": None,
        "issues": 0,
        "traits": {},
        "fired": {},
        "ids": ["m-1", "m-2"],
        "src": [0, 1],
    }
    store.data[(0, b"u-1")] = orjson.dumps(old)
    log.next[0] = 2
    eng = engine(store)
    result = run(eng, log.records(track("Order Completed", ts=T0 + 2, total=30)), store)
    assert (result.applied, result.dead_letters) == (1, [])
    assert eng.repaired == 1
    ctx = orjson.loads(store.data[(0, b"u-1")])
    assert (ctx["orders"], ctx["revenue"], ctx["n"]) == (3, 30.0, 3)
    resent = log.records(track("Order Completed", ts=T0 + 1, total=30, message_id="m-2"))
    assert run(eng, resent, store).duplicates == 1


# --------------------------------------------------------------------------
# An event changes the context completely or not at all
# --------------------------------------------------------------------------


def busy_batch(failing: list[int]) -> list[dict[str, Any]]:
    """Events of three customers; those at ``failing`` are marked to fail."""
    events = [
        page("/kitchen", user="u-1", ts=T0),
        page("/", user="u-2", ts=T0),
        track(
            "Product Added", user="u-1", ts=T0 + 1, product_id="k1", price=80, category="Kitchen"
        ),
        track(
            "Product Added", user="u-1", ts=T0 + 2, product_id="k2", price=40, category="Kitchen"
        ),
        track("Product Added", user="u-2", ts=T0 + 3, product_id="t", price=150),
        track("Order Completed", user="u-1", ts=T0 + 4, total=120),
        track("Product Added", user="u-1", ts=T0 + 5, product_id="k3", price=90, category="Books"),
        track("Product Added", user="u-1", ts=T0 + 6, product_id="k4", price=30, category="Books"),
        page("/after", user="u-1", ts=T0 + 7),
        track("Support Ticket Opened", user="u-3", ts=T0 + 8),
        track("Product Added", user="u-1", ts=T0 + 9, product_id="k5", price=20, category="Toys"),
        track("Product Added", user="u-1", ts=T0 + 10, product_id="k6", price=20, category="Toys"),
    ]
    for i in failing:
        events[i]["properties"]["fail"] = True
    return events


def warm_models() -> ModelSet:
    """Models that have met a decision: river's AdPredictor sets a new model's bias
    prior from the size of the first feature set it scores, so two runs compare
    exactly only if their models start alike."""
    models = ModelSet()
    models.score([f"f{i}" for i in range(12)], [(o.id, ()) for o in CATALOG.offers], Random(0))
    return models


def same_as_without(failing: list[int], reason: str = "internal_error", batch: int = 1000) -> None:
    """Running the batch gives what running it without the failing events gives."""
    log = Log()
    seed = log.records(page("/first", user="u-1", ts=T0 - 10))  # an earlier, stored batch
    records = log.records(*busy_batch(failing))
    kept = [r for i, r in enumerate(records) if i not in failing]
    runs = []
    for stream in (records, kept):
        store = Store()
        run(engine(store), seed, store)
        eng = engine(store, models=warm_models())
        produced: list[Any] = [[], [], []]
        for i in range(0, len(stream), batch):
            result = run(eng, stream[i : i + batch], store)
            produced[0] += [(t.topic, t.key, t.value) for t in result.triggers]
            produced[1] += [(d.reason, d.value) for d in result.dead_letters]
            produced[2] += [d.value for d in result.decisions]
        runs.append((store.data, *produced))
    (stored, triggers, letters, decisions), (stored_without, triggers_without, _, without) = runs
    assert stored == stored_without
    assert triggers == triggers_without
    assert decisions == without  # a failed event's decisions are not recorded
    assert letters == [(reason, records[i].value) for i in failing]


@pytest.mark.parametrize(
    ("failing", "batch"),
    [([3], 1000), ([5], 1000), ([11], 1000), ([3, 7], 1000), ([3, 5, 6, 7, 11], 1000), ([3, 7], 4)],
)
def test_an_event_failing_half_way_through_the_update_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, failing: list[int], batch: int
) -> None:
    real = rtim.context.model._apply_commerce

    def half_way(ctx: dict[str, Any], name: str, props: Any, *rest: Any) -> None:
        real(ctx, name, props, *rest)  # counts, channels, cart, affinity: changed
        if props.get("fail"):
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(rtim.context.model, "_apply_commerce", half_way)
    same_as_without(failing, batch=batch)


# 3 fills the cart to 120 (a trigger); when it fails, 7 fills it to 120, and so on.
@pytest.mark.parametrize("failing", [[3], [3, 7], [3, 7, 10]])
def test_an_event_failing_in_a_decision_sets_no_cooldown_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, failing: list[int]
) -> None:
    real = rtim.engine.decide

    def flaky(*args: Any, **kwargs: Any) -> Any:
        decision = real(*args, **kwargs)
        if args[4].properties.get("fail"):
            raise ZeroDivisionError("bad model")
        return decision

    monkeypatch.setattr(rtim.engine, "decide", flaky)
    same_as_without(failing)


@pytest.mark.parametrize("failing", [[3], [3, 7, 10]])
def test_an_event_failing_after_its_decision_is_recorded_leaves_no_record(
    monkeypatch: pytest.MonkeyPatch, failing: list[int]
) -> None:
    real = rtim.engine.encode_trigger

    def flaky(decision: Any, **kwargs: Any) -> bytes:
        if decision.event.properties.get("fail"):
            raise ZeroDivisionError("bad trigger")
        return real(decision, **kwargs)

    monkeypatch.setattr(rtim.engine, "encode_trigger", flaky)
    same_as_without(failing)


# --------------------------------------------------------------------------
# The ceiling of a context
# --------------------------------------------------------------------------


def escaped(i: int, chars: int) -> str:
    """A string of control characters: each is 6 bytes in JSON (\\u0001)."""
    return "\x01" * (chars - 4) + f"{i:04d}"


def hostile_customer() -> list[dict[str, Any]]:
    """Valid events that fill every budget of u-1's context with escaped strings."""
    ts = T0 - 50 * MINUTE
    events = [page("/", ts=ts + i) for i in range(900)]  # message ids to remember
    for i in range(MAX_NAMES):
        events.append(track(escaped(i, MAX_NAME_CHARS), ts=ts + i))
    for i in range(MAX_CART_ITEMS + 5):
        pid = category = escaped(i, MAX_PRODUCT_ID_CHARS)
        events.append(track("Product Added", ts=ts + i, product_id=pid, category=category, price=1))
    for i in range(MAX_PAGES):
        events.append(page("/" + escaped(i, MAX_PAGE_CHARS), ts=ts + i))
    return events


def test_a_context_never_goes_over_its_ceiling() -> None:
    log = Log()
    records = log.records(*hostile_customer())

    def replay(stream: list[Record], batch: int) -> tuple[Store, list[Any]]:
        store = Store()
        eng = engine(store)
        letters = []
        for i in range(0, len(stream), batch):
            result = run(eng, stream[i : i + batch], store)
            letters += result.dead_letters
            assert all(len(v) <= MAX_CONTEXT_BYTES for v in result.updates.get(0, {}).values())
        return store, letters

    store, letters = replay(records, len(records))
    assert letters and {d.reason for d in letters} == {"too_large"}
    message = dict(letters[0].headers)["__connect.errors.exception.message"]
    assert b"over the ceiling of 65536" in message
    size = len(store.data[(0, b"u-1")])
    assert MAX_CONTEXT_BYTES - 2048 < size <= MAX_CONTEXT_BYTES, size
    # The same events one batch at a time are refused alike ...
    one_by_one, letters_one_by_one = replay(records, 1)
    assert one_by_one.data == store.data
    assert [d.value for d in letters_one_by_one] == [d.value for d in letters]
    # ... and the context is what the accepted events alone make.
    refused = {d.value for d in letters}
    without, none = replay([r for r in records if r.value not in refused], len(records))
    assert none == [] and without.data == store.data


def test_a_consent_withdrawal_holds_even_when_its_event_is_refused_as_too_large() -> None:
    """A customer at the ceiling withdraws consent with an event that would take the
    context over it: the event is refused, its consent is not."""

    def identify(ts: int, traits: dict[str, Any]) -> dict[str, Any]:
        e = segment("identify", None, ts=ts)
        e.pop("properties", None)
        e["traits"] = traits
        return e

    def preferences(ts: int, prefs: dict[str, Any]) -> dict[str, Any]:
        e = track("Page Seen", ts=ts, category=escaped(7, MAX_CATEGORY_CHARS))
        e["context"]["consent"] = {"categoryPreferences": prefs}
        return e

    long_traits = {
        t: escaped(i, MAX_TRAIT_CHARS) for i, t in enumerate(("plan", "segment", "tier"))
    }
    ts = T0 - 40 * MINUTE
    events = [
        identify(ts - 20 * MINUTE, {"consent": {"email": True}}),
        preferences(ts - 20 * MINUTE + 1, {"Advertising": True}),
        *hostile_customer(),
        identify(ts, {**long_traits, "consent": {"email": False}}),
        preferences(ts + 1, {"Advertising": False}),
    ]
    store = Store()
    result = run(engine(store), Log().records(*events), store)
    refused = [orjson.loads(d.value) for d in result.dead_letters]
    assert any(r["type"] == "identify" and "consent" in r["traits"] for r in refused)
    stored = store.data[(0, b"u-1")]
    assert len(stored) <= MAX_CONTEXT_BYTES
    ctx = orjson.loads(stored)
    assert ctx["consent"]["email"][0] is False
    assert ctx["consent_cat"]["Advertising"][0] is False


def test_the_largest_context_of_long_names_ids_and_categories() -> None:
    # The shape of the probe that made a 2.96 MB context: 120 valid events,
    # each under 32 KiB, with long names, product ids and categories.
    store, log = Store(), Log()
    events = []
    for i in range(40):
        long = f"{i:03d}" + "x" * 9000
        events.append(track(long, ts=T0 + i))
        events.append(track("Product Added", ts=T0 + i, product_id=long, category=long, price=1))
        events.append(page("/" + long, ts=T0 + i, category=long))
    assert all(len(orjson.dumps(e)) < 32 * 1024 for e in events)
    result = run(engine(store), log.records(*events), store)
    assert (result.applied, result.dead_letters) == (120, [])
    assert len(store.data[(0, b"u-1")]) < 16 * 1024


def test_a_new_customer_whose_events_all_fail_is_not_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(rtim.engine, "apply_event", broken)
    store, log = Store(), Log()
    result = run(engine(store), log.records(page("/a", user="u-9"), page("/b", user="u-9")))
    assert (result.applied, result.new_customers, result.updates) == (0, 0, {})
    assert [d.reason for d in result.dead_letters] == ["internal_error", "internal_error"]


# --------------------------------------------------------------------------
# One customer, one partition, one context
# --------------------------------------------------------------------------

#: The partition each customer's id maps to (Kafka's default partitioner, as the shell gives it).
OWNERS = {b"u-1": 2, b"u-2": 1}


def keyed(record: Record, key: bytes | None, partition: int) -> Record:
    return record._replace(key=key, partition=partition)


def test_records_not_keyed_by_their_customer_are_re_keyed_not_applied_where_they_landed() -> None:
    store, log = Store(), Log()
    eng = engine(store, partition_of=OWNERS.__getitem__)
    events = [page(f"/p{i}", ts=T0 + i * MINUTE) for i in range(5)]
    landed = [
        keyed(log.records(events[0], partition=0)[0], None, 0),
        keyed(log.records(events[1], partition=1)[0], b"", 1),
        keyed(log.records(events[2], partition=3)[0], b"session-9", 3),
        keyed(log.records(events[3], partition=0)[0], b"u-1", 0),  # another partitioner's
        log.records(events[4], partition=2)[0],  # keyed and placed right
    ]
    result = run(eng, landed, store)
    assert (result.consumed, result.applied, result.new_customers) == (5, 1, 1)
    assert not result.dead_letters
    # Nothing of the customer is on the partitions the records landed on.
    assert list(result.updates) == [2]
    assert ctx_of(result, b"u-1", 2)["n"] == 1
    assert all(eng.context(p, b"u-1") is None for p in (0, 1, 3))
    assert [(r.key, r.partition, r.reason) for r in result.rekeyed] == [
        (b"u-1", 2, "key"),
        (b"u-1", 2, "key"),
        (b"u-1", 2, "key"),
        (b"u-1", 2, "partition"),
    ]
    for rekeyed, record in zip(result.rekeyed, landed, strict=False):
        assert rekeyed.value is record.value  # the value, byte for byte
        assert rekeyed.record is record
        assert rekeyed.headers == [
            ("trace", b"t-1"),  # the original headers, then where it came from
            ("rtim.rekeyed.from.partition", str(record.partition).encode()),
            ("rtim.rekeyed.from.offset", str(record.offset).encode()),
        ]
    # The copies, read from the customer's partition, are applied there once each,
    # and a copy published twice (a crash before the commit) is a duplicate.
    copies = [
        Record(2, log.next.get(2, 0) + i, r.key, r.value, tuple(r.headers), NOW - 5)
        for i, r in enumerate([*result.rekeyed, result.rekeyed[0]])
    ]
    again = run(eng, copies, store)
    assert (again.applied, again.duplicates, again.rekeyed) == (4, 1, [])
    ctx = ctx_of(again, b"u-1", 2)
    assert ctx["n"] == 5
    assert set(ctx["pages"]) == {f"/p{i}" for i in range(5)}


def test_without_a_partitioner_only_the_key_is_checked() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    result = run(
        eng,
        [
            *log.records(page("/a"), partition=3),
            keyed(log.records(page("/b"), partition=3)[0], b"x", 3),
        ],
        store,
    )
    assert result.applied == 1
    assert [(r.key, r.partition, r.reason) for r in result.rekeyed] == [(b"u-1", None, "key")]


def test_the_cache_never_hands_a_context_of_one_partition_to_another() -> None:
    store, log = Store(), Log()
    eng = engine(store)  # no partitioner: a library user's records, keyed right
    first = run(eng, log.records(page("/a"), partition=0), store)
    assert ctx_of(first, b"u-1", 0)["n"] == 1
    # The same customer on another partition: a context of that partition, not the
    # one cached for partition 0 (within a batch and across batches).
    second = run(
        eng,
        log.records(page("/b", ts=T0 + MINUTE), partition=1)
        + log.records(page("/c", ts=T0 + 2 * MINUTE), partition=0),
        store,
    )
    assert ctx_of(second, b"u-1", 1)["pages"] == ["/b"]
    assert ctx_of(second, b"u-1", 0)["pages"] == ["/a", "/c"]
    assert eng.context(1, b"u-1") is not eng.context(0, b"u-1")
    assert second.new_customers == 1


def test_a_customer_whose_context_kafka_refused_keeps_the_stored_one() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    run(eng, log.records(page("/a")), store)
    batch = log.records(
        page("/b", ts=T0 + MINUTE), page("/x", user="u-2"), page("/c", ts=T0 + 2 * MINUTE)
    )
    work = eng.start_batch(TOPIC)
    work.add(batch)
    result = work.finish()
    letters = work.refuse_context(0, b"u-1", RuntimeError("MessageSizeTooLargeError"))
    # Both events of u-1 are dead-lettered as refused, with their original bytes;
    # u-2 is kept; u-1's context is the stored one, in the cache too.
    assert [(d.reason, d.value) for d in letters] == [
        ("refused", batch[0].value),
        ("refused", batch[2].value),
    ]
    assert dict(letters[0].headers)["__connect.errors.stage"] == b"publish"
    assert list(result.updates[0]) == [b"u-2"]
    assert (result.applied, result.invalid["refused"]) == (1, 2)
    assert eng.context(0, b"u-1")["pages"] == ["/a"]


# --------------------------------------------------------------------------
# Decisions, responses and attribution windows, in the engine
# --------------------------------------------------------------------------

HOUR = 3_600_000


def ticket(user: str, ts: int) -> dict[str, Any]:
    return track("Support Ticket Opened", user=user, ts=ts)


def responses(*items: tuple[str, str, str, int], partition: int = 0) -> list[Record]:
    """Response records: (customer, decision id, outcome, event time)."""
    out = []
    for i, (customer, decision, outcome, ts) in enumerate(items):
        body = {
            "decision_id": decision,
            "customer_id": customer,
            "outcome": outcome,
            "timestamp": iso(ts),
        }
        out.append(Record(partition, 1000 + i, customer.encode(), orjson.dumps(body)))
    return out


def iso(ms_: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms_ // 1000)) + f".{ms_ % 1000:03d}Z"


def respond(eng: Engine, records: list[Record], store: Store) -> BatchResult:
    run_ = eng.start_batch(TOPIC)
    run_.add_responses(records)
    result = run_.finish()
    store.persist(result)
    return result


def decided(window_ms: int = HOUR) -> tuple[Engine, Store, Log, dict[str, str]]:
    """Two customers with an open decision each (callback), made at T0."""
    store, log = Store(), Log()
    eng = engine(store, window_ms=window_ms)
    result = run(eng, log.records(ticket("u-1", T0), ticket("u-2", T0)), store)
    ids = {}
    for d in result.decisions:
        record = orjson.loads(d.value)
        assert (record["offer_id"], record["window_end_ms"]) == ("callback", T0 + window_ms)
        ids[record["customer_id"]] = record["decision_id"]
    assert set(ids) == {"u-1", "u-2"}
    return eng, store, log, ids


def test_a_decision_is_recorded_and_kept_open_in_the_context() -> None:
    eng, store, _, ids = decided()
    ctx = orjson.loads(store.data[(0, b"u-1")])
    (pending,) = ctx["pending"]
    assert pending[:2] == [ids["u-1"], "callback"]
    assert pending[3:] == [T0, T0 + HOUR, []]
    assert pending[2], "the features it was scored on"
    assert eng.open_windows() == 2


def test_responses_join_the_customers_open_decision() -> None:
    eng, store, _, ids = decided()
    result = respond(
        eng,
        responses(
            ("u-1", ids["u-1"], "impression", T0 + MINUTE),
            ("u-1", ids["u-1"], "conversion", T0 + 2 * MINUTE),
            ("u-1", ids["u-1"], "conversion", T0 + 3 * MINUTE),
            ("u-2", ids["u-1"], "conversion", T0 + MINUTE),  # another customer's decision
            ("u-3", "nope", "click", T0 + MINUTE),  # a customer never seen
        ),
        store,
    )
    assert result.responses == {
        ("impression", "joined"): 1,
        ("conversion", "joined"): 1,
        ("conversion", "duplicate"): 1,
        ("conversion", "unknown"): 1,
        ("click", "unknown"): 1,
    }
    ((decision, converted, why),) = [(e.decision_id, e.converted, e.why) for e in result.examples]
    assert (decision, converted, why) == (ids["u-1"], True, "conversion")
    ctx = orjson.loads(store.data[(0, b"u-1")])
    assert ctx["pending"] == [] and ctx["closed"][0][0] == ids["u-1"]


def test_a_window_closes_when_the_partitions_stream_time_passes_it() -> None:
    eng, store, log, ids = decided()
    # Another customer's event inside the windows closes nothing; one past them closes both.
    assert run(eng, log.records(page("/", user="u-9", ts=T0 + HOUR - 1)), store).examples == []
    result = run(eng, log.records(page("/", user="u-9", ts=T0 + HOUR)), store)
    got = {(e.decision_id, e.converted, e.why, e.closed_ms) for e in result.examples}
    assert got == {(ids[c], False, "window", T0 + HOUR) for c in ("u-1", "u-2")}
    assert set(result.updates[0]) == {b"u-1", b"u-2", b"u-9"}  # the closed decisions persist
    # Late now, and nothing more is learned.
    late = respond(eng, responses(("u-1", ids["u-1"], "conversion", T0 + MINUTE)), store)
    assert late.responses == {("conversion", "late"): 1} and late.examples == []
    assert eng.open_windows() == 0


def test_a_response_that_names_no_decision_here_leaves_the_stream_time_alone() -> None:
    """A channel system's clock may be anything: a response for no decision of this
    partition (or stamped before its decision) must not close the windows of every
    customer on it; one that joins moves the stream time as any event does."""
    eng, store, _, ids = decided()
    later = T0 + HOUR + 5 * MINUTE
    stray = respond(
        eng,
        responses(
            ("u-9", "no-such-decision", "impression", later),
            ("u-1", ids["u-1"], "conversion", T0 - 10 * MINUTE),  # before its decision
        ),
        store,
    )
    assert stray.responses == {("impression", "unknown"): 1, ("conversion", "early"): 1}
    assert stray.examples == [] and eng.open_windows() == 2
    assert eng.clock(0).stream_ms == T0
    joined = respond(eng, responses(("u-2", ids["u-2"], "click", later)), store)
    assert joined.responses == {("click", "late"): 1}
    assert {(e.decision_id, e.why) for e in joined.examples} == {
        (ids["u-1"], "window"),
        (ids["u-2"], "window"),
    }
    assert eng.clock(0).stream_ms == later


def test_an_idle_partition_closes_its_windows_on_the_wall_clock() -> None:
    wall = [NOW / 1000]
    store, log = Store(), Log()
    eng = Engine(
        catalog=CATALOG, load=store.load, clock=lambda: wall[0], window_ms=HOUR, idle_ms=MINUTE
    )
    run(eng, log.records(ticket("u-1", T0)), store)
    wall[0] += 30  # half a minute: not idle yet
    assert eng.tick(int(wall[0] * 1000)) is None
    wall[0] += 3600  # an hour later: the stream time moved by what passed since
    run_ = eng.tick(int(wall[0] * 1000))
    assert run_ is not None
    result = run_.finish()
    ((why, converted),) = [(e.why, e.converted) for e in result.examples]
    assert (why, converted) == ("window", False)
    assert b"u-1" in result.updates[0]


def test_a_new_owner_learns_the_open_windows_from_the_store() -> None:
    _, store, _, ids = decided()
    eng = engine(store, window_ms=HOUR)  # a worker that got the partition
    stored = [(k, v) for (p, k), v in store.data.items() if p == 0]
    assert eng.index_windows(0, stored, wall_ms=NOW) == 2
    log = Log()
    log.next[0] = 100
    result = run(eng, log.records(page("/", user="u-9", ts=T0 + 2 * HOUR)), store)
    assert {e.decision_id for e in result.examples} == set(ids.values())


def test_an_invalid_response_is_dead_lettered_with_its_reason() -> None:
    eng, store, _, _ = decided()
    bad = [
        Record(0, 7, b"u-1", b"{nope"),
        Record(0, 8, b"u-1", b'{"decision_id": "d", "customer_id": "u-1", "outcome": "like",'
               b' "timestamp": "2026-11-25T11:00:00Z"}'),
        Record(0, 9, b"u-1", b'{"decision_id": "d", "customer_id": "u-1", "outcome": "click",'
               b' "timestamp": "2031-01-01T00:00:00Z"}'),
    ]  # fmt: skip
    result = respond(eng, bad, store)
    assert [d.reason for d in result.dead_letters] == [
        "malformed_json",
        "unknown_outcome",
        "clock_skew",
    ]
    assert result.responses == {}


def test_a_response_keyed_otherwise_is_rekeyed_to_its_customer() -> None:
    eng, store, _, ids = decided()
    (record,) = responses(("u-1", ids["u-1"], "click", T0 + MINUTE))
    result = respond(eng, [record._replace(key=b"session-9")], store)
    (copy,) = result.rekeyed
    assert (copy.topic, copy.key, copy.reason) == ("rtim.responses", b"u-1", "key")
    assert result.responses == {}


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_windows_close_the_same_whatever_the_batches(batch: int) -> None:
    # Decisions, responses and later events of several customers, run as one batch and
    # in smaller ones: the same contexts and the same examples, in the same order.
    events = []
    for i in range(6):
        events.append(ticket(f"u-{i}", T0 + i * 10 * MINUTE))
        events.append(page("/", user=f"u-{(i + 3) % 6}", ts=T0 + i * 10 * MINUTE + HOUR // 2))
    events += [ticket(f"u-{i}", T0 + 2 * HOUR + i) for i in range(3)]

    def go(size: int) -> tuple[dict[Any, bytes], list[tuple[str, bool, str]]]:
        store, log = Store(), Log()
        eng = engine(store, window_ms=HOUR, models=warm_models())
        records = log.records(*events)
        examples = []
        for i in range(0, len(records), size):
            examples += run(eng, records[i : i + size], store).examples
        return store.data, [(e.decision_id, e.converted, e.why) for e in examples]

    whole = go(len(events))
    assert len(whole[1]) == 6  # each first decision closed once, by a later event's time
    assert go(batch) == whole


def test_records_that_are_not_applied_leave_the_stream_time_alone() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    run(eng, log.records(b"{oops", b""), store)
    assert eng.clock(0).stream_ms is None  # nothing seen: no stream time, and no idle clock
    run(eng, log.records(page("/", ts=T0)), store)
    assert eng.clock(0).stream_ms == T0


def test_every_change_that_is_not_an_event_makes_a_newer_version_of_the_context() -> None:
    """A response joined or a window closed changes a context without an event: its
    version (``src``) still moves on, so that table recovery prefers it to a late copy
    built from the same events without that change (a paused worker's)."""
    eng, store, log, ids = decided()

    def version(customer: str) -> Any:
        return context_version(store.data[(0, customer.encode())])

    (partition, offset, changes) = version("u-1")
    respond(eng, responses(("u-1", ids["u-1"], "click", T0 + MINUTE)), store)
    assert version("u-1") == (partition, offset, changes + 1)
    # The same response again (redelivered) changes nothing: the version stays.
    again = respond(eng, responses(("u-1", ids["u-1"], "click", T0 + MINUTE)), store)
    assert again.responses == {("click", "duplicate"): 1}
    assert version("u-1") == (partition, offset, changes + 1)
    run(eng, log.records(page("/", user="u-9", ts=T0 + HOUR)), store)  # closes the window
    assert version("u-1") == (partition, offset, changes + 2)
    assert version("u-2")[1:] == (version("u-2")[1], 1)  # closed too, no response
    # The customer's next event: a higher offset, the changes still counted.
    run(eng, log.records(page("/x", user="u-1", ts=T0 + HOUR + 1)), store)
    later = version("u-1")
    assert later[1] > offset and later[2] == changes + 2 and later > (partition, offset, 99)
