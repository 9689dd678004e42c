"""Segment-spec parsing and validation: every rule, every reason code."""

from __future__ import annotations

import calendar
import copy
import pickle
from typing import Any

import orjson
import pytest

import rtim.events
from rtim.events import (
    CHANNELS,
    EVENT_TYPES,
    REASONS,
    Event,
    InvalidEvent,
    derive_channel,
    parse_event,
)
from rtim.events.segment import MAX_CUSTOMER_ID_CHARS, PARSE_REASONS


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, millis: int = 0) -> int:
    """Epoch ms of a UTC time, computed independently of the code under test."""
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1000 + millis


NOW = ms(2024, 5, 1, 12, 0, 0)
HOUR = 3_600_000


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def parse(obj: Any, **kwargs: Any) -> Event:
    kwargs.setdefault("now_ms", NOW)
    return parse_event(dumps(obj), **kwargs)


# --------------------------------------------------------------------------
# Samples shaped as real SDKs send them (trimmed of irrelevant context fields).
# --------------------------------------------------------------------------

ANALYTICS_JS_PAGE = {
    "anonymousId": "507f191e810c19729de860ea",
    "channel": "client",
    "context": {
        "ip": "8.8.8.8",
        "library": {"name": "analytics.js", "version": "next-1.64.0"},
        "page": {
            "path": "/academy/",
            "referrer": "",
            "search": "",
            "title": "Analytics Academy",
            "url": "https://segment.com/academy/",
        },
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Safari/605.1.15",
    },
    "integrations": {},
    "messageId": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
    "name": "Home",
    "properties": {"title": "Welcome | Initech", "url": "http://www.example.com"},
    "receivedAt": "2015-12-12T19:11:01.266Z",
    "sentAt": "2015-12-12T19:11:01.169Z",
    "timestamp": "2015-12-12T19:11:01.249Z",
    "originalTimestamp": "2015-12-12T19:11:01.152Z",
    "type": "page",
    "userId": "97980cfea0067",
}

ANALYTICS_JS_TRACK = {
    "anonymousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895",
    "context": {
        "library": {"name": "analytics.js", "version": "next-1.64.0"},
        "page": {"path": "/shoes/trail-runner", "url": "https://shop.example/shoes/trail-runner"},
        "traits": {"plan": "gold", "email": "ann@example.com"},
    },
    "event": "Product Added",
    "messageId": "ajs-next-1714564800250-0b7e",
    "properties": {"product_id": "sku-42", "category": "Shoes", "price": 89.95, "quantity": 1},
    "timestamp": "2024-05-01T11:59:58.250Z",
    "type": "track",
    "userId": None,
}

ANALYTICS_JS_IDENTIFY = {
    "anonymousId": "507f191e810c19729de860ea",
    "context": {
        "library": {"name": "analytics.js", "version": "next-1.64.0"},
        "page": {"path": "/account"},
    },
    "messageId": "ajs-identify-1",
    "timestamp": "2024-05-01T11:00:00.000Z",
    "traits": {"name": "Peter Gibbons", "email": "peter@example.com", "plan": "premium"},
    "type": "identify",
    "userId": "97980cfea0067",
}

SEGMENT_IOS_SCREEN = {
    "anonymousId": "3a12eab0-bca7-11e4-8dfc-aa07a5b093db",
    "channel": "client",
    "context": {
        "app": {
            "build": "1.1.1.160",
            "name": "Shop",
            "namespace": "com.shop.ios",
            "version": "1.1.1",
        },
        "device": {"manufacturer": "Apple", "model": "iPhone15,2", "type": "ios"},
        "library": {"name": "analytics-ios", "version": "4.1.8"},
        "os": {"name": "iOS", "version": "17.4"},
    },
    "messageId": "A1B2C3D4-E5F6-4A5B-8C7D-9E0F1A2B3C4D",
    "name": "Cart",
    "properties": {"items": 2},
    "timestamp": "2024-05-01T13:59:00.123+02:00",
    "type": "screen",
    "userId": "u-1",
}

SEGMENT_NODE_GROUP = {
    "context": {"library": {"name": "@segment/analytics-node", "version": "2.1.2"}},
    "groupId": "0e8c78ea9d97a7b8185e8632",
    "messageId": "node-next-1714564000000-abc",
    "timestamp": "2024-05-01T11:46:40Z",
    "traits": {"name": "Initech", "industry": "Technology", "employees": 329},
    "type": "group",
    "userId": "97980cfea0067",
}

SEGMENT_ALIAS = {
    "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
    "messageId": "python-alias-1",
    "previousId": "507f191e810c19729de860ea",
    "timestamp": "2024-05-01T11:00:00.5+00:00",
    "type": "alias",
    "userId": 42,  # analytics-python stringifies integer ids
}

RUDDER_JS_TRACK = {
    "anonymousId": "c82cbdff-e5be-4009-ac78-cdeea09ab4b1",
    "channel": "web",
    "context": {
        "app": {
            "build": "1.0.0",
            "name": "RudderLabs JavaScript SDK",
            "namespace": "com.rudderlabs.javascript",
            "version": "3.0.0",
        },
        "library": {"name": "RudderLabs JavaScript SDK", "version": "3.0.0"},
        "os": {"name": "", "version": ""},
        "page": {"path": "/checkout", "url": "https://shop.example/checkout"},
        "traits": {},
    },
    "event": "Checkout Started",
    "integrations": {"All": True},
    "messageId": "1714564790000-5b2f2c6e-6c0c-4b1e-9bd5-2f1d0f7a1d1c",
    "originalTimestamp": "2024-05-01T11:59:50.000Z",
    "properties": {"revenue": 30, "currency": "USD"},
    "rudderId": "ab4f7b57-4a54-4d6f-a8c4-1c1a4e0c8f0d",
    "sentAt": "2024-05-01T11:59:51.000Z",
    "type": "track",
    "userId": "",  # RudderStack's JS SDK sends "" for an anonymous visitor
}

RUDDER_ANDROID_SCREEN = {
    "anonymousId": "f3c2a1b0-d9e8-47f6-a5b4-c3d2e1f0a9b8",
    "channel": "mobile",
    "context": {
        "app": {"build": "7", "name": "Shop", "namespace": "com.shop.android", "version": "2.4.0"},
        "device": {"id": "f3c2a1b0", "manufacturer": "Google", "model": "Pixel 8", "name": "shiba"},
        "library": {"name": "com.rudderstack.android.sdk.core", "version": "1.21.0"},
        "os": {"name": "Android", "version": "14"},
        "traits": {"anonymousId": "f3c2a1b0-d9e8-47f6-a5b4-c3d2e1f0a9b8", "plan": "free"},
    },
    "event": "MainActivity",
    "messageId": "1714564700000-a1a1a1a1-b2b2-4c3c-8d4d-e5e5e5e5e5e5",
    "name": "MainActivity",
    "originalTimestamp": "2024-05-01T11:58:20.000Z",
    "properties": {"name": "MainActivity", "automatic": True},
    "type": "screen",
    "userId": "u-77",
}

RUDDER_NODE_IDENTIFY = {
    "anonymousId": "",
    "channel": "server",
    "context": {
        "library": {"name": "analytics-node", "version": "2.0.0"},
        "traits": {"plan": "basic", "company": "Initrode"},
    },
    "messageId": "node-1714564000000-ffff",
    "originalTimestamp": "2024-05-01T11:46:40.000Z",
    "traits": {"plan": "gold", "email": "m@example.com"},
    "type": "identify",
    "userId": "u-9",
}

EMAIL_CLICK = {
    "type": "track",
    "event": "Email Link Clicked",
    "messageId": "esp-evt-123",
    "userId": "u-5",
    "properties": {
        "channel": "Email",
        "campaign_id": "spring-sale",
        "link": "https://shop.example/sale",
    },
    "context": {"library": {"name": "esp-webhook-bridge", "version": "0.3"}},
    "timestamp": 1714564799000,  # epoch ms, as custom producers send Date.now()
}

VALID_SAMPLES = [
    # (id, payload, expected attributes)
    (
        "analytics.js page",
        ANALYTICS_JS_PAGE,
        dict(
            type="page",
            customer_id="97980cfea0067",
            user_id="97980cfea0067",
            anonymous_id="507f191e810c19729de860ea",
            name="Home",
            channel="web",
            # timestamp (skew-corrected by Segment) wins over originalTimestamp
            timestamp_ms=ms(2015, 12, 12, 19, 11, 1, 249),
            traits={},
        ),
    ),
    (
        "analytics.js track, anonymous",
        ANALYTICS_JS_TRACK,
        dict(
            type="track",
            customer_id="23adfd82-aa0f-45a7-a756-24f2a7a4c895",
            user_id=None,
            anonymous_id="23adfd82-aa0f-45a7-a756-24f2a7a4c895",
            name="Product Added",
            channel="web",
            timestamp_ms=ms(2024, 5, 1, 11, 59, 58, 250),
            traits={"plan": "gold", "email": "ann@example.com"},
        ),
    ),
    (
        "analytics.js identify",
        ANALYTICS_JS_IDENTIFY,
        dict(
            type="identify",
            customer_id="97980cfea0067",
            name=None,
            channel="web",
            timestamp_ms=ms(2024, 5, 1, 11),
            traits={"name": "Peter Gibbons", "email": "peter@example.com", "plan": "premium"},
        ),
    ),
    (
        "analytics-ios screen with offset",
        SEGMENT_IOS_SCREEN,
        dict(
            type="screen",
            customer_id="u-1",
            name="Cart",
            channel="app",
            timestamp_ms=ms(2024, 5, 1, 11, 59, 0, 123),
        ),
    ),
    (
        "analytics-node group",
        SEGMENT_NODE_GROUP,
        dict(
            type="group",
            customer_id="97980cfea0067",
            anonymous_id=None,
            name=None,
            channel="server",
            timestamp_ms=ms(2024, 5, 1, 11, 46, 40),
            traits={"name": "Initech", "industry": "Technology", "employees": 329},
        ),
    ),
    (
        "analytics-python alias, integer userId",
        SEGMENT_ALIAS,
        dict(
            type="alias",
            customer_id="42",
            user_id="42",
            name=None,
            channel="server",
            timestamp_ms=ms(2024, 5, 1, 11, 0, 0, 500),
        ),
    ),
    (
        "RudderStack JS track, userId empty, originalTimestamp only",
        RUDDER_JS_TRACK,
        dict(
            type="track",
            customer_id="c82cbdff-e5be-4009-ac78-cdeea09ab4b1",
            user_id=None,
            name="Checkout Started",
            # explicit channel "web" beats the context.app/os the JS SDK sends
            channel="web",
            timestamp_ms=ms(2024, 5, 1, 11, 59, 50),
            traits={},
        ),
    ),
    (
        "RudderStack Android screen",
        RUDDER_ANDROID_SCREEN,
        dict(
            type="screen",
            customer_id="u-77",
            name="MainActivity",
            channel="app",
            timestamp_ms=ms(2024, 5, 1, 11, 58, 20),
            traits={"anonymousId": "f3c2a1b0-d9e8-47f6-a5b4-c3d2e1f0a9b8", "plan": "free"},
        ),
    ),
    (
        "RudderStack node identify, traits merged",
        RUDDER_NODE_IDENTIFY,
        dict(
            type="identify",
            customer_id="u-9",
            anonymous_id=None,
            channel="server",
            timestamp_ms=ms(2024, 5, 1, 11, 46, 40),
            # top-level traits win over context.traits on a conflict
            traits={"plan": "gold", "company": "Initrode", "email": "m@example.com"},
        ),
    ),
    (
        "server-side email click, epoch ms",
        EMAIL_CLICK,
        dict(
            type="track",
            customer_id="u-5",
            name="Email Link Clicked",
            channel="email",
            timestamp_ms=1714564799000,
        ),
    ),
]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(p, e) for _, p, e in VALID_SAMPLES],
    ids=[i for i, _, _ in VALID_SAMPLES],
)
def test_valid_samples(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    event = parse(payload)
    assert isinstance(event, Event)
    for attr, value in expected.items():
        assert getattr(event, attr) == value, attr
    assert event.message_id == payload["messageId"]
    assert event.raw == payload
    assert event.properties == (payload.get("properties") or {})
    assert event.context == (payload.get("context") or {})
    assert event.channel in CHANNELS


def test_sample_types_cover_every_call_type() -> None:
    assert {p["type"] for _, p, _ in VALID_SAMPLES} == EVENT_TYPES


def test_event_is_frozen_and_equal_to_a_normally_built_one() -> None:
    event = parse(ANALYTICS_JS_TRACK)
    with pytest.raises(AttributeError):
        event.channel = "sms"  # type: ignore[misc]
    # parse_event builds Events through a fast path; it must give the same
    # object as the constructor, field for field.
    rebuilt = Event(**{name: getattr(event, name) for name in Event._fields})
    assert rebuilt == event
    assert repr(rebuilt) == repr(event) and type(rebuilt) is type(event)
    assert not hasattr(event, "__dict__")


def test_dicts_are_the_parsed_ones_and_defaults_are_not_shared() -> None:
    event = parse(ANALYTICS_JS_PAGE)
    assert event.properties is event.raw["properties"]
    assert event.context is event.raw["context"]
    bare = {k: v for k, v in SEGMENT_ALIAS.items() if k != "context"}
    one, two = parse(bare), parse(bare)
    assert one.properties == {} and one.context == {} and one.traits == {}
    assert one.properties is not two.properties
    assert one.traits is not two.traits


def test_type_is_case_insensitive() -> None:
    event = parse({**ANALYTICS_JS_TRACK, "type": "Track"})
    assert event.type == "track"
    assert event.name == "Product Added"


def test_page_and_screen_name_may_be_absent_or_null() -> None:
    page = dict(ANALYTICS_JS_PAGE)
    del page["name"]
    assert parse(page).name is None
    assert parse({**SEGMENT_IOS_SCREEN, "name": None}).name is None


def test_track_name_is_event_not_name() -> None:
    event = parse({**ANALYTICS_JS_TRACK, "name": "ignored"})
    assert event.name == "Product Added"
    # and the event field means nothing on a screen call
    assert parse(RUDDER_ANDROID_SCREEN).name == "MainActivity"
    assert parse({**SEGMENT_IOS_SCREEN, "event": "x"}).name == "Cart"


def test_null_objects_count_as_absent() -> None:
    event = parse({**ANALYTICS_JS_TRACK, "properties": None, "traits": None})
    assert event.properties == {}
    assert event.traits == ANALYTICS_JS_TRACK["context"]["traits"]


# --------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_id", "anonymous_id", "customer", "user", "anon"),
    [
        ("u-1", "a-1", "u-1", "u-1", "a-1"),
        (None, "a-1", "a-1", None, "a-1"),
        ("", "a-1", "a-1", None, "a-1"),
        ("   ", "a-1", "a-1", None, "a-1"),
        ("u-1", "", "u-1", "u-1", None),
        ("u-1", None, "u-1", "u-1", None),
        (42, None, "42", "42", None),
        (-7, "a-1", "-7", "-7", "a-1"),
        (None, 1234567890123, "1234567890123", None, "1234567890123"),
    ],
)
def test_identity(user_id: Any, anonymous_id: Any, customer: str, user: Any, anon: Any) -> None:
    payload = {**SEGMENT_ALIAS, "userId": user_id, "anonymousId": anonymous_id}
    event = parse(payload)
    assert (event.customer_id, event.user_id, event.anonymous_id) == (customer, user, anon)


def test_a_customer_id_of_the_longest_length_is_accepted() -> None:
    # The limit is on the id that names the customer; the other may be longer.
    longest = "u" * MAX_CUSTOMER_ID_CHARS
    assert parse_event(variant(userId=longest), now_ms=NOW).customer_id == longest
    event = parse_event(variant(anonymousId="a" * 5000), now_ms=NOW)
    assert event.customer_id == "u-1"


def test_absent_id_keys_are_like_null() -> None:
    payload = {k: v for k, v in SEGMENT_ALIAS.items() if k != "userId"}
    payload["anonymousId"] = "a-9"
    assert parse(payload).customer_id == "a-9"


# --------------------------------------------------------------------------
# Invalid records: (id, raw bytes, reason, words the message must contain, field)
# --------------------------------------------------------------------------

BASE = {
    "type": "track",
    "event": "Product Viewed",
    "messageId": "m-1",
    "userId": "u-1",
    "anonymousId": "a-1",
    "properties": {"product_id": "p1"},
    "context": {"library": {"name": "analytics.js"}},
    "timestamp": "2024-05-01T11:00:00Z",
}

_DROP = object()


def variant(**changes: Any) -> bytes:
    """BASE with some fields changed (``_DROP`` removes one), as JSON bytes."""
    obj = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is _DROP:
            obj.pop(key, None)
        else:
            obj[key] = value
    return dumps(obj)


INVALID = [
    # empty
    ("tombstone", None, "empty", ["empty"], None),
    ("zero bytes", b"", "empty", ["empty"], None),
    # oversize: checked on the length alone
    (
        "over the default limit",
        b"x" * 32_769,
        "oversize",
        ["32769 bytes", "32768-byte limit"],
        None,
    ),
    # malformed JSON
    ("truncated", b'{"type": "track", "messageId": ', "malformed_json", ["not valid JSON"], None),
    ("single quotes", b"{'type': 'track'}", "malformed_json", ["not valid JSON"], None),
    ("trailing garbage", variant() + b"}", "malformed_json", ["not valid JSON"], None),
    ("NaN", b'{"type": "track", "x": NaN}', "malformed_json", ["not valid JSON"], None),
    ("BOM", b"\xef\xbb\xbf" + variant(), "malformed_json", ["not valid JSON"], None),
    (
        "latin-1 bytes",
        variant(event="Caf\u00e9").replace(b"\xc3\xa9", b"\xe9"),
        "malformed_json",
        ["not valid JSON", "UTF-8"],
        None,
    ),
    ("binary garbage", bytes(range(256)), "malformed_json", ["not valid JSON"], None),
    ("too deep", b"[" * 2000 + b"]" * 2000, "malformed_json", ["not valid JSON"], None),
    ("whitespace only", b"   \n", "malformed_json", ["not valid JSON"], None),
    # not an object
    ("array", b"[1, 2]", "not_an_object", ["object", "array"], None),
    ("batch array", b"[" + variant() + b"]", "not_an_object", ["object", "array"], None),
    ("string", b'"track"', "not_an_object", ["object", "string"], None),
    ("number", b"42", "not_an_object", ["object", "number"], None),
    ("null", b"null", "not_an_object", ["object", "null"], None),
    ("boolean", b"true", "not_an_object", ["object", "boolean"], None),
    # type
    ("type missing", variant(type=_DROP), "unknown_type", ["type", "nothing"], "type"),
    ("type unknown", variant(type="click"), "unknown_type", ["type", "'click'"], "type"),
    ("type empty", variant(type=""), "unknown_type", ["type"], "type"),
    ("type number", variant(type=1), "unknown_type", ["type", "number"], "type"),
    ("type null", variant(type=None), "unknown_type", ["type", "null"], "type"),
    ("type batch", variant(type="batch"), "unknown_type", ["type", "'batch'"], "type"),
    # messageId
    (
        "messageId missing",
        variant(messageId=_DROP),
        "missing_id",
        ["messageId", "nothing"],
        "messageId",
    ),
    ("messageId empty", variant(messageId=""), "missing_id", ["messageId", "blank"], "messageId"),
    ("messageId blank", variant(messageId="  "), "missing_id", ["messageId", "blank"], "messageId"),
    ("messageId null", variant(messageId=None), "missing_id", ["messageId", "null"], "messageId"),
    (
        "messageId number",
        variant(messageId=123),
        "missing_id",
        ["messageId", "number"],
        "messageId",
    ),
    # customer identity
    (
        "no ids",
        variant(userId=_DROP, anonymousId=_DROP),
        "missing_id",
        ["userId", "anonymousId"],
        "userId",
    ),
    (
        "null ids",
        variant(userId=None, anonymousId=None),
        "missing_id",
        ["userId", "anonymousId"],
        "userId",
    ),
    (
        "empty ids",
        variant(userId="", anonymousId=""),
        "missing_id",
        ["userId", "anonymousId"],
        "userId",
    ),
    (
        "userId too long",
        variant(userId="u" * 257),
        "too_long",
        ["userId", "257 characters", "256"],
        "userId",
    ),
    (
        "anonymousId too long",
        variant(userId=None, anonymousId="a" * 1000),
        "too_long",
        ["anonymousId", "1000 characters"],
        "anonymousId",
    ),
    ("userId float", variant(userId=1.5), "wrong_type", ["userId", "string", "number"], "userId"),
    ("userId boolean", variant(userId=True), "wrong_type", ["userId", "boolean"], "userId"),
    ("userId object", variant(userId={"id": 1}), "wrong_type", ["userId", "object"], "userId"),
    (
        "anonymousId array",
        variant(anonymousId=["a"]),
        "wrong_type",
        ["anonymousId", "array"],
        "anonymousId",
    ),
    # track event name
    (
        "track without event",
        variant(event=_DROP),
        "wrong_type",
        ["event", "track", "nothing"],
        "event",
    ),
    ("track event empty", variant(event=""), "wrong_type", ["event", "blank"], "event"),
    ("track event null", variant(event=None), "wrong_type", ["event", "null"], "event"),
    ("track event number", variant(event=7), "wrong_type", ["event", "number"], "event"),
    (
        "page name number",
        variant(type="page", name=5),
        "wrong_type",
        ["name", "page", "number"],
        "name",
    ),
    (
        "screen name object",
        variant(type="screen", name={}),
        "wrong_type",
        ["name", "object"],
        "name",
    ),
    # objects
    (
        "properties array",
        variant(properties=[]),
        "wrong_type",
        ["properties must be an object, got array"],
        "properties",
    ),
    (
        "properties string",
        variant(properties="{}"),
        "wrong_type",
        ["properties", "string"],
        "properties",
    ),
    (
        "properties number",
        variant(properties=1),
        "wrong_type",
        ["properties", "number"],
        "properties",
    ),
    ("context array", variant(context=[1]), "wrong_type", ["context", "array"], "context"),
    (
        "traits string",
        variant(type="identify", traits="gold"),
        "wrong_type",
        ["traits", "string"],
        "traits",
    ),
    (
        "context.traits array",
        variant(context={"traits": []}),
        "wrong_type",
        ["context.traits", "array"],
        "context.traits",
    ),
    # timestamp
    ("no timestamp", variant(timestamp=_DROP), "missing_timestamp", ["timestamp"], "timestamp"),
    (
        "null timestamps",
        variant(timestamp=None, originalTimestamp=None),
        "missing_timestamp",
        ["timestamp"],
        "timestamp",
    ),
    # sentAt is when a batch left the device, not when the event happened
    (
        "sentAt only",
        variant(timestamp=_DROP, sentAt="2024-05-01T11:00:00Z"),
        "missing_timestamp",
        ["timestamp"],
        "timestamp",
    ),
    (
        "receivedAt only",
        variant(timestamp=_DROP, receivedAt="2024-05-01T11:00:00Z"),
        "missing_timestamp",
        ["timestamp"],
        "timestamp",
    ),
    (
        "timestamp words",
        variant(timestamp="yesterday"),
        "bad_timestamp",
        ["timestamp", "'yesterday'"],
        "timestamp",
    ),
    ("timestamp empty", variant(timestamp=""), "bad_timestamp", ["timestamp"], "timestamp"),
    (
        "month 13",
        variant(timestamp="2024-13-01T00:00:00Z"),
        "bad_timestamp",
        ["timestamp"],
        "timestamp",
    ),
    (
        "leap second",
        variant(timestamp="2016-12-31T23:59:60Z"),
        "bad_timestamp",
        ["timestamp"],
        "timestamp",
    ),
    (
        "RFC 2822",
        variant(timestamp="Wed, 01 May 2024 11:00:00 GMT"),
        "bad_timestamp",
        ["timestamp"],
        "timestamp",
    ),
    (
        "no offset",
        variant(timestamp="2024-05-01T11:00:00"),
        "bad_timestamp",
        ["timestamp", "UTC offset"],
        "timestamp",
    ),
    (
        "date only",
        variant(timestamp="2024-05-01"),
        "bad_timestamp",
        ["timestamp", "UTC offset"],
        "timestamp",
    ),
    (
        "epoch seconds",
        variant(timestamp=1714561200),
        "bad_timestamp",
        ["timestamp", "epoch seconds"],
        "timestamp",
    ),
    ("epoch zero", variant(timestamp=0), "bad_timestamp", ["timestamp"], "timestamp"),
    # A zero time (Go's time.Time{}): no local time of year 0 exists for quiet hours.
    (
        "year 1",
        variant(timestamp="0001-01-01T00:00:00Z"),
        "bad_timestamp",
        ["timestamp is before 1900-01-01T00:00:00Z", "'0001-01-01T00:00:00Z'"],
        "timestamp",
    ),
    (
        "year 1 ahead of UTC (year 0 in UTC)",
        variant(timestamp="0001-01-01T00:00:00+01:00"),
        "bad_timestamp",
        ["timestamp is before 1900-01-01T00:00:00Z"],
        "timestamp",
    ),
    (
        "original year 1",
        variant(timestamp=_DROP, originalTimestamp="0001-01-01T00:00:00.000Z"),
        "bad_timestamp",
        ["originalTimestamp is before 1900"],
        "originalTimestamp",
    ),
    (
        "just before 1900",
        variant(timestamp="1899-12-31T23:59:59.999Z"),
        "bad_timestamp",
        ["timestamp is before 1900"],
        "timestamp",
    ),
    ("negative epoch", variant(timestamp=-5), "bad_timestamp", ["timestamp"], "timestamp"),
    (
        "epoch ms as float",
        variant(timestamp=1714561200000.0),
        "bad_timestamp",
        ["timestamp", "number"],
        "timestamp",
    ),
    (
        "numeric string",
        variant(timestamp="1714561200000"),
        "bad_timestamp",
        ["timestamp"],
        "timestamp",
    ),
    (
        "timestamp boolean",
        variant(timestamp=True),
        "bad_timestamp",
        ["timestamp", "boolean"],
        "timestamp",
    ),
    (
        "timestamp object",
        variant(timestamp={"s": 1}),
        "bad_timestamp",
        ["timestamp", "object"],
        "timestamp",
    ),
    (
        "bad originalTimestamp",
        variant(timestamp=_DROP, originalTimestamp="soon"),
        "bad_timestamp",
        ["originalTimestamp", "'soon'"],
        "originalTimestamp",
    ),
    # a good originalTimestamp does not rescue a bad timestamp: the producer is broken
    (
        "bad timestamp, good original",
        variant(timestamp="x", originalTimestamp="2024-05-01T11:00:00Z"),
        "bad_timestamp",
        ["timestamp"],
        "timestamp",
    ),
    # clock skew (NOW is 2024-05-01T12:00:00Z, limit one hour)
    (
        "2 h ahead",
        variant(timestamp="2024-05-01T14:00:00Z"),
        "clock_skew",
        ["timestamp", "future", "7200 s"],
        "timestamp",
    ),
    (
        "next year",
        variant(timestamp="2025-05-01T12:00:00Z"),
        "clock_skew",
        ["timestamp", "future"],
        "timestamp",
    ),
    (
        "ahead via offset",
        variant(timestamp="2024-05-01T23:00:00+09:00"),
        "clock_skew",
        ["timestamp"],
        "timestamp",
    ),
    (
        "original ahead",
        variant(timestamp=_DROP, originalTimestamp="2024-05-01T13:00:00.001Z"),
        "clock_skew",
        ["originalTimestamp", "future"],
        "originalTimestamp",
    ),
    ("epoch ms ahead", variant(timestamp=NOW + HOUR + 1), "clock_skew", ["timestamp"], "timestamp"),
    (
        "year 9999",
        variant(timestamp="9999-12-31T23:59:59Z"),
        "clock_skew",
        ["timestamp"],
        "timestamp",
    ),
]


@pytest.mark.parametrize(
    ("value", "reason", "words", "field"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid(value: bytes | None, reason: str, words: list[str], field: str | None) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(value, now_ms=NOW)
    exc = info.value
    assert exc.reason == reason
    assert exc.field == field
    message = str(exc)
    for word in words:
        assert word in message, (word, message)
    # the reason is a label value and a header: never record data in it
    assert exc.reason in REASONS


def test_invalid_cases_cover_every_reason_of_the_parser() -> None:
    assert {case[2] for case in INVALID} == set(PARSE_REASONS)
    # The others are raised when an event is applied to its context (test_context.py),
    # or when Kafka refuses an output of the event (test_engine.py).
    assert set(REASONS) - set(PARSE_REASONS) == {"too_old", "out_of_range", "too_large", "refused"}


def test_reasons_are_the_documented_codes() -> None:
    assert set(REASONS) == {
        "malformed_json",
        "not_an_object",
        "oversize",
        "unknown_type",
        "missing_id",
        "missing_timestamp",
        "bad_timestamp",
        "clock_skew",
        "wrong_type",
        "empty",
        "too_long",
        "too_old",
        "out_of_range",
        "too_large",
        "refused",
    }
    assert len(REASONS) == len(set(REASONS))


def test_the_base_of_the_invalid_variants_is_valid() -> None:
    # otherwise the table above would prove nothing about the field it changes
    event = parse_event(variant(), now_ms=NOW)
    assert event.name == "Product Viewed"


def test_error_messages_are_bounded_even_for_huge_field_values() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(variant(timestamp="9" * 20_000), now_ms=NOW)
    assert info.value.reason == "bad_timestamp"
    assert len(str(info.value)) < 200
    with pytest.raises(InvalidEvent) as info:
        parse_event(variant(type="x" * 20_000), now_ms=NOW)
    assert info.value.reason == "unknown_type"
    assert len(str(info.value)) < 200


# --------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid event of exactly ``size`` bytes."""
    value = variant(properties={"pad": ""})
    value = variant(properties={"pad": "x" * (size - len(value))})
    assert len(value) == size
    return value


def test_oversize_is_rejected_and_the_limit_is_inclusive() -> None:
    assert parse_event(padded(32_768), now_ms=NOW).properties["pad"]
    with pytest.raises(InvalidEvent) as info:
        parse_event(padded(32_769), now_ms=NOW)
    assert info.value.reason == "oversize"
    assert "32769 bytes" in str(info.value) and "32768" in str(info.value)


def test_max_bytes_is_configurable() -> None:
    assert parse_event(padded(1000), max_bytes=1000, now_ms=NOW)
    with pytest.raises(InvalidEvent) as info:
        parse_event(padded(1001), max_bytes=1000, now_ms=NOW)
    assert info.value.reason == "oversize"


def test_huge_payload_is_rejected_by_size_before_parsing() -> None:
    # 20 MB of invalid JSON: if it were parsed, the reason would be malformed_json
    with pytest.raises(InvalidEvent) as info:
        parse_event(b"{" * 20_000_000, now_ms=NOW)
    assert info.value.reason == "oversize"
    assert "20000000 bytes" in str(info.value)


def test_memoryview_and_bytearray_values_are_accepted() -> None:
    value = variant()
    assert parse_event(bytearray(value), now_ms=NOW).message_id == "m-1"
    assert parse_event(memoryview(value), now_ms=NOW).message_id == "m-1"


# --------------------------------------------------------------------------
# Timestamps
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2024-05-01T11:00:00Z", ms(2024, 5, 1, 11)),
        ("2024-05-01T11:00:00+00:00", ms(2024, 5, 1, 11)),
        ("2024-05-01T11:00:00-00:00", ms(2024, 5, 1, 11)),
        ("2024-05-01T16:30:00+05:30", ms(2024, 5, 1, 11)),
        ("2024-05-01T06:00:00-05:00", ms(2024, 5, 1, 11)),
        ("2024-05-01T11:00:00.1Z", ms(2024, 5, 1, 11, 0, 0, 100)),
        ("2024-05-01T11:00:00.123Z", ms(2024, 5, 1, 11, 0, 0, 123)),
        ("2024-05-01T11:00:00.123999Z", ms(2024, 5, 1, 11, 0, 0, 123)),  # floor, not round
        ("2024-05-01T11:00:00.123456789Z", ms(2024, 5, 1, 11, 0, 0, 123)),  # nanoseconds
        ("2024-05-01T11:00:00.999Z", ms(2024, 5, 1, 11, 0, 0, 999)),
        ("2024-05-01T11:00:00.001Z", ms(2024, 5, 1, 11, 0, 0, 1)),
        ("2024-05-01 11:00:00Z", ms(2024, 5, 1, 11)),
        ("2024-05-01t11:00:00z", ms(2024, 5, 1, 11)),  # RFC 3339 allows lower case
        ("2024-05-01T11:00:00.123+0200", ms(2024, 5, 1, 9, 0, 0, 123)),
        ("1999-12-31T23:59:59.999Z", ms(1999, 12, 31, 23, 59, 59, 999)),
        ("1969-12-31T23:59:59.999Z", -1),
        ("1969-12-31T23:59:59.9995Z", -1),  # floor, also before the epoch
        ("1900-01-01T00:00:00Z", ms(1900, 1, 1)),  # the earliest accepted
        ("1900-01-01T01:00:00+01:00", ms(1900, 1, 1)),
        (1714561200123, ms(2024, 5, 1, 11, 0, 0, 123)),
        (100_000_000_000, 100_000_000_000),  # the smallest accepted epoch ms
    ],
)
def test_timestamp_formats(stamp: Any, expected: int) -> None:
    assert parse_event(variant(timestamp=stamp), now_ms=NOW).timestamp_ms == expected


def test_every_millisecond_of_a_second_round_trips() -> None:
    for millis in range(1000):
        stamp = f"2024-05-01T11:00:00.{millis:03d}Z"
        assert parse_event(variant(timestamp=stamp), now_ms=NOW).timestamp_ms == ms(
            2024, 5, 1, 11, 0, 0, millis
        )


def test_timestamp_beats_original_timestamp_and_original_is_the_fallback() -> None:
    both = variant(timestamp="2024-05-01T11:00:00Z", originalTimestamp="2024-05-01T10:00:00Z")
    assert parse_event(both, now_ms=NOW).timestamp_ms == ms(2024, 5, 1, 11)
    original = variant(timestamp=None, originalTimestamp="2024-05-01T10:00:00Z")
    assert parse_event(original, now_ms=NOW).timestamp_ms == ms(2024, 5, 1, 10)
    # sentAt never overrides either
    sent = variant(
        originalTimestamp="2024-05-01T10:00:00Z", timestamp=_DROP, sentAt="2024-05-01T11:30:00Z"
    )
    assert parse_event(sent, now_ms=NOW).timestamp_ms == ms(2024, 5, 1, 10)


@pytest.mark.parametrize(
    ("ahead_ms", "skew_ms", "ok"),
    [
        (0, HOUR, True),
        (HOUR - 1, HOUR, True),
        (HOUR, HOUR, True),  # exactly at the limit is accepted
        (HOUR + 1, HOUR, False),
        (1, 0, False),
        (0, 0, True),
        (5 * 60_000, 60_000, False),
        (-10 * 365 * 24 * HOUR, HOUR, True),  # ten years old: replays are fine
    ],
)
def test_clock_skew_limit(ahead_ms: int, skew_ms: int, ok: bool) -> None:
    value = variant(timestamp=NOW + ahead_ms)
    if ok:
        event = parse_event(value, now_ms=NOW, max_future_skew_ms=skew_ms)
        assert event.timestamp_ms == NOW + ahead_ms
    else:
        with pytest.raises(InvalidEvent) as info:
            parse_event(value, now_ms=NOW, max_future_skew_ms=skew_ms)
        assert info.value.reason == "clock_skew"


def test_now_defaults_to_the_wall_clock() -> None:
    # 2024 is in the past of any clock running this test, so it is accepted...
    assert parse_event(variant()).timestamp_ms == ms(2024, 5, 1, 11)
    # ...and the year 3000 is far in the future of it.
    with pytest.raises(InvalidEvent) as info:
        parse_event(variant(timestamp="3000-01-01T00:00:00Z"))
    assert info.value.reason == "clock_skew"


# --------------------------------------------------------------------------
# Channel
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # explicit, properties.channel first
        ({"properties": {"channel": "email"}}, "email"),
        ({"properties": {"channel": " SMS "}}, "sms"),
        ({"properties": {"channel": "Push"}}, "push"),
        ({"properties": {"channel": "call_centre"}}, "call_centre"),
        ({"properties": {"channel": "Call_Center"}}, "call_centre"),
        ({"properties": {"channel": "store"}}, "store"),
        ({"properties": {"channel": "service"}}, "service"),
        ({"properties": {"channel": "store"}, "channel": "web"}, "store"),
        ({"properties": {"channel": "store"}, "context": {"channel": "web"}}, "store"),
        # unknown or non-string explicit values are skipped, not trusted
        ({"properties": {"channel": "facebook"}, "channel": "web"}, "web"),
        ({"properties": {"channel": 5}, "context": {"channel": "push"}}, "push"),
        ({"properties": {"channel": "facebook"}}, "server"),
        # top-level (RudderStack, Segment)
        ({"channel": "web"}, "web"),
        ({"channel": "mobile"}, "app"),
        ({"channel": "MOBILE"}, "app"),
        ({"channel": "server", "context": {"page": {"path": "/"}}}, "server"),
        ({"channel": "browser"}, "web"),
        ({"channel": "client", "context": {"os": {"name": "iOS"}}}, "app"),
        ({"channel": "sources"}, "server"),
        ({"channel": "web", "context": {"channel": "sms"}}, "web"),
        # context.channel
        ({"context": {"channel": "App"}}, "app"),
        ({"context": {"channel": "mobile"}}, "app"),
        # inferred from the context
        ({"context": {"app": {"name": "Shop"}}}, "app"),
        ({"context": {"os": {"name": "Android"}}}, "app"),
        ({"context": {"device": {"model": "Pixel"}}}, "app"),
        ({"context": {"app": {}, "os": None}}, "server"),  # present but empty says nothing
        ({"context": {"page": {"path": "/"}}}, "web"),
        ({"context": {"app": {"name": "Shop"}, "page": {"path": "/"}}}, "app"),
        ({"type": "page", "event": _DROP}, "web"),
        ({"type": "screen", "event": _DROP}, "app"),
        ({"type": "screen", "event": _DROP, "context": {"page": {"path": "/"}}}, "app"),
        ({"type": "identify"}, "server"),
        ({"context": {}}, "server"),
        ({"context": _DROP}, "server"),
    ],
)
def test_channel(changes: dict[str, Any], expected: str) -> None:
    assert parse_event(variant(**changes), now_ms=NOW).channel == expected


def test_every_channel_value_is_known() -> None:
    assert {
        "web",
        "app",
        "email",
        "sms",
        "push",
        "call_centre",
        "store",
        "service",
        "server",
    } == CHANNELS
    for channel in CHANNELS:
        assert derive_channel("track", {"channel": channel.upper()}, None, {}) == channel


def test_derive_channel_directly() -> None:
    assert derive_channel("track", {}, "mobile", {}) == "app"
    assert derive_channel("page", {}, None, {}) == "web"
    assert derive_channel("alias", {}, None, {"library": {"name": "x"}}) == "server"


# --------------------------------------------------------------------------
# InvalidEvent
# --------------------------------------------------------------------------


def test_invalid_event_is_a_value_error_with_reason_and_field() -> None:
    exc = InvalidEvent("wrong_type", "properties must be an object, got array", field="properties")
    assert isinstance(exc, ValueError)
    assert (exc.reason, exc.field, str(exc)) == (
        "wrong_type",
        "properties",
        "properties must be an object, got array",
    )


def test_invalid_event_refuses_an_unknown_reason() -> None:
    with pytest.raises(ValueError, match="unknown InvalidEvent reason 'typo'"):
        InvalidEvent("typo", "x")


def test_invalid_event_pickles() -> None:
    exc = InvalidEvent("clock_skew", "timestamp is 9 s in the future", field="timestamp")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is InvalidEvent
    assert (back.reason, back.field, str(back)) == (exc.reason, exc.field, str(exc))


def test_malformed_json_is_not_chained_to_the_decoder_error() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(b"{", now_ms=NOW)
    # DLQ and logs show one clear error, not a decoder traceback
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --------------------------------------------------------------------------
# Package surface and docs
# --------------------------------------------------------------------------


def test_public_names_are_exported() -> None:
    for name in (
        "Event",
        "InvalidEvent",
        "parse_event",
        "REASONS",
        "CHANNELS",
        "derive_channel",
        "DeadLetter",
        "dead_letter",
        "dead_letter_headers",
    ):
        assert name in rtim.events.__all__
        assert hasattr(rtim.events, name)
