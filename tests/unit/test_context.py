"""The per-customer context: what each Segment call changes, duplicates, budgets."""

from __future__ import annotations

import calendar
import random
from typing import Any

import orjson
import pytest

from rtim.context import model
from rtim.context.model import (
    AFFINITY_HALF_LIFE_MS,
    DEDUPE_WINDOW_MS,
    ID_BUCKET_MS,
    ID_TOKEN_CHARS,
    MAX_AMOUNT,
    MAX_CART_ITEMS,
    MAX_CATEGORIES,
    MAX_CATEGORY_CHARS,
    MAX_IDS,
    MAX_NAME_CHARS,
    MAX_NAMES,
    MAX_PAGE_CHARS,
    MAX_PAGES,
    MAX_PRODUCT_ID_CHARS,
    MAX_TRAIT_CHARS,
    VERSION,
    apply_event,
    is_duplicate,
    load_context,
    new_context,
)
from rtim.events import Event, InvalidEvent

from .segment_calls import parsed, segment_call


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1000


T0 = ms(2026, 11, 2, 9)
MINUTE = 60_000
DAY = 86_400_000
WEEK = 7 * DAY


def event(
    kind: str = "track",
    name: str | None = None,
    *,
    ts: int = T0,
    props: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    traits: dict[str, Any] | None = None,
    message_id: str | None = None,
    user: str = "u-1",
) -> Event:
    """A Segment call as an SDK would send it, parsed by the real parser."""
    return parsed(
        segment_call(
            kind,
            name,
            ts=ts,
            user=user,
            message_id=message_id,
            id_prefix="msg",
            properties=props,
            traits=traits,
            context=context if context is not None else {"library": {"name": "analytics.js"}},
        )
    )


def page(url_path: str, *, ts: int = T0, name: str | None = None, **props: Any) -> Event:
    """A page call from analytics.js: the path is in context.page."""
    return event("page", name, ts=ts, props=props, context={"page": {"path": url_path}})


def track(name: str, *, ts: int = T0, message_id: str | None = None, **props: Any) -> Event:
    return event("track", name, ts=ts, props=props, message_id=message_id)


def run(*events: Event, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    ctx = ctx if ctx is not None else new_context("u-1")
    for offset, e in enumerate(events, start=(ctx["src"] or [0, -1])[1] + 1):
        apply_event(ctx, e, 0, offset)
    return ctx


def test_a_new_context_is_empty_and_serialisable() -> None:
    ctx = new_context("u-9")
    assert ctx["id"] == "u-9"
    assert (ctx["n"], ctx["orders"], ctx["issues"], ctx["revenue"]) == (0, 0, 0, 0.0)
    assert ctx["cart"] == {"items": {}, "value": 0.0}
    assert ctx["first_ms"] is ctx["last_ms"] is ctx["src"] is None
    assert orjson.loads(orjson.dumps(ctx)) == ctx


def test_counts_per_call_type_event_name_and_channel() -> None:
    ctx = run(
        page("/", name="Home"),
        page("/shoes"),
        event("screen", "Cart", context={"app": {"name": "Shop"}}),
        track("Product Viewed", product_id="p1", category="Shoes"),
        track("Product Viewed", product_id="p2", category="Shoes"),
        event("track", "Email Opened", props={"channel": "email"}),
        event("identify", traits={"plan": "gold"}),
    )
    assert ctx["n"] == 7
    assert ctx["types"] == {"page": 2, "screen": 1, "track": 3, "identify": 1}
    assert ctx["events"] == {"Home": 1, "Cart": 1, "Product Viewed": 2, "Email Opened": 1}
    assert {c: v["n"] for c, v in ctx["channels"].items()} == {
        "web": 2,
        "app": 1,
        "server": 3,
        "email": 1,
    }


def test_first_and_last_seen_follow_event_time_not_arrival_order() -> None:
    ctx = run(
        track("Product Viewed", ts=T0 + 10 * MINUTE),
        track("Product Viewed", ts=T0),  # a late event from an offline phone
        track("Product Viewed", ts=T0 + 30 * MINUTE),
        track("Product Viewed", ts=T0 + 20 * MINUTE),
    )
    assert (ctx["first_ms"], ctx["last_ms"]) == (T0, T0 + 30 * MINUTE)
    assert ctx["channels"]["server"]["last_ms"] == T0 + 30 * MINUTE


def test_channel_last_seen_is_per_channel() -> None:
    ctx = run(
        page("/", ts=T0), event("screen", "Home", ts=T0 + DAY, context={"os": {"name": "iOS"}})
    )
    assert ctx["channels"]["web"] == {"n": 1, "last_ms": T0}
    assert ctx["channels"]["app"] == {"n": 1, "last_ms": T0 + DAY}


def test_recent_pages_are_bounded_and_newest_last() -> None:
    ctx = run(*(page(f"/p/{i}", ts=T0 + i) for i in range(25)))
    assert ctx["pages"] == [f"/p/{i}" for i in range(25 - MAX_PAGES, 25)]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: page("/from-context"), ["/from-context"]),
        (lambda: page("/from-context", path="/from-props"), ["/from-props"]),
        (lambda: event("page", "Pricing", context={}), ["Pricing"]),
        (lambda: event("screen", "Basket", context={"app": {"name": "Shop"}}), ["Basket"]),
        (lambda: event("page", None, context={}), []),
        (lambda: track("Product Viewed"), []),
        (lambda: page("/" + "x" * 500), ["/" + "x" * 199]),
    ],
)
def test_which_page_is_remembered(call: Any, expected: list[str]) -> None:
    assert run(call())["pages"] == expected


def test_cart_add_quantity_remove_and_value() -> None:
    ctx = new_context("u-1")
    steps = [
        (track("Product Added", product_id="p1", price=30, quantity=2), {"p1": [2, 30]}, 60.0),
        (track("Product Added", product_id="p1", price=30), {"p1": [3, 30]}, 90.0),
        (
            track("Product Added", sku="SKU-2", price="19.99"),
            {"p1": [3, 30], "SKU-2": [1, 19.99]},
            109.99,
        ),
        (
            track("Product Added", product_id=42, price=1.5, quantity=4),
            {"p1": [3, 30], "SKU-2": [1, 19.99], "42": [4, 1.5]},
            115.99,
        ),
        (
            track("Product Removed", product_id="p1", quantity=2),
            {"p1": [1, 30], "SKU-2": [1, 19.99], "42": [4, 1.5]},
            55.99,
        ),
        (track("Product Removed", product_id="p1"), {"SKU-2": [1, 19.99], "42": [4, 1.5]}, 25.99),
        (
            track("Product Removed", product_id="never-added"),
            {"SKU-2": [1, 19.99], "42": [4, 1.5]},
            25.99,
        ),
        (track("Product Removed", product_id="42", quantity=10), {"SKU-2": [1, 19.99]}, 19.99),
    ]
    for i, (e, items, value) in enumerate(steps):
        apply_event(ctx, e, 0, i)
        assert ctx["cart"]["items"] == items, i
        assert ctx["cart"]["value"] == pytest.approx(value), i


@pytest.mark.parametrize(
    ("props", "expected_items"),
    [
        ({"price": 10}, {}),  # no product id: the cart cannot track it
        ({"product_id": True, "price": 10}, {}),
        ({"product_id": {"id": 1}, "price": 10}, {}),
        ({"product_id": "p", "price": 10, "quantity": 0}, {"p": [1.0, 10.0]}),
        ({"product_id": "p", "price": 10, "quantity": "two"}, {"p": [1.0, 10.0]}),
        ({"product_id": "p", "price": "free"}, {"p": [1.0, 0.0]}),
        ({"product_id": "p"}, {"p": [1.0, 0.0]}),
    ],
)
def test_odd_product_added_properties(
    props: dict[str, Any], expected_items: dict[str, Any]
) -> None:
    assert run(track("Product Added", **props))["cart"]["items"] == expected_items


@pytest.mark.parametrize(
    "props",
    [
        {"product_id": "p", "price": 10, "quantity": -3},
        {"product_id": "p", "price": -10, "quantity": 2},
        {"product_id": "p", "price": float("-1e9")},
    ],
)
def test_a_cart_value_is_never_negative(props: dict[str, Any]) -> None:
    ctx = run(track("Product Added", product_id="q", price=5), track("Product Added", **props))
    assert ctx["cart"]["value"] >= 5.0
    assert all(q > 0 and p >= 0 for q, p in ctx["cart"]["items"].values())


def test_a_removal_with_a_negative_quantity_does_not_add_items() -> None:
    ctx = run(
        track("Product Added", product_id="p", price=10, quantity=2),
        track("Product Removed", product_id="p", quantity=-5),
    )
    assert ctx["cart"]["items"] == {"p": [1.0, 10.0]}


def test_order_completed_clears_the_cart_and_adds_revenue() -> None:
    ctx = run(
        track("Product Added", product_id="p1", price=80, quantity=1),
        track("Product Added", product_id="p2", price=45.5, quantity=2),
        track("Order Completed", order_id="o1", total=171.0, revenue=150.0),
        track("Product Added", product_id="p3", price=20, ts=T0 + DAY),
        track("Order Completed", order_id="o2", revenue=20.25, ts=T0 + DAY),
        track("Order Completed", order_id="o3", total="9.5", ts=T0 + DAY),
        track("Order Completed", order_id="o4", ts=T0 + DAY),
    )
    assert ctx["orders"] == 4
    assert ctx["revenue"] == pytest.approx(171.0 + 20.25 + 9.5)
    assert ctx["cart"]["items"] == {}
    assert ctx["cart"]["value"] == 0.0
    assert ctx["cart"]["updated_ms"] == T0 + DAY


def test_cart_items_are_bounded_but_existing_items_still_update() -> None:
    ctx = run(
        *(track("Product Added", product_id=f"p{i}", price=1) for i in range(MAX_CART_ITEMS + 20))
    )
    assert len(ctx["cart"]["items"]) == MAX_CART_ITEMS
    assert ctx["cart"]["value"] == MAX_CART_ITEMS
    run(track("Product Added", product_id="p0", price=1, quantity=4), ctx=ctx)
    assert ctx["cart"]["items"]["p0"] == [5.0, 1.0]
    assert ctx["cart"]["value"] == MAX_CART_ITEMS + 4


def test_affinity_weights_by_interaction_and_lower_cased_category() -> None:
    ctx = run(
        track("Product List Viewed", category="Shoes"),
        track("Product Viewed", product_id="p1", category="shoes"),
        track("Product Added", product_id="p1", category="SHOES", price=50),
        page("/electronics", category="Electronics"),
        track(
            "Order Completed",
            total=10,
            products=[
                {"product_id": "p1", "category": "Shoes"},
                {"product_id": "p9", "category": "Books"},
            ],
        ),
    )
    assert ctx["affinity"] == pytest.approx(
        {"shoes": 0.5 + 1 + 3 + 5, "electronics": 0.5, "books": 5}
    )


def test_an_interest_a_week_old_counts_half() -> None:
    ctx = run(
        track("Product Viewed", category="shoes", ts=T0),
        track("Product Added", product_id="p", category="shoes", price=10, ts=T0),
        track("Product Viewed", category="electronics", ts=T0 + WEEK),
    )
    assert ctx["affinity"] == pytest.approx({"shoes": 2.0, "electronics": 1.0})
    run(track("Product Viewed", category="books", ts=T0 + 3 * WEEK), ctx=ctx)
    assert ctx["affinity"]["shoes"] == pytest.approx(0.5)
    assert ctx["affinity"]["electronics"] == pytest.approx(0.25)
    assert AFFINITY_HALF_LIFE_MS == WEEK


@pytest.mark.parametrize(
    "later",
    [
        lambda ts: page("/home", ts=ts),
        lambda ts: track("Checkout Started", ts=ts),
        lambda ts: event("identify", ts=ts, traits={"plan": "gold"}),
    ],
)
def test_interest_decays_even_when_the_latest_event_has_no_category(later: Any) -> None:
    # Conditions such as "affinity.shoes >= 2" read the value as of the latest
    # event: month-old browsing must not look fresh.
    ctx = run(track("Product Added", product_id="p", category="shoes", price=10, ts=T0))
    run(later(T0 + 2 * WEEK), ctx=ctx)
    assert ctx["affinity"]["shoes"] == pytest.approx(3.0 / 4)


def test_a_late_event_does_not_undo_decay() -> None:
    ctx = run(
        track("Product Viewed", category="shoes", ts=T0),
        track("Product Viewed", category="books", ts=T0 + WEEK),
        track("Product Viewed", category="shoes", ts=T0 + DAY),  # arrives late
    )
    assert ctx["affinity"]["shoes"] == pytest.approx(1.5)
    assert ctx["aff_ms"] == T0 + WEEK


def test_removing_a_product_lowers_interest_but_never_below_zero() -> None:
    ctx = run(
        track("Product Viewed", product_id="p", category="shoes"),
        track("Product Removed", product_id="p", category="shoes"),
        track("Product Removed", product_id="p", category="shoes"),
    )
    assert ctx["affinity"]["shoes"] == 0.0


def test_categories_are_bounded_and_the_strongest_interests_stay() -> None:
    events = [track("Order Completed", total=1, category="shoes")]
    events += [track("Product Viewed", category=f"cat-{i}") for i in range(MAX_CATEGORIES + 10)]
    ctx = run(*events)
    assert len(ctx["affinity"]) == MAX_CATEGORIES
    assert ctx["affinity"]["shoes"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (["Support Ticket Opened"], 1),
        (["Support Ticket Opened", "Support Ticket Opened"], 2),
        (["Support Ticket Opened", "Support Ticket Resolved"], 0),
        (["Support Ticket Resolved"], 0),
        (["Support Ticket Resolved"] * 3 + ["Support Ticket Opened"], 1),
        (["Support Ticket Opened", "Support Ticket Resolved", "Support Ticket Resolved"], 0),
    ],
)
def test_open_issues_are_never_negative(events: list[str], expected: int) -> None:
    assert run(*(track(name) for name in events))["issues"] == expected


PII_TRAITS = {
    "email": "jane.doe@example.com",
    "name": "Jane Doe",
    "firstName": "Jane",
    "lastName": "Doe",
    "phone": "+44 20 7946 0958",
    "address": {"street": "1 Main St", "city": "London"},
    "birthday": "1990-01-01",
}


def test_identify_keeps_only_non_identifying_traits() -> None:
    ctx = run(event("identify", traits={**PII_TRAITS, "plan": "gold", "tier": 2, "segment": "vip"}))
    assert ctx["traits"] == {"plan": "gold", "tier": 2, "segment": "vip"}
    blob = orjson.dumps(ctx)
    for value in (b"jane", b"Jane", b"Doe", b"@example.com", b"7946", b"Main St"):
        assert value not in blob


def test_an_allowlisted_trait_holding_an_email_or_a_phone_number_is_not_kept() -> None:
    """A source may put anything under an allowed name: the value decides too."""
    ctx = run(
        event("identify", traits={"plan": "gold", "tier": "2024-06-01"}),
        event("identify", traits={"plan": "jane.doe@example.com", "segment": "+1-202-555-0143"}),
    )
    assert ctx["traits"] == {"tier": "2024-06-01"}  # and plan's earlier value is gone
    blob = orjson.dumps(ctx)
    assert b"example.com" not in blob and b"555" not in blob


def test_identify_traits_from_context_traits_and_updates() -> None:
    ctx = run(
        event("identify", context={"traits": {"plan": "free", "email": "a@b.c"}}),
        event("identify", traits={"plan": "pro", "tier": True, "segment": ["x"]}),
    )
    assert ctx["traits"] == {"plan": "pro"}  # booleans and lists are not kept


def test_duplicates_by_message_id_and_by_redelivered_offset() -> None:
    ctx = new_context("u-1")
    first = track("Product Viewed", message_id="m-1")
    assert is_duplicate(ctx, first, 3, 100) is False
    apply_event(ctx, first, 3, 100)
    assert ctx["src"] == [3, 100]
    cases = [
        (track("Product Viewed", message_id="m-1"), 3, 101, True),  # producer retry
        (track("Product Viewed", message_id="m-1"), 7, 5, True),
        (track("Product Viewed", message_id="m-2"), 3, 100, True),  # same record again
        (track("Product Viewed", message_id="m-3"), 3, 42, True),  # older record
        (track("Product Viewed", message_id="m-4"), 3, 101, False),
        (track("Product Viewed", message_id="m-5"), 4, 1, False),  # other partition
    ]
    for e, partition, offset, expected in cases:
        assert is_duplicate(ctx, e, partition, offset) is expected, (
            e.message_id,
            partition,
            offset,
        )


def test_duplicate_detection_survives_serialisation() -> None:
    ctx = run(track("Product Viewed", message_id="m-1"), track("Product Viewed", message_id="m-2"))
    restored = orjson.loads(orjson.dumps(ctx))
    assert is_duplicate(restored, track("Product Viewed", message_id="m-1"), 9, 0)
    assert is_duplicate(restored, track("Product Viewed", message_id="new"), 0, 1)
    assert not is_duplicate(restored, track("Product Viewed", message_id="new"), 0, 2)


def test_event_names_are_bounded_in_number_and_length() -> None:
    events = [track(f"Custom Event {i}", message_id=f"id-{i}") for i in range(MAX_NAMES + 40)]
    events.append(track("Long " + "x" * MAX_NAME_CHARS))
    ctx = run(*events)
    assert len(ctx["events"]) == MAX_NAMES
    run(track("Custom Event 0"), ctx=ctx)
    assert ctx["events"]["Custom Event 0"] == 2  # names already known keep counting
    assert f"Custom Event {MAX_NAMES + 1}" not in ctx["events"]
    ctx = run(track("Long " + "x" * MAX_NAME_CHARS), track("y" * MAX_NAME_CHARS))
    assert ctx["events"] == {"y" * MAX_NAME_CHARS: 1}


def test_the_context_stays_small_after_10000_events() -> None:
    rng = random.Random(7)
    categories = [f"category-{i}" for i in range(40)]
    names = [f"Custom Action {i}" for i in range(120)]
    ctx = new_context("u-1")
    ts = T0
    for offset in range(10_000):
        ts += rng.randint(1, 5) * MINUTE
        message_id = f"{rng.getrandbits(128):032x}-{offset}"  # uuid-sized
        pid = f"sku-{rng.randrange(2000):05d}"
        cat = rng.choice(categories)
        roll = rng.random()
        if roll < 0.3:
            e = event(
                "page",
                "Product",
                ts=ts,
                message_id=message_id,
                context={"page": {"path": f"/{cat}/{pid}"}},
                props={"category": cat},
            )
        elif roll < 0.55:
            e = event(
                props={"product_id": pid, "category": cat, "price": 19.99},
                name="Product Viewed",
                ts=ts,
                message_id=message_id,
            )
        elif roll < 0.75:
            e = event(
                props={"product_id": pid, "category": cat, "price": 19.99, "quantity": 2},
                name="Product Added",
                ts=ts,
                message_id=message_id,
            )
        elif roll < 0.78:
            e = event(props={"total": 99.5}, name="Order Completed", ts=ts, message_id=message_id)
        elif roll < 0.8:
            e = event(
                "identify", ts=ts, message_id=message_id, traits={**PII_TRAITS, "plan": "gold"}
            )
        else:
            e = event(name=rng.choice(names), ts=ts, message_id=message_id)
        apply_event(ctx, e, 0, offset)
    size = len(orjson.dumps(ctx))
    assert ctx["n"] == 10_000
    # A day of events (one every 3 minutes on average) is remembered for dedupe.
    assert size < 12 * 1024, size
    assert 480 <= len(ctx["ids"]) // ID_TOKEN_CHARS <= MAX_IDS
    assert len(ctx["events"]) <= MAX_NAMES
    assert len(ctx["pages"]) == MAX_PAGES
    assert len(ctx["affinity"]) <= MAX_CATEGORIES
    assert len(ctx["cart"]["items"]) <= MAX_CART_ITEMS


def test_identifying_traits_are_never_on_the_kept_list() -> None:
    assert not {"email", "name", "firstName", "lastName", "phone", "address"} & set(
        model.KEPT_TRAITS
    )


# --------------------------------------------------------------------------
# Duplicate suppression over a window of event time
# --------------------------------------------------------------------------

HOUR = 3_600_000


def refused(ctx: dict[str, Any], e: Event, reason: str) -> bool:
    """Whether apply_event refuses the event with this reason, changing nothing."""
    before = orjson.dumps(ctx)
    try:
        apply_event(ctx, e, 9, 10**9)
    except InvalidEvent as exc:
        assert orjson.dumps(ctx) == before
        return exc.reason == reason
    return False


def never_applied_twice(ctx: dict[str, Any], e: Event) -> bool:
    """A resent event (same messageId, a new record) is dropped or refused."""
    return is_duplicate(ctx, e, 9, 10**9) or refused(ctx, e, "too_old")


def test_a_message_id_is_remembered_for_the_window_of_the_customers_event_time() -> None:
    ctx = new_context("u-1")
    sent = [track("Product Viewed", ts=T0 + i * 10 * MINUTE) for i in range(3 * 144)]
    for offset, e in enumerate(sent):
        apply_event(ctx, e, 0, offset)
        clock = e.timestamp_ms
        if offset % 24 == 0:
            for old in sent[: offset + 1]:
                if clock - old.timestamp_ms <= DEFAULT_WINDOW:
                    assert is_duplicate(ctx, old, 9, 10**9), (offset, old.timestamp_ms)
                else:
                    assert never_applied_twice(ctx, old)
    # Three days of ids are not all kept: memory is about one window's worth.
    assert len(ctx["ids"]) // ID_TOKEN_CHARS <= 144 + 6 + 1
    assert ctx["ids_ms"] is not None
    assert ctx["ids_ms"] <= sent[-1].timestamp_ms - DEDUPE_WINDOW_MS
    # An event older than what is remembered cannot be checked: refused.
    assert refused(ctx, track("Product Viewed", ts=T0), "too_old")


DEFAULT_WINDOW = DEDUPE_WINDOW_MS


def test_the_window_runs_on_event_time_and_is_a_parameter() -> None:
    ctx = run(track("Product Viewed", ts=T0, message_id="m-old"))
    # Days pass on the wall clock but not for this customer: still remembered.
    assert is_duplicate(ctx, track("Product Viewed", ts=T0, message_id="m-old"), 9, 1)
    apply_event(ctx, track("Product Viewed", ts=T0 + 3 * HOUR), 0, 1, window_ms=HOUR)
    # With a one-hour window, three hours of the customer's time forget it.
    assert ctx["ids_ms"] == T0 - T0 % ID_BUCKET_MS + ID_BUCKET_MS
    assert refused(ctx, track("Product Viewed", ts=T0, message_id="m-old"), "too_old")
    late = track("Product Viewed", ts=T0 + 3 * HOUR - 1, message_id="m-late")
    apply_event(ctx, late, 0, 2, window_ms=HOUR)  # late, but after what was forgotten
    assert is_duplicate(ctx, late, 9, 1)


def test_late_events_are_remembered_with_their_own_hour() -> None:
    times = [T0 + 5 * HOUR, T0, T0 + 2 * HOUR, T0 + 2 * HOUR + 1, T0 + HOUR, T0 + 5 * HOUR + 2]
    events = [track("Product Viewed", ts=ts) for ts in times]
    ctx = run(*events)
    assert all(is_duplicate(ctx, e, 9, 1) for e in events)
    assert not is_duplicate(ctx, track("Product Viewed", ts=T0), 9, 1)
    hours = ctx["id_hours"][::2]
    assert hours == sorted(set(t // ID_BUCKET_MS for t in times))
    assert ctx["id_hours"][1::2] == [1, 1, 2, 2]  # ids per hour
    assert sum(ctx["id_hours"][1::2]) * ID_TOKEN_CHARS == len(ctx["ids"])
    assert ctx["ids_ms"] is None  # nothing forgotten


def test_a_customer_with_more_events_than_the_memory_is_never_applied_twice() -> None:
    # A bot: 3 events a second for 20 minutes, more ids than MAX_IDS.
    ctx = new_context("u-1")
    sent = [track("Product Viewed", ts=T0 + i * 333) for i in range(3600)]
    for offset, e in enumerate(sent):
        apply_event(ctx, e, 0, offset)
    assert len(ctx["ids"]) <= MAX_IDS * ID_TOKEN_CHARS
    assert all(never_applied_twice(ctx, e) for e in sent[::7])
    apply_event(ctx, track("Product Viewed", ts=T0 + 3600 * 333), 0, 3600)  # in order: applied
    assert ctx["n"] == 3601


def test_message_ids_are_stored_as_stable_digests() -> None:
    ctx = run(
        track("Product Viewed", message_id="m-1"), track("Product Viewed", message_id="x" * 900)
    )
    assert len(ctx["ids"]) == 2 * ID_TOKEN_CHARS
    assert "m-1" not in orjson.dumps(ctx).decode()
    # The same digest in any process (the built-in hash() is salted per process).
    assert model.id_token("m-1") == "bmFQofpis7k+"


# --------------------------------------------------------------------------
# Numbers stay finite; stored contexts always load
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "props", "field"),
    [
        ("Order Completed", {"total": 1.7e308}, "properties.total"),
        ("Order Completed", {"revenue": -1e13}, "properties.revenue"),
        ("Product Added", {"product_id": "p", "price": 1e300}, "properties.price"),
        (
            "Product Added",
            {"product_id": "p", "price": 5, "quantity": 1e200},
            "properties.quantity",
        ),
        ("Product Removed", {"product_id": "p", "quantity": "1e40"}, "properties.quantity"),
    ],
)
def test_amounts_beyond_the_limit_are_refused_before_anything_changes(
    name: str, props: dict[str, Any], field: str
) -> None:
    ctx = run(track("Product Added", product_id="p", price=5), track("Order Completed", total=5))
    assert refused(ctx, track(name, **props), "out_of_range")
    with pytest.raises(InvalidEvent) as info:
        apply_event(ctx, track(name, **props), 0, 99)
    assert info.value.field == field
    assert "1e+12" in str(info.value)


def test_two_huge_orders_leave_revenue_finite() -> None:
    ctx = run(
        track("Order Completed", total=MAX_AMOUNT), track("Order Completed", total=MAX_AMOUNT)
    )
    with pytest.raises(InvalidEvent):
        apply_event(ctx, track("Order Completed", total=1.7e308), 0, 99)
    assert ctx["revenue"] == 2 * MAX_AMOUNT
    assert orjson.loads(orjson.dumps(ctx))["revenue"] == 2 * MAX_AMOUNT


def version_1_context() -> dict[str, Any]:
    """A context as versions before 2 stored it, after an infinite revenue."""
    return {
        "id": "u-1",
        "first_ms": T0,
        "last_ms": T0 + HOUR,
        "n": 3,
        "types": {"track": 3},
        "events": {"Order Completed": 2, "Product Added": 1},
        "channels": {"web": {"n": 3, "last_ms": T0 + HOUR}},
        "pages": [],
        "cart": {"items": {"p": [1.0, None]}, "value": None, "updated_ms": T0 + HOUR},
        "affinity": {"shoes": None, "books": 2.5},
        "aff_ms": T0,
        "orders": 2,
        "revenue": None,
        "issues": 0,
        "traits": {"plan": "gold"},
        "fired": {"cart-builder": T0},
        "ids": ["m-a", "m-b", "m-c"],
        "src": [0, 2],
    }


def test_a_context_stored_with_nulls_for_numbers_loads_repaired() -> None:
    ctx, repaired = load_context(orjson.dumps(version_1_context()), "u-1")
    assert repaired
    assert ctx["v"] == VERSION
    assert (ctx["revenue"], ctx["orders"], ctx["n"]) == (0.0, 2, 3)
    assert ctx["cart"] == {"items": {}, "value": 0.0, "updated_ms": T0 + HOUR}
    assert ctx["affinity"] == {"books": 2.5}
    assert (ctx["fired"], ctx["traits"], ctx["src"]) == (
        {"cart-builder": T0},
        {"plan": "gold"},
        [0, 2],
    )
    # The message ids of version 1 are still recognised.
    assert is_duplicate(ctx, track("Order Completed", message_id="m-b"), 9, 9)
    run(track("Order Completed", ts=T0 + 2 * HOUR, total=20), ctx=ctx)
    assert (ctx["revenue"], ctx["orders"]) == (20.0, 3)
    assert load_context(orjson.dumps(ctx), "u-1") == (ctx, False)


@pytest.mark.parametrize(
    "stored",
    [b"", b"{oops", b"[]", b"null", b'{"n": "many", "cart": [], "pages": {}, "ids": 7}'],
)
def test_a_damaged_stored_context_loads_as_a_valid_one(stored: bytes) -> None:
    ctx, repaired = load_context(stored, "u-1")
    assert repaired and ctx == new_context("u-1")
    run(track("Order Completed", total=5), ctx=ctx)
    assert ctx["revenue"] == 5.0


def test_a_stored_context_over_the_budgets_is_cut_to_them() -> None:
    big = version_1_context()
    big.update(
        events={f"e{i}" * 40: 1 for i in range(500)},
        pages=["/" + "p" * 5000] * 100,
        cart={"items": {f"p{i}" * 100: [1, 2] for i in range(500)}, "value": 1000},
        affinity={f"c{i}" * 100: float(i) for i in range(500)},
        traits={"plan": "g" * 10_000},
        ids=[f"m{i}" for i in range(5000)],
    )
    ctx, _ = load_context(orjson.dumps(big), "u-1")
    assert len(ctx["events"]) <= MAX_NAMES
    assert all(len(k) <= MAX_NAME_CHARS for k in ctx["events"])
    assert len(ctx["pages"]) == MAX_PAGES and len(ctx["pages"][0]) == MAX_PAGE_CHARS
    assert len(ctx["cart"]["items"]) == MAX_CART_ITEMS
    assert all(len(k) <= MAX_PRODUCT_ID_CHARS for k in ctx["cart"]["items"])
    assert ctx["cart"]["value"] == 2 * MAX_CART_ITEMS
    assert len(ctx["affinity"]) == MAX_CATEGORIES and "c499" * 16 in ctx["affinity"]
    assert len(ctx["traits"]["plan"]) == MAX_TRAIT_CHARS
    # 5000 ids of one hour are more than the budget: forgotten, so the events
    # up to the latest can no longer be checked and would be refused.
    assert len(ctx["ids"]) <= MAX_IDS * ID_TOKEN_CHARS
    assert ctx["ids_ms"] == ctx["last_ms"] + 1
    assert len(orjson.dumps(ctx)) < 32 * 1024


# --------------------------------------------------------------------------
# Every string in a context has a budget
# --------------------------------------------------------------------------


def test_long_names_ids_and_categories_do_not_grow_the_context() -> None:
    # The shape of a hostile producer: valid events, each under 32 KiB, with
    # long names, product ids, categories, pages and traits.
    ctx = new_context("u-1")
    for i in range(120):
        long = f"{i:03d}" + "x" * 9000
        for offset, e in enumerate(
            [
                track(long, ts=T0 + i),
                track("Product Added", ts=T0 + i, product_id=long, category=long, price=1),
                page("/" + long, ts=T0 + i, name=long, category="c" + long),
                event("identify", ts=T0 + i, traits={"plan": long, "segment": long}),
            ]
        ):
            apply_event(ctx, e, 0, 4 * i + offset)
    size = len(orjson.dumps(ctx))
    assert size < 24 * 1024, size
    assert all(len(k) <= MAX_NAME_CHARS for k in ctx["events"])
    assert all(len(p) <= MAX_PAGE_CHARS for p in ctx["pages"])
    assert all(len(k) <= MAX_PRODUCT_ID_CHARS for k in ctx["cart"]["items"])
    assert all(len(k) <= MAX_CATEGORY_CHARS for k in ctx["affinity"])
    assert all(len(v) <= MAX_TRAIT_CHARS for v in ctx["traits"].values())
