"""Decision requests: what ``POST /v1/decide`` (or ``GET``) asks, checked, and what it answers.

A request asks for the next best actions for one customer on one channel, at
an optional placement (the catalog's ``placements``). It is decided like a
decision moment of the clickstream (:func:`rtim.decide.arbitrate.decide`) on an
event of type ``request``: conditions see the placement as ``event.name`` and
the request's ``context`` attributes as ``event.properties`` (so
``event.properties.page == "/checkout"`` holds for a request made with
``"context": {"page": "/checkout"}``), and the customer's context as for any
event.

Examples
--------
>>> req = parse_request(b'{"customer_id": "u1", "channel": "web"}', now_ms=1000)
>>> req.customer_id, req.channel, req.limit, req.timestamp_ms
('u1', 'web', 1, 1000)
>>> parse_request(b'{"channel": "web"}', now_ms=0)
Traceback (most recent call last):
...
rtim.decide.request.InvalidRequest: customer_id: required (the userId or anonymousId)
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from rtim.events.segment import MAX_CUSTOMER_ID_CHARS
from rtim.names import OFFER_CHANNELS

#: The most actions one request may ask for.
MAX_LIMIT = 10
#: The most bytes a request body may have.
MAX_REQUEST_BYTES = 16_384
#: The most attributes a request's context may carry.
MAX_CONTEXT_ATTRIBUTES = 32
#: Request ids for requests without one: unique, not secret (os.urandom, which uuid4 reads,
#: is a system call per id, a noticeable part of a request on some virtual machines).
_IDS = random.Random()
#: A query parameter naming a request attribute (``context.page=/checkout``).
_CONTEXT_PREFIX = "context."
_FIELDS = {"customer_id", "channel", "placement", "timestamp", "limit", "context", "request_id"}


class InvalidRequest(ValueError):
    """A request that cannot be decided; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def as_json(self) -> dict[str, str]:
        return {"error": "invalid_request", "field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class DecideRequest:
    """One checked request."""

    customer_id: str
    channel: str
    #: Event time of the request, epoch ms.
    timestamp_ms: int
    placement: str | None = None
    limit: int = 1
    #: Attributes of the request conditions may read (``event.properties.*``).
    context: dict[str, Any] = field(default_factory=dict)
    #: The request's id (the decision id is derived from it); a fresh one if not given.
    request_id: str = ""


def parse_request(
    body: bytes, *, now_ms: int, max_future_skew_ms: int = 3_600_000
) -> DecideRequest:
    """Check a request body; raises :class:`InvalidRequest` naming the first bad field."""
    if len(body) > MAX_REQUEST_BYTES:
        raise InvalidRequest("body", f"longer than {MAX_REQUEST_BYTES} bytes")
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("body", f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("body", "must be a JSON object")
    return check_request(raw, now_ms=now_ms, max_future_skew_ms=max_future_skew_ms)


def parse_query(
    query: Iterable[tuple[str, str]], *, now_ms: int, max_future_skew_ms: int = 3_600_000
) -> DecideRequest:
    """Check a request given as query parameters (``GET /v1/decide?customer_id=...``):
    the same fields as a body's, ``limit`` a number, and each request attribute of
    ``context`` as ``context.NAME=VALUE`` (a string).

    >>> req = parse_query(
    ...     [("customer_id", "u1"), ("channel", "web"), ("limit", "2"), ("context.page", "/")],
    ...     now_ms=1000,
    ... )
    >>> req.limit, req.context
    (2, {'page': '/'})
    >>> parse_query([("customer_id", "u1"), ("channel", "web"), ("limit", "two")], now_ms=0)
    Traceback (most recent call last):
    ...
    rtim.decide.request.InvalidRequest: limit: must be an integer from 1 to 10
    """
    raw: dict[str, Any] = {}
    context: dict[str, str] = {}
    for name, value in query:
        if name.startswith(_CONTEXT_PREFIX):
            attribute = name[len(_CONTEXT_PREFIX) :]
            if not attribute:
                raise InvalidRequest(name, "a request attribute needs a name: context.NAME=VALUE")
            into, field_name = context, attribute
        elif name == "context":
            raise InvalidRequest(name, "give each request attribute as context.NAME=VALUE")
        else:
            into, field_name = raw, name
        if field_name in into:
            raise InvalidRequest(name, "given more than once")
        into[field_name] = value
    limit = raw.get("limit")
    if limit is not None:
        # (Bounded before int(): Python refuses to convert over 4,300 digits.)
        if not (limit.isascii() and limit.isdigit()) or len(limit) > 8:
            raise InvalidRequest("limit", f"must be an integer from 1 to {MAX_LIMIT}")
        raw["limit"] = int(limit)
    if context:
        raw["context"] = context
    return check_request(raw, now_ms=now_ms, max_future_skew_ms=max_future_skew_ms)


def check_request(
    raw: dict[str, Any], *, now_ms: int, max_future_skew_ms: int = 3_600_000
) -> DecideRequest:
    """Check a request's fields, however they came; raises :class:`InvalidRequest`
    naming the first bad field.

    A request's ``timestamp`` is when a channel asks, so it must be within
    ``max_future_skew_ms`` (``RTIM_MAX_FUTURE_SKEW_S``) of ``now_ms`` either way: a
    request backdated further would be decided against caps, cool-downs and quiet hours
    of another time.
    """
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field; known: {sorted(_FIELDS)}")
    customer = check_customer_id(raw.get("customer_id"))
    channel = raw.get("channel")
    if channel is None:
        raise InvalidRequest("channel", f"required, one of {sorted(OFFER_CHANNELS)}")
    if type(channel) is not str:  # a list or an object is not hashable: no `in` test on it
        raise InvalidRequest(
            "channel",
            f"must be a string, one of {sorted(OFFER_CHANNELS)}; got {_json_type(channel)}",
        )
    if channel not in OFFER_CHANNELS:
        raise InvalidRequest("channel", f"{channel!r} is not one of {sorted(OFFER_CHANNELS)}")
    placement = raw.get("placement")
    if placement is not None and (not isinstance(placement, str) or not placement):
        raise InvalidRequest("placement", "must be a placement id (a non-empty string)")
    at_ms = _timestamp_ms(raw.get("timestamp"), now_ms)
    if not -max_future_skew_ms <= at_ms - now_ms <= max_future_skew_ms:
        raise InvalidRequest("timestamp", _off_the_clock(at_ms - now_ms, max_future_skew_ms))
    limit = raw.get("limit", 1)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    context = raw.get("context")
    if context is None:
        context = {}
    elif not isinstance(context, dict):
        raise InvalidRequest("context", "must be a JSON object of request attributes")
    if len(context) > MAX_CONTEXT_ATTRIBUTES:
        raise InvalidRequest("context", f"more than {MAX_CONTEXT_ATTRIBUTES} attributes")
    request_id = raw.get("request_id")
    if request_id is None:
        request_id = f"{_IDS.getrandbits(128):032x}"
    elif not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
        raise InvalidRequest("request_id", "must be a string of 1 to 128 characters")
    return DecideRequest(
        customer_id=customer,
        channel=channel,
        timestamp_ms=at_ms,
        placement=placement,
        limit=limit,
        context=context,
        request_id=request_id,
    )


def _timestamp_ms(value: Any, now_ms: int) -> int:
    if value is None:
        return now_ms
    if not isinstance(value, str):
        raise InvalidRequest("timestamp", "must be an ISO 8601 string")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("timestamp", f"not an ISO 8601 time: {value[:64]!r}") from None
    if moment.tzinfo is None:
        # As the clickstream's events (rtim.events.segment): a local time of no known zone.
        raise InvalidRequest(
            "timestamp", f"has no UTC offset (add 'Z' or '+hh:mm'): {value[:64]!r}"
        )
    return int(moment.timestamp() * 1000)


def check_customer_id(customer: Any) -> str:
    """A request's customer id (``userId`` or ``anonymousId``), as the clickstream takes
    them; raises :class:`InvalidRequest` on ``customer_id`` otherwise."""
    if customer is None:
        raise InvalidRequest("customer_id", "required (the userId or anonymousId)")
    if isinstance(customer, int) and not isinstance(customer, bool):
        customer = str(customer)  # as Segment ids may be numbers
    if not isinstance(customer, str) or not customer.strip():
        raise InvalidRequest("customer_id", "must be a non-empty string")
    if len(customer) > MAX_CUSTOMER_ID_CHARS:
        raise InvalidRequest("customer_id", f"longer than {MAX_CUSTOMER_ID_CHARS} characters")
    return customer


def _off_the_clock(ahead_ms: int, max_skew_ms: int) -> str:
    """Why a request's time is refused: how far off the clock it is, and the allowance."""
    off_s = abs(ahead_ms) / 1000
    if off_s < 120:
        off = f"{off_s:.0f} s"
    elif off_s < 7200:
        off = f"{off_s / 60:.0f} min"
    elif off_s < 2 * 86_400:
        off = f"{off_s / 3600:.0f} h"
    else:
        off = f"{off_s / 86_400:,.0f} days"
    return (
        f"timestamp is {off} {'after' if ahead_ms > 0 else 'before'} now (requests may be "
        f"at most {max_skew_ms / 1000:.0f} s off the worker's clock: RTIM_MAX_FUTURE_SKEW_S)"
    )


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
