"""What a client of ``/v1/decide`` sees for hostile or broken requests: a 400 naming the
field at fault (wrong types, times far from the clock), a 400 for an unknown placement or
one not on the request's channel, and a 500 with a log line, not a misattributed 400, for
any other failure while deciding. Also the clickstream's dead letter for a zero time."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

import rtim.engine
import rtim.stream.api
from rtim.engine import Engine
from rtim.names import CLICKSTREAM_TOPIC
from rtim.offers.catalog import parse_catalog
from rtim.stream.api import DecisionApi, Reply

from .test_engine import NOW as CLOCK
from .test_engine import Log, Store, run, track

CATALOG = parse_catalog(
    {
        "offers": [{"id": "welcome", "channels": ["web"], "value": 1}],
        "placements": [{"id": "home-hero", "channels": ["web"], "offers": ["welcome"]}],
    }
)


def decision_api(skew_s: float = 3600.0) -> DecisionApi:
    """The API on a worker that owns every customer and decides at once (``decided``)."""
    store = Store()
    engine = Engine(catalog=CATALOG, load=store.load, partition_of=lambda key: 0)
    processor = SimpleNamespace(
        _partition_of=lambda key: 0,
        settings=SimpleNamespace(api_answer="decided", max_future_skew_s=skew_s),
        request_run=lambda: engine.start_batch(CLICKSTREAM_TOPIC),
    )
    app = SimpleNamespace(conf=SimpleNamespace(canonical_url="http://me:1"))
    api = DecisionApi(app, processor, live=SimpleNamespace())  # type: ignore[arg-type]
    api.owns = lambda partition: True  # type: ignore[method-assign]
    api.leased = lambda: True  # type: ignore[method-assign]
    return api


def post(api: DecisionApi, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``POST /v1/decide`` as both servers answer it: the fast path first, else the view."""
    raw = orjson.dumps(body)
    reply: Reply | None = api.decide_at_once(raw)
    if reply is None:
        reply = asyncio.run(api.serve_decide(raw, None))
    return reply.status, orjson.loads(reply.body)


def get(api: DecisionApi, query: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    reply = asyncio.run(api.serve_decide_query(query, "/v1/decide?...", None))
    return reply.status, orjson.loads(reply.body)


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def test_the_api_decides_a_sound_request() -> None:
    # (so that the 400s below are about the field each one changes)
    status, body = post(decision_api(), {"customer_id": "h1", "channel": "web"})
    assert status == 200 and [a["offer_id"] for a in body["actions"]] == ["welcome"]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"channel": ["web"]}, "channel", "must be a string, one of ['app', "),
        ({"channel": ["web"]}, "channel", "'web']; got an array"),
        ({"channel": {"web": True}}, "channel", "got an object"),
        ({"customer_id": ["h1"]}, "customer_id", "must be a non-empty string"),
        ({"customer_id": {"id": "h1"}}, "customer_id", "must be a non-empty string"),
        ({"placement": ["home-hero"]}, "placement", "must be a placement id"),
        ({"placement": {"id": "home-hero"}}, "placement", "must be a placement id"),
        ({"request_id": ["r"]}, "request_id", "must be a string of 1 to 128 characters"),
        ({"limit": [2]}, "limit", "must be an integer from 1 to 10"),
        ({"timestamp": ["now"]}, "timestamp", "must be an ISO 8601 string"),
        ({"timestamp": {"at": 1}}, "timestamp", "must be an ISO 8601 string"),
        ({"context": [["page", "/"]]}, "context", "must be a JSON object"),
        (
            {"timestamp": "2026-11-25T11:30:00"},
            "timestamp",
            "has no UTC offset (add 'Z' or '+hh:mm'): '2026-11-25T11:30:00'",
        ),
    ],
)
def test_a_wrong_field_is_a_400_naming_it(change: dict[str, Any], field: str, message: str) -> None:
    status, body = post(decision_api(), {"customer_id": "h1", "channel": "web", **change})
    assert status == 400
    assert (body["error"], body["field"]) == ("invalid_request", field)
    assert message in body["message"]


@pytest.mark.parametrize(
    ("timestamp", "words"),
    [
        ("0001-01-01T00:00:00Z", "days before now"),
        ("0001-01-01T00:00:00+01:00", "days before now"),
        ("9999-12-31T23:59:59-01:00", "days after now"),
    ],
)
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_time_far_from_the_clock_is_a_400_on_timestamp(
    method: str, timestamp: str, words: str
) -> None:
    api = decision_api()
    if method == "POST":
        status, body = post(api, {"customer_id": "h1", "channel": "web", "timestamp": timestamp})
    else:
        status, body = get(
            api, [("customer_id", "h1"), ("channel", "web"), ("timestamp", timestamp)]
        )
    assert status == 400
    assert (body["error"], body["field"]) == ("invalid_request", "timestamp")
    assert words in body["message"]
    assert "(requests may be at most 3600 s off the worker's clock" in body["message"]


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_backdated_request_is_refused_with_the_allowance(method: str) -> None:
    api = decision_api(skew_s=60)
    at = iso(int(time.time() * 1000) - 30 * 86_400_000)
    if method == "POST":
        status, body = post(api, {"customer_id": "h1", "channel": "web", "timestamp": at})
    else:
        status, body = get(api, [("customer_id", "h1"), ("channel", "web"), ("timestamp", at)])
    assert (status, body["field"]) == (400, "timestamp")
    assert body["message"] == (
        "timestamp is 30 days before now (requests may be at most 60 s off the worker's "
        "clock: RTIM_MAX_FUTURE_SKEW_S)"
    )
    # Within the allowance it is decided.
    recent = iso(int(time.time() * 1000) - 30_000)
    status, _ = post(api, {"customer_id": "h1", "channel": "web", "timestamp": recent})
    assert status == 200


def test_an_unknown_placement_or_one_not_on_the_channel_is_a_400() -> None:
    api = decision_api()
    status, body = post(api, {"customer_id": "h1", "channel": "web", "placement": "nowhere"})
    assert (status, body["field"], body["message"]) == (
        400,
        "placement",
        "no placement 'nowhere' in the catalog",
    )
    status, body = post(api, {"customer_id": "h1", "channel": "app", "placement": "home-hero"})
    assert (status, body["field"], body["message"]) == (
        400,
        "channel",
        "placement 'home-hero' is on ['web'], not 'app'",
    )


@pytest.mark.parametrize(
    "error",
    [ValueError("year 0 is out of range"), KeyError("free-shipping"), OverflowError("big")],
    ids=["ValueError", "KeyError", "OverflowError"],
)
@pytest.mark.parametrize("placement", [None, "home-hero"])
def test_any_other_failure_while_deciding_is_a_500_with_a_log_line(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    placement: str | None,
) -> None:
    def fails(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(rtim.engine, "decide", fails)
    request = {"customer_id": "h1", "channel": "web", "placement": placement}
    with caplog.at_level(logging.ERROR, logger="rtim.api"):
        status, body = post(decision_api(), request)
    assert (status, body) == (500, {"error": "internal_error"})
    assert any(r.exc_info and r.exc_info[1] is error for r in caplog.records), caplog.text


def test_a_clickstream_event_at_a_zero_time_is_dead_lettered_as_bad_timestamp() -> None:
    """Not internal_error: quiet hours (the customer's local time) cannot show year 0."""
    catalog = parse_catalog(
        {
            "triggers": [{"id": "browse", "when": {"event": "Product Viewed"}, "cooldown": 0}],
            "offers": [{"id": "picks", "channels": ["email"], "triggers": ["browse"]}],
            "policy": {
                "quiet_hours": {"from": "21:00", "to": "08:00"},
                "timezone": "America/New_York",
            },
        }
    )
    store, log = Store(), Log()
    engine = Engine(catalog=catalog, load=store.load, clock=lambda: CLOCK / 1000)
    for stamp in ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00"):
        event = track("Product Viewed", product_id="p")
        event["timestamp"] = stamp
        (dead,) = run(engine, log.records(event)).dead_letters
        assert dict(dead.headers)["rtim.errors.reason"] == b"bad_timestamp"


def test_a_limit_of_thousands_of_digits_in_a_query_is_a_400() -> None:
    status, body = get(
        decision_api(), [("customer_id", "h1"), ("channel", "web"), ("limit", "9" * 5000)]
    )
    assert (status, body["field"], body["message"]) == (
        400,
        "limit",
        "must be an integer from 1 to 10",
    )


def test_a_defect_in_the_checks_is_a_500_with_a_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer either way: the fast path closes a connection whose answer failed."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(rtim.stream.api, "parse_request", broken)
    monkeypatch.setattr(rtim.stream.api, "parse_query", broken)
    api = decision_api()
    with caplog.at_level(logging.ERROR, logger="rtim.api"):
        # (As aiohttp's view and the fast path's task serve it, not at once.)
        reply = asyncio.run(api.serve_decide(b'{"customer_id": "h1", "channel": "web"}', None))
        assert (reply.status, orjson.loads(reply.body)) == (500, {"error": "internal_error"})
        assert get(api, [("customer_id", "h1"), ("channel", "web")]) == (
            500,
            {"error": "internal_error"},
        )
    assert caplog.text.count("decide request could not be checked") == 2
