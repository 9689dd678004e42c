"""The contact policy in the engine: contacts and dismissals kept in the durable context."""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest

import rtim.engine
from rtim.engine import Engine
from rtim.offers.catalog import parse_catalog

from .test_engine import HOUR, T0, Log, Store, respond, run, track
from .test_engine import NOW as CLOCK
from .test_engine import responses as response_records

DAY = 24 * HOUR
START = T0 - 3 * DAY

CATALOG = parse_catalog(
    {
        "triggers": [{"id": "browse", "when": {"event": "Product Viewed"}, "cooldown": 0}],
        "offers": [{"id": "picks", "channels": ["web", "email"], "triggers": ["browse"]}],
        "policy": {
            "caps": [{"id": "daily", "max": 1, "per": "1d"}],
            "dismissal_cooldown": "2d",
        },
    }
)


def engine(store: Store) -> Engine:
    return Engine(catalog=CATALOG, load=store.load, clock=lambda: CLOCK / 1000)


def view(ts: int) -> dict[str, Any]:
    return track("Product Viewed", ts=ts, product_id="p")


def decisions(result: Any) -> list[dict[str, Any]]:
    return [orjson.loads(d.value) for d in result.decisions]


def test_a_customers_cap_holds_across_a_restart() -> None:
    store, log = Store(), Log()
    first = run(engine(store), log.records(view(START)), store)
    assert [t.offer_id for t in first.triggers] == ["picks"]
    stored = orjson.loads(store.data[(0, b"u-1")])
    assert stored["contacts"] == [[START, "web", "picks", None]]
    # A new worker reads the context from the store (the changelog after a restart).
    again = run(engine(store), log.records(view(START + HOUR)), store)
    assert again.triggers == []
    (record,) = decisions(again)
    assert "rejected:picks:capped:daily" in record["reasons"]
    assert again.rejected == {"capped": 1}
    day_later = run(engine(store), log.records(view(START + DAY)), store)
    assert [t.offer_id for t in day_later.triggers] == ["picks"]


def test_a_dismissal_cools_the_offer_down_across_a_restart() -> None:
    store, log = Store(), Log()
    first = run(engine(store), log.records(view(START)), store)
    (record,) = decisions(first)
    dismissal = ("u-1", record["decision_id"], "dismissal", START + 5 * 60_000)
    joined = respond(engine(store), response_records(dismissal), store)
    assert joined.responses == {("dismissal", "joined"): 1}
    assert orjson.loads(store.data[(0, b"u-1")])["dismissed"] == {"picks": START + 5 * 60_000}
    cooled = run(engine(store), log.records(view(START + DAY + HOUR)), store)
    assert cooled.triggers == []
    assert "rejected:picks:cooldown" in decisions(cooled)[0]["reasons"]
    after = run(engine(store), log.records(view(START + 2 * DAY + 5 * 60_000)), store)
    assert [t.offer_id for t in after.triggers] == ["picks"]


def test_a_contact_is_kept_once_when_the_batch_is_replayed_after_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_decide = rtim.engine.decide
    calls = []

    def fails_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("bad model")
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(rtim.engine, "decide", fails_second)
    store, log = Store(), Log()
    result = run(engine(store), log.records(view(START), view(START + HOUR)), store)
    assert [d.reason for d in result.dead_letters] == ["internal_error"]
    assert [t.offer_id for t in result.triggers] == ["picks"]
    assert orjson.loads(store.data[(0, b"u-1")])["contacts"] == [[START, "web", "picks", None]]


def test_responses_dismissing_twice_or_unknown_decisions_change_nothing() -> None:
    store, log = Store(), Log()
    (record,) = decisions(run(engine(store), log.records(view(START)), store))
    twice = [("u-1", record["decision_id"], "dismissal", START + 60_000)] * 2
    unknown = [("u-1", "no-such-decision", "dismissal", START + 2 * 60_000)]
    result = respond(engine(store), response_records(*twice, *unknown), store)
    assert result.responses == {
        ("dismissal", "joined"): 1,
        ("dismissal", "duplicate"): 1,
        ("dismissal", "unknown"): 1,
    }
    assert orjson.loads(store.data[(0, b"u-1")])["dismissed"] == {"picks": START + 60_000}


def test_a_dismissal_after_the_decisions_window_closed_still_cools_the_offer_down() -> None:
    store, log = Store(), Log()
    eng = engine(store)  # one worker throughout: it closes the windows it opened
    (first,) = decisions(run(eng, log.records(view(START)), store))
    # A day and an hour on (past the daily cap), the stream time closes the first window.
    second = run(eng, log.records(view(START + DAY + HOUR)), store)
    assert [t.offer_id for t in second.triggers] == ["picks"]
    stored = orjson.loads(store.data[(0, b"u-1")])
    assert [c[0] for c in stored["closed"]] == [first["decision_id"]]
    # The customer says no to the first offer after its window ended: still a no.
    late = ("u-1", first["decision_id"], "dismissal", START + DAY + 2 * HOUR)
    joined = respond(eng, response_records(late), store)
    assert joined.responses == {("dismissal", "late"): 1}
    assert orjson.loads(store.data[(0, b"u-1")])["dismissed"] == {"picks": START + DAY + 2 * HOUR}
    cooled = run(eng, log.records(view(START + 2 * DAY + 3 * HOUR)), store)
    assert cooled.triggers == []
    assert "rejected:picks:cooldown" in decisions(cooled)[0]["reasons"]


@pytest.mark.parametrize("known", [True, False])
def test_a_requests_contact_is_kept_when_its_batch_is_replayed_after_a_failure(
    monkeypatch: pytest.MonkeyPatch, known: bool
) -> None:
    # A decision request, then an event of the same customer that fails in the same
    # batch: the customer's context is rebuilt from the store and the batch's earlier
    # changes, and the request's contact is among them (the cap still counts it).
    from rtim.decide.request import parse_request

    store, log = Store(), Log()
    eng = Engine(catalog=CATALOG, load=store.load, clock=lambda: CLOCK / 1000)
    if known:  # a customer seen before (no decision then)
        run(eng, log.records(track("Signed In", ts=START - HOUR)), store)
    at = dt.datetime.fromtimestamp(START / 1000, dt.UTC).isoformat().replace("+00:00", "Z")
    request = {"customer_id": "u-1", "channel": "email", "timestamp": at}
    monkeypatch.setattr(rtim.engine, "apply_event", _failing(rtim.engine.apply_event))
    batch = eng.start_batch("rtim.clickstream")
    answer = batch.decide(parse_request(orjson.dumps(request), now_ms=START))
    assert [a.offer.id for a in answer.actions] == ["picks"]
    batch.add(log.records(view(START + HOUR)))
    result = batch.finish()
    store.persist(result)
    assert [d.reason for d in result.dead_letters] == ["internal_error"]
    ctx = orjson.loads(store.data[(0, b"u-1")])
    assert ctx["contacts"] == [[START, "email", "picks", None]]
    assert [p[1] for p in ctx["pending"]] == ["picks"]
    assert ctx["n"] == (1 if known else 0)  # the failed event left nothing


def _failing(apply_event: Any) -> Any:
    """apply_event that fails on its first call (a defect in an event's update)."""
    calls = []

    def fails_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("bad update")
        return apply_event(*args, **kwargs)

    return fails_first
