"""A decision request answered with several actions: each shown action is a contact, is
kept open on its own, and is learned from the responses that name it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest

import rtim.engine
from rtim.decide.request import parse_request
from rtim.engine import Engine
from rtim.learn.attribution import action_id
from rtim.offers.catalog import Catalog, parse_catalog

from .test_decide import FixedModel
from .test_decide_request import schema_errors
from .test_engine import HOUR, NOW, T0, Log, Record, Store, iso, respond, run, track
from .test_policy_engine import _failing

PROPENSITIES = {"gold": 0.5, "silver": 0.5, "tips": 0.5, "bronze": 0.5}


def catalog(**policy: Any) -> Catalog:
    return parse_catalog(
        {
            "offers": [
                {"id": "gold", "channels": ["web"], "value": 40, "group": "loyalty"},
                {"id": "silver", "channels": ["web"], "value": 30, "group": "loyalty"},
                {"id": "tips", "channels": ["web", "email"], "value": 20, "kind": "information"},
                {"id": "bronze", "channels": ["web"], "value": 10, "attribution_window": 3 * 3600},
            ],
            **({"policy": policy} if policy else {}),
        }
    )


def engine(store: Store, cat: Catalog) -> Engine:
    return Engine(
        catalog=cat,
        load=store.load,
        clock=lambda: NOW / 1000,
        partition_of=lambda key: 0,
        models=FixedModel(PROPENSITIES),
        window_ms=HOUR,
    )


def ask(eng: Engine, store: Store, limit: int, at: int = T0, request_id: str | None = None) -> Any:
    stamp = dt.datetime.fromtimestamp(at / 1000, dt.UTC).isoformat().replace("+00:00", "Z")
    body = {"customer_id": "u-1", "channel": "web", "limit": limit, "timestamp": stamp}
    if request_id is not None:
        body["request_id"] = request_id
    answer, result = eng.decide_request(parse_request(orjson.dumps(body), now_ms=NOW))
    store.persist(result)
    return answer, result


def response(decision: str, outcome: str, at: int, offer: str | None = None) -> Record:
    body = {"decision_id": decision, "customer_id": "u-1", "outcome": outcome, "timestamp": iso(at)}
    if offer is not None:
        body["offer_id"] = offer
    return Record(0, 2000 + at % 1000, b"u-1", orjson.dumps(body))


def stored(store: Store) -> dict[str, Any]:
    return orjson.loads(store.data[(0, b"u-1")])


def test_every_action_shown_is_a_contact_kept_open_and_recorded_on_its_own() -> None:
    store = Store()
    answer, result = ask(engine(store, catalog()), store, limit=3)
    assert [a.offer.id for a in answer.actions] == ["gold", "silver", "tips"]
    did = answer.decision_id
    ctx = stored(store)
    assert [(p[0], p[1]) for p in ctx["pending"]] == [
        (did, "gold"),
        (action_id(did, "silver"), "silver"),
        (action_id(did, "tips"), "tips"),
    ]
    assert [c[2] for c in ctx["contacts"]] == ["gold", "silver", "tips"]
    assert not schema_errors("customer-context.schema.json", ctx)
    record = orjson.loads(result.decisions[0].value)
    assert record["offer_id"] == "gold"
    assert record["actions"] == [
        {"offer_id": "gold", "channel": "web", "window_end_ms": T0 + HOUR},
        {"offer_id": "silver", "channel": "web", "window_end_ms": T0 + HOUR},
        {"offer_id": "tips", "channel": "web", "window_end_ms": T0 + HOUR},
    ]
    assert not schema_errors("decision.schema.json", record)
    # One action: the record is as a trigger's (no list of actions).
    _, single = ask(engine(store, catalog()), store, limit=1, at=T0 + 1000)
    assert "actions" not in orjson.loads(single.decisions[0].value)


def test_a_response_naming_an_action_is_learned_for_that_action_only() -> None:
    store = Store()
    eng = engine(store, catalog())
    answer, _ = ask(eng, store, limit=4)
    did = answer.decision_id
    features = {p[1]: p[2] for p in stored(store)["pending"]}
    joined = respond(
        eng,
        [
            response(did, "conversion", T0 + 60_000, offer="tips"),
            response(did, "conversion", T0 + 61_000, offer="tips"),  # sent twice
            response(did, "click", T0 + 62_000),  # no offer named: the first action
            response(did, "click", T0 + 63_000, offer="nowhere"),
        ],
        store,
    )
    assert joined.responses == {
        ("conversion", "joined"): 1,
        ("conversion", "duplicate"): 1,
        ("click", "joined"): 1,
        ("click", "unknown"): 1,
    }
    (positive,) = joined.examples
    assert (positive.offer_id, positive.converted, positive.decision_id) == (
        "tips",
        True,
        action_id(did, "tips"),
    )
    assert positive.features == features["tips"]
    ctx = stored(store)
    assert [p[1] for p in ctx["pending"]] == ["gold", "silver", "bronze"]
    assert ctx["pending"][0][5] == ["click"]
    # The stream passes the hour's window: gold and silver end as negatives, bronze (its
    # own window of 3 h) stays open.
    later = run(eng, Log().records(track("Signed In", ts=T0 + HOUR + 1)), store)
    assert sorted((e.offer_id, e.converted, e.why) for e in later.examples) == [
        ("gold", False, "window"),
        ("silver", False, "window"),
    ]
    assert [p[1] for p in stored(store)["pending"]] == ["bronze"]


def test_a_dismissal_naming_an_action_cools_that_offer_down() -> None:
    store = Store()
    eng = engine(store, catalog(dismissal_cooldown="1d"))
    answer, _ = ask(eng, store, limit=2)
    respond(eng, [response(answer.decision_id, "dismissal", T0 + 60_000, offer="silver")], store)
    assert stored(store)["dismissed"] == {"silver": T0 + 60_000}
    again, _ = ask(eng, store, limit=2, at=T0 + 2 * 60_000)
    assert [a.offer.id for a in again.actions] == ["gold", "tips"]
    assert "rejected:silver:cooldown" in again.reasons


def test_actions_shown_together_stay_within_the_caps() -> None:
    caps = [
        {"id": "loyalty-weekly", "max": 1, "per": "7d", "group": "loyalty"},
        {"id": "web-daily", "max": 3, "per": "1d", "channel": "web"},
    ]
    store = Store()
    eng = engine(store, catalog(caps=caps))
    answer, result = ask(eng, store, limit=4)
    # One offer of the loyalty group: silver is passed over, and bronze shown instead.
    shown = [(a.offer.id, a.channel) for a in answer.actions]
    assert shown == [("gold", "web"), ("tips", "web"), ("bronze", "web")]
    assert "rejected:silver:capped:loyalty-weekly" in answer.reasons
    record = orjson.loads(result.decisions[0].value)
    assert [a["offer_id"] for a in record["actions"]] == ["gold", "tips", "bronze"]
    assert "rejected:silver:capped:loyalty-weekly" in record["reasons"]
    # The next request that day: the web's cap is reached, the loyalty group's too.
    later, _ = ask(eng, store, limit=4, at=T0 + HOUR)
    assert [(a.offer.id, a.channel) for a in later.actions] == [("tips", "email")]
    assert "skipped:tips:capped:web-daily" in later.reasons


def test_a_passed_over_action_moves_to_another_channel_within_the_caps() -> None:
    caps = [{"id": "web-daily", "max": 2, "per": "1d", "channel": "web"}]
    store = Store()
    answer, _ = ask(engine(store, catalog(caps=caps)), store, limit=3)
    shown = [(a.offer.id, a.channel) for a in answer.actions]
    assert shown == [("gold", "web"), ("silver", "web"), ("tips", "email")]
    assert "skipped:tips:capped:web-daily" in answer.reasons
    assert "rejected:bronze:capped:web-daily" not in answer.reasons  # not needed: three shown


@pytest.mark.parametrize("limit", [2, 3])
def test_every_actions_contact_is_kept_when_its_batch_is_replayed_after_a_failure(
    monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    store, log = Store(), Log()
    eng = engine(store, catalog())
    run(eng, log.records(track("Signed In", ts=T0 - HOUR)), store)
    monkeypatch.setattr(rtim.engine, "apply_event", _failing(rtim.engine.apply_event))
    stamp = dt.datetime.fromtimestamp(T0 / 1000, dt.UTC).isoformat().replace("+00:00", "Z")
    body = {"customer_id": "u-1", "channel": "web", "limit": limit, "timestamp": stamp}
    batch = eng.start_batch("rtim.clickstream")
    answer = batch.decide(parse_request(orjson.dumps(body), now_ms=NOW))
    batch.add(log.records(track("Product Viewed", ts=T0 + 1000, product_id="p")))
    result = batch.finish()
    store.persist(result)
    assert [d.reason for d in result.dead_letters] == ["internal_error"]
    ctx = stored(store)
    shown = [a.offer.id for a in answer.actions]
    assert len(shown) == limit
    assert [c[2] for c in ctx["contacts"]] == shown
    assert [p[1] for p in ctx["pending"]] == shown


def test_a_customer_with_an_open_issue_is_answered_when_the_raised_offer_is_elsewhere() -> None:
    """The default suppression raises service recovery; a request on a channel (or a
    placement) without it is still answered: sales suppressed, the raised offer named."""
    cat = parse_catalog(
        {
            "offers": [
                {"id": "gold", "channels": ["web"], "value": 40},
                {"id": "tips", "channels": ["web"], "value": 20, "kind": "information"},
                {"id": "service-recovery", "channels": ["call_centre", "email"], "kind": "service"},
            ],
            "placements": [{"id": "home", "channels": ["web"], "offers": ["gold", "tips"]}],
            "policy": {},
        }
    )
    store = Store()
    eng = engine(store, cat)
    run(eng, Log().records(track("Support Ticket Opened", user="u-1", ts=T0 - 60_000)), store)
    assert stored(store)["issues"] == 1
    for placement in (None, "home"):
        stamp = iso(T0 + 1000)
        body = {"customer_id": "u-1", "channel": "web", "limit": 3, "timestamp": stamp}
        if placement is not None:
            body["placement"] = placement
        answer, result = eng.decide_request(parse_request(orjson.dumps(body), now_ms=NOW))
        store.persist(result)
        assert [a.offer.id for a in answer.actions] == ["tips"]
        assert "suppressed:gold:open-issue" in answer.reasons
        assert "rejected:service-recovery:not-here" in answer.reasons
