"""A decision answered by a worker that could not store it is handed over on
rtim.responses (its decision record, with the ``rtim.handover`` header), and the worker
that owns its customer adopts it: its actions open, counted as contacts, remembered and
recorded, once, so that caps hold and it is learned as if that worker had made it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

import rtim.engine
from rtim.engine import BatchResult, Engine
from rtim.learn.attribution import action_id
from rtim.names import HANDOVER_HEADER

from .test_engine import HOUR, T0, Log, Record, Store, respond, run, track
from .test_policy_engine import _failing
from .test_request_actions import ask, catalog, engine, response, stored

CAPS = [
    {"id": "loyalty-weekly", "max": 1, "per": "7d", "group": "loyalty"},
    {"id": "web-daily", "max": 3, "per": "1d", "channel": "web"},
]
DECIDED_BY = ("rtim.worker", b"http://w1:6066")


def handed_over(result: BatchResult, offset: int = 500, **changes: Any) -> Record:
    """The handover of the batch's first decision, as the worker that made it sends it."""
    (made,) = result.decisions
    value = made.value
    if changes:
        value = orjson.dumps({**orjson.loads(value), **changes})
    return Record(0, offset, made.key, value, [DECIDED_BY, (HANDOVER_HEADER, b"1")])


def answered_elsewhere(limit: int = 3) -> tuple[Any, BatchResult]:
    """A request for u-1 answered (and not stored) by another worker."""
    elsewhere = Store()
    return ask(engine(elsewhere, catalog(caps=CAPS)), elsewhere, limit=limit, request_id="r-1")


def owner_with_history() -> tuple[Engine, Store]:
    store, log = Store(), Log()
    eng = engine(store, catalog(caps=CAPS))
    run(eng, log.records(track("Signed In", ts=T0 - HOUR)), store)
    return eng, store


def test_the_owner_adopts_every_action_once_and_the_caps_count_them() -> None:
    answer, result = answered_elsewhere()
    shown = [(a.offer.id, a.channel) for a in answer.actions]
    assert shown == [("gold", "web"), ("tips", "web"), ("bronze", "web")]
    eng, store = owner_with_history()
    did = answer.decision_id

    adopted = respond(eng, [handed_over(result)], store)
    assert adopted.adopted == {"adopted": 1}
    ctx = stored(store)
    assert [(p[0], p[1], p[4]) for p in ctx["pending"]] == [
        (did, "gold", T0 + HOUR),
        (action_id(did, "tips"), "tips", T0 + HOUR),
        (action_id(did, "bronze"), "bronze", T0 + 3 * HOUR),  # (its own window)
    ]
    made = orjson.loads(result.decisions[0].value)
    features = {c["offer_id"]: made["features"] + c["features"] for c in made["candidates"]}
    assert [p[2] for p in ctx["pending"]] == [features[o] for o, _ in shown]
    assert [(c[0], c[1], c[2]) for c in ctx["contacts"]] == [(T0, ch, o) for o, ch in shown]
    assert [d["id"] for d in ctx["recent"]] == [did]
    # Recorded on rtim.decisions by the owner, as the worker that decided it named it.
    (record,) = adopted.decisions
    assert record.value == result.decisions[0].value
    assert record.headers == [DECIDED_BY]

    # Handed over again: nothing changes, nothing is recorded twice.
    again = respond(eng, [handed_over(result, offset=501)], store)
    assert again.adopted == {"duplicate": 1}
    assert again.decisions == [] and stored(store) == ctx

    # The client, which had no answer, asks again: the owner answers what was decided.
    retried, retry = ask(eng, store, limit=3, request_id="r-1")
    assert retried.repeated and retried.decision_id == did
    assert [(a.offer.id, a.channel, a.score, a.propensity) for a in retried.actions] == [
        (a.offer.id, a.channel, a.score, a.propensity) for a in answer.actions
    ]
    # With the same reasons: each action's rules, draw and levers (the policy's, here).
    assert [a.reasons for a in retried.actions] == [a.reasons for a in answer.actions]
    assert "lever:gold:group-priority=1" in retried.actions[0].reasons
    assert retry.decisions == [] and stored(store) == ctx

    # And a response to an adopted action is joined and learned.
    joined = respond(eng, [response(did, "conversion", T0 + 60_000, offer="tips")], store)
    assert [(e.decision_id, e.offer_id, e.converted) for e in joined.examples] == [
        (action_id(did, "tips"), "tips", True)
    ]
    # The caps count the adopted contacts: the day's next request gets what remains.
    later, _ = ask(eng, store, limit=4, at=T0 + HOUR)
    assert [(a.offer.id, a.channel) for a in later.actions] == [("tips", "email")]
    assert "skipped:tips:capped:web-daily" in later.reasons


def test_a_decision_the_context_already_holds_is_not_adopted() -> None:
    """Its batch reached the changelog after all (published before its worker learned it
    had lost the partition): the owner recovered it with the context."""
    store = Store()
    eng = engine(store, catalog(caps=CAPS))
    answer, result = ask(eng, store, limit=2)  # decided and stored here
    before = stored(store)
    again = respond(eng, [handed_over(result)], store)
    assert again.adopted == {"duplicate": 1}
    assert again.decisions == [] and stored(store) == before
    # Closed since (a conversion came): still known, still not adopted.
    respond(eng, [response(answer.decision_id, "conversion", T0 + 1000)], store)
    assert respond(eng, [handed_over(result, offset=502)], store).adopted == {"duplicate": 1}


def test_a_new_visitor_gets_a_context_only_if_the_decision_offered_something() -> None:
    _, result = answered_elsewhere(limit=1)
    store = Store()
    eng = engine(store, catalog(caps=CAPS))
    adopted = respond(eng, [handed_over(result)], store)
    assert adopted.adopted == {"adopted": 1} and adopted.new_customers == 1
    assert [p[1] for p in stored(store)["pending"]] == ["gold"]

    nothing = Store()
    offered_nothing = handed_over(result, offer_id=None, window_end_ms=None)
    adopted = respond(engine(nothing, catalog(caps=CAPS)), [offered_nothing], nothing)
    assert adopted.adopted == {"adopted": 1} and len(adopted.decisions) == 1
    assert not adopted.decisions[0].offered
    assert nothing.data == {}  # a new visitor offered nothing has no context


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"[]", "not_an_object"),
        ({"decision_id": None}, "missing_field"),
        ({"decided_ms": "yesterday"}, "wrong_type"),
        ({"actions": [{"offer_id": "gold"}, {"offer_id": "platinum", "window_end_ms": 1}]}, None),
        ({"candidates": "all"}, "wrong_type"),
        (b"x" * 70_000, "oversize"),
    ],
)
def test_a_record_that_is_not_a_decision_is_dead_lettered(value: Any, reason: str | None) -> None:
    """rtim.responses is written by channel systems too: a record with the header that is
    not a decision record changes nothing and goes to the dead letters with its reason."""
    _, result = answered_elsewhere()
    eng, store = owner_with_history()
    before = dict(store.data)
    if isinstance(value, dict):
        record = handed_over(result, **value)
        # (An action that is not among the candidates: which features would it learn?)
        reason = reason or "missing_field"
    else:
        record = handed_over(result)._replace(value=value)
    out = respond(eng, [record], store)
    assert [d.reason for d in out.dead_letters] == [reason]
    assert out.adopted == {} and out.decisions == []
    assert store.data == before


def test_a_decision_handed_over_to_the_wrong_partition_is_dead_lettered() -> None:
    _, result = answered_elsewhere()
    store = Store()
    eng = Engine(
        catalog=catalog(caps=CAPS), load=store.load, partition_of=lambda key: 3, window_ms=HOUR
    )
    out = respond(eng, [handed_over(result)], store)
    assert [d.reason for d in out.dead_letters] == ["wrong_type"]
    assert store.data == {}


def test_an_adopted_decision_is_kept_when_its_batch_is_replayed_after_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A later event of the customer fails in the same batch: the context is rebuilt
    from the batch's entries, the adopted decision with them."""
    answer, result = answered_elsewhere()
    store, log = Store(), Log()
    eng = engine(store, catalog(caps=CAPS))
    run(eng, log.records(track("Signed In", ts=T0 - HOUR)), store)
    monkeypatch.setattr(rtim.engine, "apply_event", _failing(rtim.engine.apply_event))
    batch = eng.start_batch("rtim.clickstream")
    batch.add_responses([handed_over(result)])
    batch.add(log.records(track("Product Viewed", ts=T0 + 1000, product_id="p")))
    out = batch.finish()
    store.persist(out)
    assert [d.reason for d in out.dead_letters] == ["internal_error"]
    ctx = stored(store)
    assert [p[1] for p in ctx["pending"]] == [a.offer.id for a in answer.actions]
    assert [c[2] for c in ctx["contacts"]] == [a.offer.id for a in answer.actions]
    assert [d["id"] for d in ctx["recent"]] == [answer.decision_id]
