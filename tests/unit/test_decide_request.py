"""Decision requests (``POST /v1/decide``) in the core: checked, decided, recorded."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import math
import threading
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from click.testing import CliRunner

from rtim.cli import main
from rtim.decide.explain import MAX_REASONS, MAX_RECENT, recent_decisions
from rtim.decide.request import MAX_LIMIT, InvalidRequest, parse_query, parse_request
from rtim.engine import Engine
from rtim.offers.catalog import CatalogError, catalog_from_text, parse_catalog
from rtim.offers.live import decode_catalog, encode_catalog

from .test_engine import NOW, T0, Log, Store, page, respond, responses, run, track

CATALOG = parse_catalog(
    {
        "triggers": [
            {"id": "cart-builder", "when": {"event": "Product Added"}, "if": ["cart.value >= 100"]}
        ],
        "offers": [
            {
                "id": "free-shipping",
                "channels": ["web", "app"],
                "value": 6,
                "triggers": ["cart-builder"],
                "eligibility": ["cart.value >= 50"],
                "creative": {"title": "Shipping is on us"},
            },
            {"id": "welcome", "channels": ["web"], "value": 1, "creative": {"title": "Hi"}},
            {
                "id": "checkout-help",
                "channels": ["web"],
                "value": 2,
                "eligibility": ['event.properties.page == "/checkout"'],
            },
            {"id": "app-only", "channels": ["app"], "value": 50},
        ],
        "placements": [
            {"id": "home-hero", "channels": ["web", "app"], "offers": ["welcome", "app-only"]},
            {"id": "cart-banner", "channels": ["web"], "offers": ["free-shipping"]},
        ],
    }
)


def engine(store: Store) -> Engine:
    return Engine(
        catalog=CATALOG,
        load=store.load,
        clock=lambda: NOW / 1000,
        partition_of=lambda key: 0,
    )


def ask(eng: Engine, store: Store, **fields: Any) -> Any:
    body = {"customer_id": "u-1", "channel": "web", "timestamp": "2026-11-25T11:30:00Z"}
    body.update(fields)
    # Asked when it says: a request's time is within RTIM_MAX_FUTURE_SKEW_S of the clock.
    asked_ms = int(dt.datetime.fromisoformat(body["timestamp"]).timestamp() * 1000)
    answer, result = eng.decide_request(parse_request(orjson.dumps(body), now_ms=asked_ms))
    store.persist(result)
    return answer, result


# -- request validation ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"{oops", "body", "not JSON"),
        (b"[1]", "body", "JSON object"),
        (b'{"channel": "web"}', "customer_id", "required"),
        (b'{"customer_id": "", "channel": "web"}', "customer_id", "non-empty"),
        (b'{"customer_id": ["u"], "channel": "web"}', "customer_id", "non-empty"),
        (b'{"customer_id": "u"}', "channel", "required"),
        (b'{"customer_id": "u", "channel": "fax"}', "channel", "not one of"),
        (b'{"customer_id": "u", "channel": "web", "placement": 3}', "placement", "placement id"),
        (b'{"customer_id": "u", "channel": "web", "timestamp": "soon"}', "timestamp", "ISO"),
        (b'{"customer_id": "u", "channel": "web", "timestamp": 17}', "timestamp", "ISO"),
        (
            b'{"customer_id": "u", "channel": "web", "timestamp": "2030-01-01T00:00:00Z"}',
            "timestamp",
            "timestamp is 1,132 days after now (requests may be at most 3600 s off the "
            "worker's clock: RTIM_MAX_FUTURE_SKEW_S)",
        ),
        (
            b'{"customer_id": "u", "channel": "web", "timestamp": "2026-10-26T12:00:00Z"}',
            "timestamp",
            "timestamp is 30 days before now (requests may be at most 3600 s off the "
            "worker's clock: RTIM_MAX_FUTURE_SKEW_S)",
        ),
        (
            b'{"customer_id": "u", "channel": "web", "timestamp": "0001-01-01T00:00:00Z"}',
            "timestamp",
            "days before now",
        ),
        (
            b'{"customer_id": "u", "channel": "web", "timestamp": "0001-01-01T00:00:00+01:00"}',
            "timestamp",
            "days before now",
        ),
        (
            b'{"customer_id": "u", "channel": "web", "timestamp": "9999-12-31T23:59:59-01:00"}',
            "timestamp",
            "days after now",
        ),
        (
            b'{"customer_id": "u", "channel": "web", "timestamp": "2026-11-25T11:30:00"}',
            "timestamp",
            "has no UTC offset (add 'Z' or '+hh:mm'): '2026-11-25T11:30:00'",
        ),
        (b'{"customer_id": "u", "channel": "web", "timestamp": "2026-11-25"}', "timestamp", "UTC"),
        # Wrong types, which must never reach an `in` test or a look-up (unhashable).
        (b'{"customer_id": "h1", "channel": ["web"]}', "channel", "got an array"),
        (b'{"customer_id": "h1", "channel": {"web": 1}}', "channel", "got an object"),
        (b'{"customer_id": "h1", "channel": 1}', "channel", "must be a string"),
        (b'{"customer_id": "h1", "channel": true}', "channel", "got a boolean"),
        (b'{"customer_id": {"id": "u"}, "channel": "web"}', "customer_id", "non-empty string"),
        (b'{"customer_id": 1.5, "channel": "web"}', "customer_id", "non-empty string"),
        (b'{"customer_id": true, "channel": "web"}', "customer_id", "non-empty string"),
        (b'{"customer_id": "u", "channel": "web", "placement": ["p"]}', "placement", "id"),
        (b'{"customer_id": "u", "channel": "web", "placement": {"p": 1}}', "placement", "id"),
        (b'{"customer_id": "u", "channel": "web", "request_id": ["r"]}', "request_id", "string"),
        (b'{"customer_id": "u", "channel": "web", "request_id": {}}', "request_id", "string"),
        (b'{"customer_id": "u", "channel": "web", "limit": [1]}', "limit", "integer"),
        (b'{"customer_id": "u", "channel": "web", "limit": {"n": 1}}', "limit", "integer"),
        (b'{"customer_id": "u", "channel": "web", "limit": 1.0}', "limit", "integer"),
        (b'{"customer_id": "u", "channel": "web", "timestamp": ["2026"]}', "timestamp", "ISO"),
        (b'{"customer_id": "u", "channel": "web", "timestamp": {"t": 1}}', "timestamp", "ISO"),
        (b'{"customer_id": "u", "channel": "web", "context": "page=/"}', "context", "object"),
        (b'{"customer_id": "u", "channel": "web", "limit": 0}', "limit", "from 1 to"),
        (b'{"customer_id": "u", "channel": "web", "limit": 99}', "limit", "from 1 to"),
        (b'{"customer_id": "u", "channel": "web", "limit": true}', "limit", "integer"),
        (b'{"customer_id": "u", "channel": "web", "context": [1]}', "context", "JSON object"),
        # Empty, but not an object either: a client's bug, told rather than taken as none.
        (b'{"customer_id": "u", "channel": "web", "context": []}', "context", "JSON object"),
        (b'{"customer_id": "u", "channel": "web", "context": false}', "context", "JSON object"),
        (b'{"customer_id": "u", "channel": "web", "colour": "red"}', "colour", "unknown field"),
        (b'{"customer_id": "u", "channel": "web", "request_id": 5}', "request_id", "string"),
    ],
)
def test_a_malformed_request_names_its_field(body: bytes, field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body, now_ms=NOW)
    assert caught.value.field == field
    assert words in caught.value.message
    assert caught.value.as_json()["field"] == field


@pytest.mark.parametrize(
    ("off_ms", "skew_ms", "ok"),
    [
        (0, 3_600_000, True),
        (3_600_000, 3_600_000, True),  # exactly the allowance, either way
        (-3_600_000, 3_600_000, True),
        (3_600_001, 3_600_000, False),
        (-3_600_001, 3_600_000, False),
        (-60_000, 30_000, False),  # the one setting bounds the past too
        (-20_000, 30_000, True),
    ],
)
def test_a_requests_time_is_within_the_skew_allowance_either_way(
    off_ms: int, skew_ms: int, ok: bool
) -> None:
    at = dt.datetime.fromtimestamp((NOW + off_ms) / 1000, dt.UTC).isoformat()
    body = orjson.dumps({"customer_id": "u", "channel": "web", "timestamp": at})
    if ok:
        assert parse_request(body, now_ms=NOW, max_future_skew_ms=skew_ms).timestamp_ms == (
            NOW + off_ms
        )
    else:
        with pytest.raises(InvalidRequest) as caught:
            parse_request(body, now_ms=NOW, max_future_skew_ms=skew_ms)
        assert caught.value.field == "timestamp"
        direction = "after" if off_ms > 0 else "before"
        assert f"{direction} now (requests may be at most {skew_ms // 1000} s off" in (
            caught.value.message
        )


def test_a_request_without_timestamp_is_decided_now_and_numbers_are_ids() -> None:
    req = parse_request(b'{"customer_id": 42, "channel": "app", "limit": 3}', now_ms=NOW)
    assert (req.customer_id, req.timestamp_ms, req.limit) == ("42", NOW, 3)
    assert MAX_LIMIT >= 3


def test_a_query_asks_what_a_body_asks() -> None:
    body = {
        "customer_id": "u-1",
        "channel": "web",
        "placement": "home-hero",
        "timestamp": "2026-11-25T11:30:00Z",
        "limit": 2,
        "context": {"page": "/checkout", "ref": "mail"},
        "request_id": "r-1",
    }
    query = [(k, str(v)) for k, v in body.items() if k != "context"]
    query += [("context.page", "/checkout"), ("context.ref", "mail")]
    assert parse_query(query, now_ms=NOW) == parse_request(orjson.dumps(body), now_ms=NOW)


@pytest.mark.parametrize(
    ("query", "field", "words"),
    [
        ([("channel", "web")], "customer_id", "required"),
        ([("customer_id", "u"), ("channel", "fax")], "channel", "not one of"),
        ([("customer_id", "u"), ("channel", "web"), ("limit", "two")], "limit", "integer"),
        ([("customer_id", "u"), ("channel", "web"), ("limit", "-1")], "limit", "integer"),
        ([("customer_id", "u"), ("channel", "web"), ("limit", "0")], "limit", "from 1 to"),
        ([("customer_id", "u"), ("channel", "web"), ("limit", "\u0662")], "limit", "integer"),
        ([("customer_id", "u"), ("channel", "web"), ("limit", "9" * 5000)], "limit", "integer"),
        ([("customer_id", "u"), ("channel", "web"), ("channel", "app")], "channel", "more than"),
        ([("customer_id", "u"), ("channel", "web"), ("context", "{}")], "context", "context.NAME"),
        ([("customer_id", "u"), ("channel", "web"), ("context.", "x")], "context.", "a name"),
        (
            [("customer_id", "u"), ("channel", "web"), ("context.a", "1"), ("context.a", "2")],
            "context.a",
            "more than once",
        ),
        ([("customer_id", "u"), ("channel", "web"), ("colour", "red")], "colour", "unknown field"),
        ([("customer_id", "u"), ("channel", "web"), ("timestamp", "soon")], "timestamp", "ISO"),
        (
            [("customer_id", "u"), ("channel", "web"), ("timestamp", "0001-01-01T00:00:00Z")],
            "timestamp",
            "days before now (requests may be at most 3600 s off the worker's clock",
        ),
        (
            [("customer_id", "u"), ("channel", "web"), ("timestamp", "2026-11-25T14:00:00Z")],
            "timestamp",
            "timestamp is 2 h after now",
        ),
        (
            [("customer_id", "u"), ("channel", "web"), ("timestamp", "2026-11-25T11:30:00")],
            "timestamp",
            "no UTC offset",
        ),
    ],
)
def test_a_malformed_query_names_its_field(
    query: list[tuple[str, str]], field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_query(query, now_ms=NOW)
    assert (caught.value.field, words in caught.value.message) == (field, True), caught.value


# -- deciding ----------------------------------------------------------------


def test_a_request_is_recorded_like_a_trigger_decision_and_learned() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    run(eng, log.records(track("Product Added", product_id="p1", price=80, quantity=1)), store)
    answer, result = ask(eng, store, placement="cart-banner")
    assert [a.offer.id for a in answer.actions] == ["free-shipping"]
    (made,) = result.decisions
    record = orjson.loads(made.value)
    assert record["source"] == "api"
    assert (record["decision_id"], record["offer_id"]) == (answer.decision_id, "free-shipping")
    assert record["trigger"] == "placement:cart-banner"
    ctx = orjson.loads(store.data[(0, b"u-1")])
    assert [p[:2] for p in ctx["pending"]] == [[answer.decision_id, "free-shipping"]]
    assert ctx["n"] == 1, "a request is not an event of the customer"
    assert next(iter(ctx)) == "v" and list(ctx)[-1] == "src"
    (recent,) = recent_decisions(ctx)
    assert (recent["id"], recent["offer"]) == (answer.decision_id, "free-shipping")
    # A response joins it, and it is learned.
    joined = respond(
        eng,
        responses(("u-1", answer.decision_id, "conversion", T0 + 60_000 * 40)),
        store,
    )
    assert joined.responses == {("conversion", "joined"): 1}
    assert [e.decision_id for e in joined.examples] == [answer.decision_id]


def test_an_unknown_customer_is_decided_as_a_new_visitor() -> None:
    store = Store()
    eng = engine(store)
    answer, result = ask(eng, store, customer_id="stranger", placement="home-hero")
    assert answer.new_customer
    assert [a.offer.id for a in answer.actions] == ["welcome"]
    assert result.new_customers == 1
    ctx = orjson.loads(store.data[(0, b"stranger")])
    assert (ctx["n"], ctx["pending"][0][1]) == (0, "welcome")
    # Nothing eligible for a stranger: an empty answer with the reason, and no context.
    answer, result = ask(eng, store, customer_id="nobody", placement="cart-banner")
    assert answer.actions == [] and answer.as_json()["reason"] == "no-offer:none-eligible"
    assert result.updates == {} and len(result.decisions) == 1


def test_a_placement_offers_only_its_own_offers_on_the_requests_channel() -> None:
    store = Store()
    eng = engine(store)
    web, _ = ask(eng, store, placement="home-hero", limit=5)
    app, _ = ask(eng, store, placement="home-hero", channel="app", limit=5)
    assert [a.offer.id for a in web.actions] == ["welcome"]
    assert [a.offer.id for a in app.actions] == ["app-only"]
    with pytest.raises(KeyError):
        ask(eng, store, placement="nowhere")
    with pytest.raises(ValueError, match="not 'app'"):
        ask(eng, store, placement="cart-banner", channel="app")


def test_no_placement_means_every_offer_on_the_channel_ranked_up_to_the_limit() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    run(eng, log.records(track("Product Added", product_id="p1", price=80, quantity=1)), store)
    answer, _ = ask(eng, store, limit=10, context={"page": "/checkout"})
    offered = [a.offer.id for a in answer.actions]
    assert sorted(offered) == ["checkout-help", "free-shipping", "welcome"]
    scores = [a.score for a in answer.actions]
    assert scores == sorted(scores, reverse=True)
    one, _ = ask(eng, store, limit=1, context={"page": "/"})
    assert len(one.actions) == 1
    assert 'rejected:checkout-help:event.properties.page == "/checkout"' in one.reasons
    body = one.as_json()
    assert set(body["actions"][0]) == {
        "offer_id",
        "name",
        "channel",
        "creative",
        "score",
        "propensity",
        "reasons",
    }


def test_the_context_remembers_only_the_last_few_decisions() -> None:
    store = Store()
    eng = engine(store)
    ids = [ask(eng, store, placement="home-hero")[0].decision_id for _ in range(MAX_RECENT + 2)]
    ctx = orjson.loads(store.data[(0, b"u-1")])
    assert [r["id"] for r in recent_decisions(ctx)] == ids[::-1][:MAX_RECENT]


def test_a_request_asked_again_gets_its_answer_again_and_counts_once() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    run(eng, log.records(track("Product Added", product_id="p1", price=80, quantity=1)), store)
    first, made = ask(eng, store, limit=3, request_id="retry-me", context={"page": "/checkout"})
    assert len(first.actions) == 3 and len(made.decisions) == 1
    stored = store.data[(0, b"u-1")]
    # A client's retry, answered by a worker that reloaded the context from the store.
    again_eng = engine(store)
    again, result = ask(again_eng, store, limit=3, request_id="retry-me")
    assert again.decision_id == first.decision_id and again.decided_ms == first.decided_ms
    assert [(a.offer.id, a.channel, a.score, a.propensity) for a in again.actions] == [
        (a.offer.id, a.channel, a.score, a.propensity) for a in first.actions
    ]
    assert (
        again.repeated
        and again.as_json()["repeated"] is True
        and "repeated" not in (first.as_json())
    )
    assert again.reasons[-1] == "repeated:retry-me"
    # Each action's reasons as they were: its rules, its draw and its levers.
    assert [a.reasons for a in again.actions] == [a.reasons for a in first.actions]
    assert again.actions[0].reasons[0] == 'eligible:event.properties.page == "/checkout"'
    assert [r.partition("=")[0] for r in again.actions[0].reasons[1:]] == [
        "sampled:checkout-help",
        "lever:checkout-help:value",
        "lever:checkout-help:priority",
    ]
    # Nothing decided, opened, counted or recorded again.
    assert result.decisions == [] and result.updates == {}
    assert store.data[(0, b"u-1")] == stored
    ctx = orjson.loads(stored)
    assert len(ctx["pending"]) == 3
    # Another request id is a new decision.
    other, result = ask(again_eng, store, limit=3, request_id="another")
    assert other.decision_id != first.decision_id and not other.repeated
    assert len(result.decisions) == 1


def test_a_retry_is_answered_from_a_summary_an_earlier_version_wrote() -> None:
    """A context stored before summaries kept each action's draw and levers still answers
    a retry the same, with each action's rules as its reasons."""
    store, log = Store(), Log()
    eng = engine(store)
    run(eng, log.records(track("Product Added", product_id="p1", price=80, quantity=1)), store)
    first, _ = ask(eng, store, limit=3, request_id="old", context={"page": "/checkout"})
    ctx = orjson.loads(store.data[(0, b"u-1")])
    summary = ctx["recent"][-1]
    assert [len(a) for a in summary["actions"]] == [6] * len(first.actions)
    summary["actions"] = [a[:4] for a in summary["actions"]]
    store.data[(0, b"u-1")] = orjson.dumps(ctx)
    again, result = ask(engine(store), store, limit=3, request_id="old")
    assert again.repeated and result.decisions == []
    assert [(a.offer.id, a.channel, a.score, a.propensity) for a in again.actions] == [
        (a.offer.id, a.channel, a.score, a.propensity) for a in first.actions
    ]
    assert [a.reasons for a in again.actions] == [
        [r for r in a.reasons if r.startswith("eligible:")] for a in first.actions
    ]


def test_a_decision_with_many_rejections_is_remembered_with_its_outcome() -> None:
    offers = [
        {"id": f"big-{i}", "channels": ["web"], "eligibility": ["cart.value >= 1000"]}
        for i in range(MAX_REASONS + 2)
    ]
    store, log = Store(), Log()
    eng = Engine(
        catalog=parse_catalog({"offers": offers}),
        load=store.load,
        clock=lambda: NOW / 1000,
        partition_of=lambda key: 0,
    )
    run(eng, log.records(track("Product Added", product_id="p1", price=80, quantity=1)), store)
    first, _ = ask(eng, store, request_id="r-9")
    assert first.as_json()["reason"] == "no-offer:none-eligible"
    (remembered,) = recent_decisions(orjson.loads(store.data[(0, b"u-1")]))
    assert len(remembered["reasons"]) == MAX_REASONS
    assert remembered["reasons"][-1] == "no-offer:none-eligible"
    # So a retry is told why too.
    again, _ = ask(eng, store, request_id="r-9")
    assert again.repeated and again.as_json()["reason"] == "no-offer:none-eligible"


def test_rtim_explain_shows_every_action_a_request_was_answered_with() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    run(eng, log.records(track("Product Added", product_id="p1", price=80, quantity=1)), store)
    answer, _ = ask(eng, store, limit=3, context={"page": "/checkout"})
    ctx = orjson.loads(store.data[(0, b"u-1")])
    body = {
        "customer_id": "u-1",
        "known": True,
        "partition": 0,
        "worker": "http://w1",
        "context": ctx,
        "policy": {},
        "open_decisions": [],
        "decisions": recent_decisions(ctx),
    }

    class Worker(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(orjson.dumps(body))

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Worker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        shown = CliRunner().invoke(main, ["explain", "u-1", "--url", url])
    finally:
        server.shutdown()
    assert shown.exit_code == 0, shown.output
    first, *others = answer.actions
    assert f"-> {first.offer.id} on web  ({answer.decision_id})" in shown.output
    also = ", ".join(f"{a.offer.id} on {a.channel}" for a in others)
    assert len(others) == 2 and f"also: {also}" in shown.output


def test_a_trigger_decision_is_remembered_too() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    result = run(
        eng, log.records(track("Product Added", product_id="p1", price=120, quantity=1)), store
    )
    (made,) = result.decisions
    ctx = orjson.loads(store.data[(0, b"u-1")])
    (recent,) = recent_decisions(ctx)
    assert (recent["id"], recent["by"]) == (orjson.loads(made.value)["decision_id"], "cart-builder")


# -- the catalog ---------------------------------------------------------------


def test_a_new_catalog_is_decided_with_from_the_next_batch() -> None:
    store, log = Store(), Log()
    eng = engine(store)
    assert run(eng, log.records(page("/sale")), store).triggers == []
    eng.set_catalog(
        catalog_from_text(
            "triggers:\n  - id: sale\n    when: {type: page}\n"
            "offers:\n  - id: sale-banner\n    channels: [web]\n    triggers: [sale]\n",
            "v2",
        )
    )
    fired = run(eng, log.records(page("/sale", ts=T0 + 1000)), store)
    assert [t.offer_id for t in fired.triggers] == ["sale-banner"]
    answer, _ = ask(eng, store)
    assert [a.offer.id for a in answer.actions] == ["sale-banner"]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("offers: []\nplacements:\n  - id: p\n    channels: [fax]\n", 3, "unknown channel"),
        ("offers: []\nplacements:\n  - id: p\n    channels: [web]\n    offers: [x]\n", 5, "x"),
        ("offers: []\nplacements:\n  - id: p\n    channels: [web]\n    size: 3\n", 5, "size"),
        (
            "offers: []\nplacements:\n  - {id: p, channels: [web]}\n  - {id: p, channels: [app]}\n",
            4,
            "duplicate placement",
        ),
        ("offers: [\n", 2, "not valid YAML"),
    ],
)
def test_a_bad_placement_is_refused_with_its_line(text: str, line: int, words: str) -> None:
    with pytest.raises(CatalogError) as caught:
        catalog_from_text(text, "new.yaml")
    assert str(caught.value).startswith(f"new.yaml:{line}:")
    assert words in str(caught.value)


# -- what is written matches the published schemas -----------------------------

SCHEMAS = Path(__file__).parents[2] / "topics" / "schemas"


def schema_errors(name: str, value: Any) -> list[str]:
    schema = json.loads((SCHEMAS / name).read_text())
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]


def test_a_requests_record_and_context_match_their_schemas() -> None:
    store = Store()
    eng = engine(store)
    for _ in range(MAX_RECENT + 1):
        _, result = ask(eng, store, placement="home-hero")
    assert not schema_errors("decision.schema.json", orjson.loads(result.decisions[0].value))
    ctx = orjson.loads(store.data[(0, b"u-1")])
    assert len(ctx["recent"]) == MAX_RECENT
    assert not schema_errors("customer-context.schema.json", ctx)


def test_a_catalog_record_matches_its_schema_and_loads() -> None:
    text = "offers:\n  - {id: a, channels: [web]}\n"
    value = encode_catalog(text, version=7, by="ops", at_ms=NOW)
    assert not schema_errors("catalog.schema.json", orjson.loads(value))
    version, catalog = decode_catalog(value, offset=12)
    assert (version.version, version.source, version.offset) == (7, "rtim.offers", 12)
    assert [o.id for o in catalog.offers] == ["a"]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (b"nope", "not JSON"),
        (b'{"format": 9}', "format"),
        (b'{"format": 1, "version": 0, "yaml": ""}', "version"),
        (b'{"format": 1, "version": 2, "yaml": "offers: [{id: a, channels: [fax]}]"}', "fax"),
    ],
)
def test_a_catalog_record_that_cannot_be_loaded_says_why(value: bytes, words: str) -> None:
    with pytest.raises(CatalogError, match=words):
        decode_catalog(value)


POLICY_CATALOG = parse_catalog(
    {
        "policy": {
            "consent": {"default": {"email": False}},
            "caps": [{"id": "daily-total", "max": 2, "per": "1d"}],
        },
        "groups": {"loyalty": {"priority": 1.5}},
        "offers": [
            {"id": "points", "channels": ["email", "web"], "value": 4, "group": "loyalty"},
        ],
        "placements": [{"id": "inbox", "channels": ["web", "email"], "offers": ["points"]}],
    }
)


def test_requests_are_decided_within_the_contact_policy_and_count_against_its_caps() -> None:
    store = Store()
    eng = Engine(
        catalog=POLICY_CATALOG, load=store.load, clock=lambda: NOW / 1000, partition_of=lambda k: 0
    )
    # No consent for email: the action goes to the offer's next channel, and says why.
    first, _ = ask(eng, store, placement="inbox", channel="email", timestamp="2026-11-24T10:00:00Z")
    (action,) = first.actions
    assert action.channel == "web"
    assert "skipped:points:no-consent:email" in first.reasons
    assert "lever:points:group-priority=1.5" in action.reasons
    second, _ = ask(eng, store, placement="inbox", channel="web", timestamp="2026-11-24T11:00:00Z")
    assert [a.offer.id for a in second.actions] == ["points"]
    # Two contacts in a day: the cap holds for requests as for triggers, stored and reloaded;
    # a day after the first, one counts.
    again = Engine(
        catalog=POLICY_CATALOG, load=store.load, clock=lambda: NOW / 1000, partition_of=lambda k: 0
    )
    third, _ = ask(again, store, placement="inbox", channel="web", timestamp="2026-11-24T12:00:00Z")
    assert third.actions == []
    assert "rejected:points:capped:daily-total" in third.reasons
    nextday, _ = ask(
        again, store, placement="inbox", channel="web", timestamp="2026-11-25T10:00:01Z"
    )
    assert [a.offer.id for a in nextday.actions] == ["points"]


def _product_of_reasons(action: Any) -> float:
    """The draw times every lever, read back from an action's reasons."""
    offer = action.offer.id
    numbers = [
        float(r.rpartition("=")[2])
        for r in action.reasons
        if r.startswith((f"sampled:{offer}=", f"lever:{offer}:"))
    ]
    assert len(numbers) >= 3, action.reasons  # the draw, the value and the priority at least
    return math.prod(numbers)


@pytest.mark.parametrize("policy", [False, True], ids=["no contact policy", "contact policy"])
def test_each_actions_score_is_the_product_of_the_numbers_its_reasons_show(policy: bool) -> None:
    """A marketer reading an answer sees what made each score: the propensity drawn for it
    and every lever, with or without a contact policy."""
    store = Store()
    if policy:
        eng = Engine(
            catalog=POLICY_CATALOG,
            load=store.load,
            clock=lambda: NOW / 1000,
            partition_of=lambda k: 0,
        )
        answer, _ = ask(eng, store, placement="inbox", channel="web")
    else:
        eng = engine(store)
        added = track("Product Added", product_id="p1", price=80, quantity=1)
        run(eng, Log().records(added), store)
        answer, _ = ask(eng, store, limit=3, context={"page": "/checkout"})
    assert answer.actions
    for action in answer.actions:
        assert f"lever:{action.offer.id}:value={action.offer.value:g}" in action.reasons
        assert _product_of_reasons(action) == pytest.approx(action.score, rel=1e-4)
    if policy:
        assert "lever:points:group-priority=1.5" in answer.actions[0].reasons


@pytest.mark.parametrize(
    ("url", "code", "said"),
    [
        ("notaurl", 2, "is not a worker's URL"),
        ("http://[::1", 2, "is not a worker's URL"),
        ("http://exa mple", 1, "cannot reach"),
    ],
)
def test_rtim_decide_and_explain_say_what_is_wrong_with_a_url(
    url: str, code: int, said: str
) -> None:
    for args in (["explain", "u-1"], ["decide", "u-1", "--channel", "web"]):
        result = CliRunner().invoke(main, [*args, "--url", url])
        assert result.exit_code == code, result.output
        assert said in result.output and "Traceback" not in result.output
