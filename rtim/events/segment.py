"""Parse and validate one clickstream record in the Segment spec.

A record's value is one Segment (or RudderStack) call serialised as JSON:
``page``, ``screen``, ``track``, ``identify``, ``group`` or ``alias``. The
parser turns it into an :class:`Event` or raises :class:`InvalidEvent` with a
short, stable ``reason`` code (used as a Prometheus label value and as the
``rtim.errors.reason`` dead-letter header) and a message naming the field.

Decisions, where the spec leaves room
-------------------------------------
Event time
    ``timestamp``, else ``originalTimestamp``. Segment's tracking API sets
    ``timestamp`` (the client time corrected for clock skew) on every event it
    forwards; RudderStack SDKs send only ``originalTimestamp`` (the client
    clock). ``sentAt`` is *not* used: it is when a batch left the device, which
    for an offline mobile client can be hours after the event happened, and
    using it would silently move events in time. The first of the two fields
    that is present and not ``null`` is the one used; a bad ``timestamp`` is not
    rescued by a good ``originalTimestamp``, because the producer is broken.
Timestamp formats
    An ISO-8601 / RFC 3339 string with ``Z`` or an offset, any number of
    fractional digits (beyond microseconds they are truncated). A string with no
    offset is rejected (``bad_timestamp``): its time zone is a guess, and a
    wrong guess shifts the event by hours; so is one before 1900 (a zero time
    such as ``0001-01-01T00:00:00Z``, not an event's). A JSON integer is accepted as epoch
    *milliseconds*, as custom producers often send ``Date.now()``; an integer
    below ``10**11`` (before 1973-03-03 as milliseconds) is rejected as it is
    almost certainly epoch *seconds*. Floats and booleans are rejected.
Identity
    ``customer_id`` is ``userId`` if present, else ``anonymousId``. An integer
    id is converted to its decimal string, as the Segment server libraries do
    (``analytics-python``'s ``stringify_id``), so that ``42`` and ``"42"`` are
    the same customer. ``null``, ``""`` and blank strings count as absent
    (analytics.js sends ``"userId": null`` for anonymous visitors). Any other
    type (float, boolean, object, array) is ``wrong_type``: falling back to
    the other id would file the event under a different customer. An id longer
    than :data:`MAX_CUSTOMER_ID_CHARS` is ``too_long`` (it keys and is stored in
    the customer's context, which has a size budget).
    ``messageId`` must be a non-blank string (``missing_id`` otherwise).
Channel
    See :func:`derive_channel`.
Traits
    The top-level ``traits`` (identify, group) merged over ``context.traits``
    (where analytics.js puts the user's traits on every other call); top-level
    wins on a conflict.
Not checked
    ``alias.previousId`` and ``group.groupId`` are not required: the context
    model does not use them, and they stay available in :attr:`Event.raw`.

Speed: this runs on every record (>20k events/s per core), so the checks are
``type(x) is ...`` tests and dict look-ups; the only non-trivial work besides
``orjson.loads`` is one ``datetime.fromisoformat`` call.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

from rtim.names import EVENT_CHANNELS
from rtim.settings import DEFAULTS

__all__ = [
    "CHANNELS",
    "EVENT_TYPES",
    "MAX_CUSTOMER_ID_CHARS",
    "PARSE_REASONS",
    "REASONS",
    "Event",
    "InvalidEvent",
    "customer_key",
    "derive_channel",
    "parse_event",
]

#: Every ``InvalidEvent.reason``; pre-register these as metric label values.
REASONS: tuple[str, ...] = (
    "empty",
    "oversize",
    "malformed_json",
    "not_an_object",
    "unknown_type",
    "missing_id",
    "wrong_type",
    "missing_timestamp",
    "bad_timestamp",
    "clock_skew",
    "too_long",
    # Raised by rtim.context.model when an event cannot be applied to its
    # customer's context (see apply_event) or would make it too large.
    "too_old",
    "out_of_range",
    "too_large",
    # Set by rtim.engine when Kafka refuses an output of the event (a record
    # over the topic's size limit, or otherwise invalid to the broker).
    "refused",
)
#: The reasons :func:`parse_event` raises (the others are raised when an event
#: is applied to its customer's context).
PARSE_REASONS: tuple[str, ...] = REASONS[: REASONS.index("too_long") + 1]
_REASON_SET = frozenset(REASONS)

#: The Segment call types.
EVENT_TYPES: frozenset[str] = frozenset({"page", "screen", "track", "identify", "group", "alias"})

#: Every value :attr:`Event.channel` can take.
CHANNELS: frozenset[str] = EVENT_CHANNELS

# Explicit channel values (lower-cased, stripped) -> channel. Values not listed
# here (Segment's "client", RudderStack's "sources", a campaign name...) are
# ignored and the channel is inferred from the context instead.
_CHANNEL_ALIASES: dict[str, str] = {c: c for c in CHANNELS}
_CHANNEL_ALIASES.update(
    {
        "mobile": "app",  # RudderStack mobile SDKs
        "browser": "web",  # Segment's top-level channel for analytics.js
        "call_center": "call_centre",
        "callcentre": "call_centre",
        "callcenter": "call_centre",
    }
)

#: Longest customer id (``userId`` or ``anonymousId``) accepted; the id is the
#: context's key and is stored in it, so it must be bounded (``too_long``).
MAX_CUSTOMER_ID_CHARS = 256

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
# 10**11 ms is 1973-03-03; 10**11 s is the year 5138. Below it, an integer is
# far more likely to be epoch seconds than a real 1970s event.
_MIN_EPOCH_MS = 10**11
# ISO times before this are refused: no event is that old, and a zero time (Go's
# 0001-01-01T00:00:00Z) is a producer's bug; nor could every time zone show them.
_MIN_ISO_TEXT = "1900-01-01T00:00:00Z"
_MIN_ISO_MS = (datetime.fromisoformat(_MIN_ISO_TEXT) - _EPOCH) // _ONE_MS

# JSON names for Python types, for messages read by producers in any language.
_JSON_TYPE_NAMES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _got(obj: dict[str, Any], key: str) -> str:
    """Describe what ``obj[key]`` holds, for error messages."""
    if key not in obj:
        return "nothing"
    value = obj[key]
    if type(value) is str:
        return "a blank string"
    return _json_type(value)


class InvalidEvent(ValueError):
    """A record that is not a valid Segment call.

    Parameters
    ----------
    reason : str
        Stable snake_case code, one of :data:`REASONS`. It is a Prometheus
        label value, so it never contains data from the record.
    message : str
        Human explanation naming the offending field; ``str(exc)`` returns it.
    field : str or None
        The JSON field at fault (``"properties"``, ``"context.traits"``...),
        or None when the whole record is at fault.
    """

    __slots__ = ("field", "reason")

    def __init__(self, reason: str, message: str, *, field: str | None = None) -> None:
        # A typo here would create a new label value (and a new DLQ header
        # value) that no dashboard knows about: fail loudly instead.
        if reason not in _REASON_SET:
            raise ValueError(f"unknown InvalidEvent reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call InvalidEvent(message) and fail.
        return (_rebuild_invalid_event, (self.reason, str(self), self.field))


def _rebuild_invalid_event(reason: str, message: str, field: str | None) -> InvalidEvent:
    return InvalidEvent(reason, message, field=field)


class Event(NamedTuple):
    """One validated Segment call (immutable; a named tuple, as it is built
    for every record: about 0.2 us against 1 us for a frozen dataclass).

    The dicts are the ones inside :attr:`raw` (no copies, for speed): treat
    them as read-only.

    Attributes
    ----------
    type : str
        ``page``, ``screen``, ``track``, ``identify``, ``group`` or ``alias``.
    message_id : str
        The producer's ``messageId`` (for duplicate suppression).
    customer_id : str
        ``user_id`` if present, else ``anonymous_id``.
    user_id, anonymous_id : str or None
        ``userId`` and ``anonymousId``, integers converted to strings.
    name : str or None
        ``event`` for track, ``name`` for page and screen (may be None), None
        for the other types.
    properties, traits, context : dict
        ``properties``, ``traits`` (merged over ``context.traits``) and
        ``context``; empty when absent.
    timestamp_ms : int
        Event time, epoch milliseconds (``timestamp``, else
        ``originalTimestamp``).
    channel : str
        One of :data:`CHANNELS`, see :func:`derive_channel`.
    raw : dict
        The whole parsed JSON object.
    """

    type: str
    message_id: str
    customer_id: str
    user_id: str | None
    anonymous_id: str | None
    name: str | None
    properties: dict[str, Any]
    traits: dict[str, Any]
    context: dict[str, Any]
    timestamp_ms: int
    channel: str
    raw: dict[str, Any]


# Events are built with tuple.__new__ directly: Event(...) would add a
# Python-level __new__ call for every record.
_new_tuple = tuple.__new__


def derive_channel(
    event_type: str,
    properties: dict[str, Any],
    top_level: Any,
    context: dict[str, Any],
) -> str:
    """Return the channel an event happened on.

    The first rule that gives an answer wins:

    1. an explicit channel, looked up in this order: ``properties.channel``
       (set by the application for this event, e.g. an e-mail click tracked
       server-side), the top-level ``channel`` (RudderStack; Segment's tracking
       API), then ``context.channel``. A value counts only if, stripped and
       lower-cased, it is one of :data:`CHANNELS` or a known alias
       (``mobile`` -> ``app``, ``browser`` -> ``web``, ``call_center`` ->
       ``call_centre``); other values (``client``, ``sources``...) say
       nothing about the customer's channel and are skipped;
    2. ``app`` for a ``screen`` call, or when ``context.app``, ``context.os`` or
       ``context.device`` is present and non-empty (mobile SDKs send them);
    3. ``web`` for a ``page`` call, or when ``context.page`` is present and
       non-empty (analytics.js sends it on every call);
    4. ``server`` otherwise (server libraries send only ``context.library``).

    ``screen`` is checked before ``context.page`` because a screen call is by
    definition made from an app, whatever page context its SDK attached.

    Examples
    --------
    >>> derive_channel("track", {"channel": "SMS"}, "web", {})
    'sms'
    >>> derive_channel("track", {}, "mobile", {})
    'app'
    >>> derive_channel("track", {}, None, {"page": {"path": "/"}})
    'web'
    """
    for value in (properties.get("channel"), top_level, context.get("channel")):
        if type(value) is str:
            # Most producers send a canonical value: look it up as it is first.
            channel = _CHANNEL_ALIASES.get(value) or _CHANNEL_ALIASES.get(value.strip().lower())
            if channel is not None:
                return channel
    if event_type == "screen" or context.get("app") or context.get("os") or context.get("device"):
        return "app"
    if event_type == "page" or context.get("page"):
        return "web"
    return "server"


def _identity(obj: dict[str, Any], field: str) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    kind = type(value)
    if kind is str:
        return None if not value or value.isspace() else value
    if kind is int:  # bool is excluded: type(True) is bool, not int
        return str(value)
    raise InvalidEvent(
        "wrong_type",
        f"{field} must be a string, got {_json_type(value)}",
        field=field,
    )


def _identities(obj: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(customer id, userId, anonymousId): the identity rule (module docstring)."""
    # The common cases inline (a non-blank string, or absent); _identity has the rest.
    user_id = obj.get("userId")
    if user_id is not None and (type(user_id) is not str or not user_id or user_id.isspace()):
        user_id = _identity(obj, "userId")
    anonymous_id = obj.get("anonymousId")
    if anonymous_id is not None and (
        type(anonymous_id) is not str or not anonymous_id or anonymous_id.isspace()
    ):
        anonymous_id = _identity(obj, "anonymousId")
    if user_id is not None:
        customer_id, field = user_id, "userId"
    elif anonymous_id is not None:
        customer_id, field = anonymous_id, "anonymousId"
    else:
        raise InvalidEvent(
            "missing_id", "userId or anonymousId is required (both absent or empty)", field="userId"
        )
    if len(customer_id) > MAX_CUSTOMER_ID_CHARS:
        raise InvalidEvent(
            "too_long",
            f"{field} is {len(customer_id)} characters long, over the limit of "
            f"{MAX_CUSTOMER_ID_CHARS}",
            field=field,
        )
    return customer_id, user_id, anonymous_id


def customer_key(event: dict[str, Any]) -> str:
    """The customer id of a Segment call, which is also its Kafka key.

    ``userId``, else ``anonymousId``; integers as decimal strings (see the
    module docstring). Producers key records with it so that all of a
    customer's events land on one partition, in order.

    >>> customer_key({"userId": 42, "anonymousId": "a-7"}), customer_key({"anonymousId": "a-7"})
    ('42', 'a-7')

    Raises
    ------
    InvalidEvent
        ``missing_id`` if neither id is there, ``wrong_type`` for an id that
        is neither a string nor an integer.
    """
    return _identities(event)[0]


def _object(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        # Absent or null: some SDKs send "properties": null. A fresh dict, so
        # that no two events ever share a mutable default.
        return {}
    if type(value) is not dict:
        raise InvalidEvent(
            "wrong_type", f"{where} must be an object, got {_json_type(value)}", field=where
        )
    return value


def _timestamp_ms(value: Any, field: str) -> int:
    kind = type(value)
    if kind is str:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            # RFC 3339 allows a lower-case "t" and "z", fromisoformat does not.
            # Retried only on the error path, so the fast path pays nothing.
            try:
                parsed = datetime.fromisoformat(value.upper())
            except ValueError:
                raise InvalidEvent(
                    "bad_timestamp",
                    f"{field} is not an ISO-8601 timestamp: {value[:64]!r}",
                    field=field,
                ) from None
        if parsed.tzinfo is None:
            raise InvalidEvent(
                "bad_timestamp",
                f"{field} has no UTC offset (add 'Z' or '+hh:mm'): {value[:64]!r}",
                field=field,
            )
        # timedelta // timedelta is exact integer arithmetic and floors; the
        # float route int(parsed.timestamp() * 1000) truncates toward zero, so
        # it is a millisecond late for a sub-millisecond time before 1970.
        ms = (parsed - _EPOCH) // _ONE_MS
        if ms < _MIN_ISO_MS:
            # One comparison: the subtraction cannot fail, whatever the year, but
            # local times (quiet hours) of year 1 or 0 can.
            raise InvalidEvent(
                "bad_timestamp",
                f"{field} is before {_MIN_ISO_TEXT}, a default or zero time rather than "
                f"an event's: {value[:64]!r}",
                field=field,
            )
        return ms
    if kind is int:
        if value < _MIN_EPOCH_MS:
            raise InvalidEvent(
                "bad_timestamp",
                f"{field} {value} is too small for epoch milliseconds (epoch seconds?)",
                field=field,
            )
        return int(value)
    raise InvalidEvent(
        "bad_timestamp",
        f"{field} must be an ISO-8601 string or epoch milliseconds, got {_json_type(value)}",
        field=field,
    )


def parse_event(
    value: bytes | None,
    *,
    max_bytes: int = DEFAULTS.max_event_bytes,
    now_ms: int | None = None,
    max_future_skew_ms: int = int(DEFAULTS.max_future_skew_s * 1000),
) -> Event:
    """Parse and validate one record value as a Segment call.

    Parameters
    ----------
    value : bytes or None
        The record value (UTF-8 JSON). None is a Kafka tombstone.
    max_bytes : int
        Larger values are rejected (``oversize``) before being parsed, so a
        huge record costs nothing but its length check.
    now_ms : int or None
        The current time in epoch milliseconds; None reads the wall clock.
        Pass it explicitly to validate a batch against one clock reading.
    max_future_skew_ms : int
        Events stamped more than this after ``now_ms`` are rejected
        (``clock_skew``). Events in the past are always accepted (replays,
        offline mobile clients).

    Returns
    -------
    Event
        The validated event.

    Raises
    ------
    InvalidEvent
        With ``reason`` one of :data:`REASONS`. The checks run in about the
        order of that tuple and the first one failed is the reason, so a record
        always gets one reason, and the same one every time.

    Examples
    --------
    >>> e = parse_event(
    ...     b'{"type": "track", "event": "Product Added", "messageId": "m-1",'
    ...     b' "anonymousId": "a-7", "properties": {"price": 9.5},'
    ...     b' "context": {"page": {"path": "/shoes"}},'
    ...     b' "timestamp": "2024-05-01T12:00:00.250Z"}',
    ...     now_ms=1_714_564_800_250,
    ... )
    >>> e.customer_id, e.name, e.channel, e.timestamp_ms
    ('a-7', 'Product Added', 'web', 1714564800250)
    >>> try:
    ...     parse_event(b'{"type": "page", "messageId": "m-2", "userId": "u",'
    ...                 b' "properties": []}')
    ... except InvalidEvent as exc:
    ...     print(exc.reason, "-", exc)
    wrong_type - properties must be an object, got array
    """
    if not value:
        raise InvalidEvent("empty", "record value is empty (null or zero bytes)")
    size = len(value)
    if size > max_bytes:
        raise InvalidEvent(
            "oversize", f"record value is {size} bytes, over the {max_bytes}-byte limit"
        )
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        # orjson's message says where and why (including invalid UTF-8).
        raise InvalidEvent("malformed_json", f"record value is not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise InvalidEvent(
            "not_an_object", f"record value must be a JSON object, got {_json_type(obj)}"
        )

    event_type = obj.get("type")
    if type(event_type) is not str or event_type not in EVENT_TYPES:
        lowered = event_type.strip().lower() if type(event_type) is str else None
        if lowered not in EVENT_TYPES:
            if "type" not in obj:
                shown = "nothing"
            elif type(event_type) is str:
                shown = repr(event_type[:32])
            else:
                shown = _json_type(event_type)
            raise InvalidEvent(
                "unknown_type",
                f"type must be one of {', '.join(sorted(EVENT_TYPES))}; got {shown}",
                field="type",
            )
        event_type = lowered  # "Track" from a hand-written producer

    message_id = obj.get("messageId")
    if type(message_id) is not str or not message_id or message_id.isspace():
        raise InvalidEvent(
            "missing_id",
            f"messageId must be a non-empty string, got {_got(obj, 'messageId')}",
            field="messageId",
        )
    customer_id, user_id, anonymous_id = _identities(obj)

    if event_type == "track":
        name = obj.get("event")
        if type(name) is not str or not name or name.isspace():
            raise InvalidEvent(
                "wrong_type",
                f"event must be a non-empty string in a track call, got {_got(obj, 'event')}",
                field="event",
            )
    elif event_type == "page" or event_type == "screen":
        name = obj.get("name")
        if name is not None and type(name) is not str:
            raise InvalidEvent(
                "wrong_type",
                f"name must be a string in a {event_type} call, got {_json_type(name)}",
                field="name",
            )
    else:
        name = None

    properties = obj.get("properties")
    context = obj.get("context")
    if type(properties) is not dict or type(context) is not dict:
        # Absent, null or wrong: _object has the rules (the common case skips it).
        properties = _object(obj, "properties", "properties")
        context = _object(obj, "context", "context")
    traits = _object(obj, "traits", "traits")
    context_traits = _object(context, "traits", "context.traits")
    if context_traits:
        traits = {**context_traits, **traits} if traits else context_traits

    ts_field = "timestamp"
    ts_value = obj.get("timestamp")
    if ts_value is None:
        ts_field = "originalTimestamp"
        ts_value = obj.get("originalTimestamp")
        if ts_value is None:
            raise InvalidEvent(
                "missing_timestamp",
                "timestamp (or originalTimestamp) is required",
                field="timestamp",
            )
    timestamp_ms = _timestamp_ms(ts_value, ts_field)
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    if timestamp_ms - now_ms > max_future_skew_ms:
        raise InvalidEvent(
            "clock_skew",
            f"{ts_field} is {(timestamp_ms - now_ms) / 1000:.0f} s in the future "
            f"(limit {max_future_skew_ms / 1000:.0f} s)",
            field=ts_field,
        )

    return _new_tuple(
        Event,
        (
            event_type,
            message_id,
            customer_id,
            user_id,
            anonymous_id,
            name,
            properties,
            traits,
            context,
            timestamp_ms,
            derive_channel(event_type, properties, obj.get("channel"), context),
            obj,
        ),
    )
