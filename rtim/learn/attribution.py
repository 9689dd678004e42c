"""Attribution: joining channel responses to decisions, on event time.

Plain data in, plain data out: no Kafka, no asyncio. One :class:`Attributor`
holds the open decisions of one partition (the worker that owns a customer's
partition owns its decisions and receives its responses, the topics being
co-partitioned).

- A decision is *pending* from the moment it is made until its attribution
  window ends (``window_end_ms``, event time).
- A ``conversion`` within the window makes it a **positive** example, learned
  at once; the decision is then closed.
- A ``dismissal`` within the window makes it a **negative** example at once:
  the customer said no, so the window would end without a conversion, and a
  negative learned minutes rather than a window after the decision is what
  makes a poor or new offer's optimism fade before its first windows end. A
  conversion reported after it is ``late``.
- A window that ends without a conversion makes it a **negative** example,
  even if no response at all ever came. Windows end on the partition's
  *stream time*, the highest event time seen on it (decisions, responses and
  clickstream events alike, see :meth:`Attributor.observe`), so a replay at
  any speed closes the same windows as the live run. A partition that
  receives nothing for ``idle_ms`` of wall-clock time has its stream time
  carried forward by the wall-clock time since (:meth:`Attributor.tick`), so
  windows still close when traffic stops.
- Every response gets one join result: ``joined`` (an open decision's
  response, in its window), ``late`` (after the window ended, or after the
  decision was closed), ``unknown`` (no such decision on this partition, or
  one of another customer),
  ``duplicate`` (the same outcome for the same decision again). Only a joined
  conversion or dismissal is learned; nothing is learned twice.

Budgets
-------
A customer has at most :data:`MAX_PENDING_PER_CUSTOMER` open decisions; a
new one beyond closes the customer's oldest at once as a negative example
(its window cut short, counted as ``evicted``), so memory per customer is
bounded whatever the rate of decisions. Closed decisions are remembered
(their id and the outcomes seen) for :data:`CLOSED_MEMORY_MS` of stream time
after their window end, at most :data:`MAX_CLOSED_PER_CUSTOMER` per customer,
so that a late or repeated response is told from one for a decision never
made; after that it counts as ``unknown``.
"""

from __future__ import annotations

import datetime as dt
import heapq
import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any

import orjson

from rtim.learn.models import POOLED
from rtim.settings import DEFAULTS

#: Outcomes a channel system may report.
OUTCOMES = ("impression", "click", "conversion", "dismissal")
#: Join results (metric label values).
JOIN_RESULTS = ("joined", "late", "unknown", "duplicate", "early")
#: How long before its decision a response may be stamped and still join it: channel
#: systems' clocks and the clickstream's differ by seconds; a response stamped earlier
#: than this cannot be the decision's effect (``early``: counted, not learned).
EARLY_TOLERANCE_MS = 60_000
#: Why a response is refused (metric label and dead-letter reason values; those a
#: clickstream record can have too are named as for clickstream records).
RESPONSE_REASONS = (
    "oversize",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "unknown_outcome",
    "bad_timestamp",
    "clock_skew",
    "out_of_range",
)
MAX_RESPONSE_BYTES = 4096
MAX_ID_CHARS = 256
MAX_PENDING_PER_CUSTOMER = 16
MAX_CLOSED_PER_CUSTOMER = 32
CLOSED_MEMORY_MS = 24 * 3600 * 1000
#: Wall-clock time without any record after which a partition's stream time
#: moves on with the wall clock (``RTIM_IDLE_CLOSE_S``).
DEFAULT_IDLE_MS = int(DEFAULTS.idle_close_s * 1000)


class InvalidResponse(ValueError):
    """A response record that cannot be used; ``reason`` is one of RESPONSE_REASONS."""

    def __init__(self, reason: str, message: str, *, field: str | None = None) -> None:
        if reason not in RESPONSE_REASONS:
            raise ValueError(f"unknown InvalidResponse reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.field = field


@dataclass(frozen=True, slots=True)
class Response:
    decision_id: str
    customer_id: str
    outcome: str
    timestamp_ms: int
    value: float | None = None
    #: Which action of a decision it is about (a decision request answered with several
    #: actions); None: the decision's first, the one a trigger's decision has.
    offer_id: str | None = None


def _timestamp_ms(raw: Any) -> int:
    if not isinstance(raw, str):
        raise InvalidResponse(
            "bad_timestamp", "timestamp must be an ISO 8601 string", field="timestamp"
        )
    text = raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidResponse(
            "bad_timestamp", f"timestamp is not ISO 8601: {raw[:64]!r}", field="timestamp"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def load_object(raw: bytes | str, max_bytes: int, what: str) -> dict[str, Any]:
    """A JSON object of at most ``max_bytes`` read from ``rtim.responses`` (``what`` it
    should be); raises :class:`InvalidResponse` otherwise."""
    if len(raw) > max_bytes:
        raise InvalidResponse("oversize", f"{what} is over {max_bytes} bytes")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidResponse("malformed_json", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidResponse("not_an_object", f"{what} must be a JSON object")
    return data


def parse_response(raw: bytes | str | dict[str, Any]) -> Response:
    """Validate one response record; raises :class:`InvalidResponse` with its reason.

    >>> parse_response(b'{"decision_id": "d", "customer_id": "c", "outcome": "click",'
    ...                b' "timestamp": "2026-01-01T00:00:00Z"}').timestamp_ms
    1767225600000
    """
    data = (
        load_object(raw, MAX_RESPONSE_BYTES, "a response") if isinstance(raw, (bytes, str)) else raw
    )
    if not isinstance(data, dict):
        raise InvalidResponse("not_an_object", "a response must be a JSON object")
    for name in ("decision_id", "customer_id", "outcome", "timestamp"):
        if name not in data or data[name] is None:
            raise InvalidResponse("missing_field", f"'{name}' is missing", field=name)
    for name in ("decision_id", "customer_id", "offer_id"):
        value = data.get(name)
        if name == "offer_id" and value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
            raise InvalidResponse(
                "wrong_type",
                f"'{name}' must be a string of 1-{MAX_ID_CHARS} characters",
                field=name,
            )
    outcome = data["outcome"]
    if outcome not in OUTCOMES:
        raise InvalidResponse(
            "unknown_outcome",
            f"outcome {str(outcome)[:32]!r} is not one of {list(OUTCOMES)}",
            field="outcome",
        )
    value = data.get("value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidResponse("wrong_type", "'value' must be a number", field="value")
        if not math.isfinite(value) or abs(value) > 1e12:
            raise InvalidResponse("out_of_range", "'value' is out of range", field="value")
        value = float(value)
    return Response(
        data["decision_id"],
        data["customer_id"],
        outcome,
        _timestamp_ms(data["timestamp"]),
        value,
        data.get("offer_id"),
    )


@dataclass(slots=True)
class Pending:
    """A decision waiting for its outcome."""

    decision_id: str
    customer_id: str
    offer_id: str
    features: Sequence[str]
    decided_ms: int
    window_end_ms: int
    #: Outcomes already seen (none for a decision just made: no set per decision).
    seen: AbstractSet[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Example:
    """A closed decision, to learn from: ``converted`` or not."""

    decision_id: str
    offer_id: str
    features: Sequence[str]
    converted: bool
    closed_ms: int
    why: str  # "conversion", "dismissal", "window", "evicted"
    #: The input partition of the decision's customer, where the worker made the
    #: example (exactly-once processing publishes it in that partition's transaction;
    #: not part of the training record).
    partition: int = -1


#: Format of a training record (:func:`encode_example`).
EXAMPLE_FORMAT = 1


def encode_example(example: Example) -> bytes:
    """The value of a training record (``rtim.training``, keyed by the offer id).

    >>> ex = Example("d1", "o1", ["a=1"], True, 5, "conversion")
    >>> decode_example(encode_example(ex)) == ex
    True
    """
    return orjson.dumps(
        {
            "format": EXAMPLE_FORMAT,
            "decision_id": example.decision_id,
            "offer_id": example.offer_id,
            "features": list(example.features),
            "converted": example.converted,
            "closed_ms": example.closed_ms,
            "why": example.why,
        }
    )


def training_records(example: Example) -> list[tuple[bytes, bytes]]:
    """The training records of one closed decision, as ``(key, value)``: the example
    under its offer's id, and the same example under :data:`~rtim.learn.models.POOLED`
    for the pooled model (a record of its own, so that learners stay partitioned
    by key)."""
    pooled = replace(example, offer_id=POOLED)
    return [
        (example.offer_id.encode(), encode_example(example)),
        (POOLED.encode(), encode_example(pooled)),
    ]


def decode_example(raw: bytes) -> Example:
    """A training record's example; raises ValueError, naming the field, if it is not one.

    >>> decode_example(b'{"format": 1, "decision_id": "d", "offer_id": "o", "features": [],'
    ...                b' "converted": "false", "closed_ms": 1, "why": "window"}')
    Traceback (most recent call last):
    ...
    ValueError: not a training example: converted must be true or false, got 'false'
    """
    try:
        data = orjson.loads(raw)
        if type(data) is not dict:
            raise ValueError("not a JSON object")
        if data.get("format") != EXAMPLE_FORMAT:
            raise ValueError(f"unknown example format {data.get('format')!r}")
        features = data.get("features")
        if type(features) is not list or not all(type(f) is str for f in features):
            raise ValueError("features must be a list of strings")
        texts: list[str] = []
        for field in ("decision_id", "offer_id", "why"):
            text = data.get(field)
            if type(text) is not str:
                raise ValueError(f"{field} must be a string, got {text!r:.40}")
            texts.append(text)
        converted, closed_ms = data.get("converted"), data.get("closed_ms")
        if type(converted) is not bool:
            raise ValueError(f"converted must be true or false, got {converted!r:.40}")
        if type(closed_ms) is not int:
            raise ValueError(f"closed_ms must be an integer, got {closed_ms!r:.40}")
        return Example(texts[0], texts[1], features, converted, closed_ms, texts[2])
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a training example: {exc}") from None


# -- the join, on one customer's state ---------------------------------------
#
# A customer's open and recently closed decisions are kept in their durable
# context (``pending`` and ``closed``, plain JSON lists), so that the join
# survives restarts and rebalances with the context itself, and holds on
# whichever worker owns the customer:
#
#   pending: [[decision id, offer id, features, decided ms, window end ms, outcomes seen], ...]
#   closed:  [[decision id, window end ms, outcomes seen, offer id], ...]
#
# both oldest first. A decision request answered with several actions opens one entry
# per action, each learned on its own: the first under the decision's id, the others
# under :func:`action_id`; a response names its action by offer id (none: the first).
# The functions below are the one implementation of the join; :class:`Attributor` runs
# them over customers held in memory (the offline evaluation), the engine over customer
# contexts.

_ID, _OFFER, _FEATURES, _DECIDED, _END, _SEEN = range(6)


def action_id(decision_id: str, offer_id: str) -> str:
    """The id under which a decision's action after its first is kept open and learned
    (the first is kept under the decision's own id).

    >>> action_id("d-1", "welcome")
    'd-1#welcome'
    """
    return f"{decision_id}#{offer_id}"


def find_entry(
    state: dict[str, Any], decision_id: str, offer_id: str | None
) -> tuple[list[Any], bool] | None:
    """The open or closed entry a response about ``decision_id`` (and its action
    ``offer_id``, None for the first) is about, and whether it is open; None if none is.
    A closed entry from before offers were kept (offer None) answers to any action."""
    ids = (decision_id,) if offer_id is None else (decision_id, action_id(decision_id, offer_id))
    for p in state["pending"]:
        if p[_ID] in ids and (offer_id is None or p[_OFFER] == offer_id):
            return p, True
    for c in state["closed"]:
        if c[0] in ids and (offer_id is None or c[3] is None or c[3] == offer_id):
            return c, False
    return None


def entry_offer(state: dict[str, Any], decision_id: str, offer_id: str | None) -> str | None:
    """The offer of the entry :func:`find_entry` finds (None: no entry, or a closed one
    from before offers were kept)."""
    found = find_entry(state, decision_id, offer_id)
    if found is None:
        return None
    entry, is_open = found
    offer: str | None = entry[_OFFER] if is_open else entry[3]
    return offer


def has_decision(state: dict[str, Any], decision_id: str) -> bool:
    """Whether the customer's state holds the decision, open or closed lately."""
    # (``in`` on a map: the ids compared in C, no list built.)
    return decision_id in map(_first, state["pending"]) or decision_id in map(
        _first, state["closed"]
    )


def open_decision(state: dict[str, Any], pending: Pending, max_pending: int) -> list[Example]:
    """Open a decision in a customer's state; returns the examples of the
    decisions its budget evicts (closed at once as negatives, ``evicted``)."""
    out: list[Example] = []
    opened = state["pending"]
    decision_id = pending.decision_id
    if has_decision(state, decision_id):
        return out  # the same decision again (a replayed event): one is enough
    while len(opened) >= max_pending:
        out.append(_close(state, opened[0], False, pending.decided_ms, "evicted"))
    opened.append(
        [
            decision_id,
            pending.offer_id,
            # The engine hands a list of its own (one copy per decision less).
            features if type(features := pending.features) is list else list(features),
            pending.decided_ms,
            pending.window_end_ms,
            # No list until an outcome is seen (the empty tuple is one object for all,
            # written as the same []): one object fewer kept per open decision.
            sorted(pending.seen) if pending.seen else (),
        ]
    )
    return out


def respond(state: dict[str, Any] | None, response: Response) -> tuple[str, Example | None]:
    """Join one response to the customer's decisions: its result (one of
    :data:`JOIN_RESULTS`) and, for a joined conversion or dismissal, the example
    (positive or negative) that closes the decision."""
    if state is None:
        return "unknown", None
    found = find_entry(state, response.decision_id, response.offer_id)
    if found is None:
        return "unknown", None
    entry, is_open = found
    if is_open and response.timestamp_ms < entry[_DECIDED] - EARLY_TOLERANCE_MS:
        return "early", None
    if not is_open:
        if response.outcome in entry[2]:
            return "duplicate", None
        entry[2] = [*entry[2], response.outcome]
        return "late", None
    seen = entry[_SEEN]
    if response.outcome in seen:
        return "duplicate", None
    entry[_SEEN] = [*seen, response.outcome]
    if response.timestamp_ms > entry[_END]:
        return "late", None
    if response.outcome == "conversion":
        return "joined", _close(state, entry, True, response.timestamp_ms, "conversion")
    if response.outcome == "dismissal":
        return "joined", _close(state, entry, False, response.timestamp_ms, "dismissal")
    return "joined", None


def close_due(
    state: dict[str, Any],
    now_ms: int,
    *,
    max_closed: int = MAX_CLOSED_PER_CUSTOMER,
    closed_memory_ms: int = CLOSED_MEMORY_MS,
) -> list[Example]:
    """Close the customer's decisions whose window ended by ``now_ms`` (stream
    time) as negatives, and forget closed ones past their memory."""
    out = [
        _close(state, p, False, p[_END], "window", max_closed)
        for p in [p for p in state["pending"] if p[_END] <= now_ms]
    ]
    closed = state["closed"]
    if closed and closed[0][1] + closed_memory_ms <= now_ms:
        state["closed"] = [c for c in closed if c[1] + closed_memory_ms > now_ms]
    return out


def next_window_end(state: dict[str, Any]) -> int | None:
    """When the customer's first open window ends (None: nothing open)."""
    ends = [p[_END] for p in state["pending"]]
    return min(ends) if ends else None


_first = itemgetter(0)  # a pending or closed decision's id


def _close(
    state: dict[str, Any],
    p: list[Any],
    converted: bool,
    at_ms: int,
    why: str,
    max_closed: int = MAX_CLOSED_PER_CUSTOMER,
) -> Example:
    state["pending"].remove(p)
    closed = state["closed"]
    closed.append([p[_ID], p[_END], p[_SEEN], p[_OFFER]])
    if len(closed) > max_closed:
        del closed[: len(closed) - max_closed]
    return Example(p[_ID], p[_OFFER], p[_FEATURES], converted, at_ms, why)


class StreamClock:
    """A partition's stream time: the highest event time seen on it, moved on
    by wall-clock time while the partition receives nothing for ``idle_ms``."""

    __slots__ = ("_stream_at_wall", "_wall_ms", "idle_ms", "stream_ms")

    def __init__(self, idle_ms: int = DEFAULT_IDLE_MS) -> None:
        self.idle_ms = idle_ms
        self.stream_ms: int | None = None
        self._wall_ms: int | None = None  # wall-clock time of the latest record
        self._stream_at_wall: int | None = None

    def observe(self, event_ms: int, wall_ms: int | None = None) -> int:
        """A record stamped ``event_ms`` arrived (at ``wall_ms``); the stream time."""
        if self.stream_ms is None or event_ms > self.stream_ms:
            self.stream_ms = event_ms
        if wall_ms is not None:
            self._wall_ms = wall_ms
            self._stream_at_wall = self.stream_ms
        return self.stream_ms

    def tick(self, wall_ms: int) -> int | None:
        """Wall-clock time passes: the stream time if it moved, else None."""
        if self._wall_ms is None or self._stream_at_wall is None:
            return None
        idle = wall_ms - self._wall_ms
        if idle < self.idle_ms:
            return None
        moved = self._stream_at_wall + idle
        if self.stream_ms is not None and moved <= self.stream_ms:
            return None
        self.stream_ms = moved
        return moved


def new_state() -> dict[str, Any]:
    """A customer's empty join state (the engine keeps it in the context)."""
    return {"pending": [], "closed": []}


class Attributor:
    """The open decisions of one partition's customers in memory, its stream
    time, and the join (the offline evaluation; the worker keeps the same
    state in each customer's context)."""

    def __init__(
        self,
        *,
        idle_ms: int = DEFAULT_IDLE_MS,
        max_pending: int = MAX_PENDING_PER_CUSTOMER,
        max_closed: int = MAX_CLOSED_PER_CUSTOMER,
        closed_memory_ms: int = CLOSED_MEMORY_MS,
    ) -> None:
        self.max_pending = max_pending
        self.max_closed = max_closed
        self.closed_memory_ms = closed_memory_ms
        self.clock = StreamClock(idle_ms)
        self.customers: dict[str, dict[str, Any]] = {}
        self._ends: list[tuple[int, str]] = []  # heap of (window end, customer)
        self.counts: dict[str, int] = dict.fromkeys(
            (*JOIN_RESULTS, "positive", "negative", "evicted"), 0
        )

    @property
    def stream_ms(self) -> int | None:
        return self.clock.stream_ms

    def observe(self, event_ms: int, wall_ms: int | None = None) -> list[Example]:
        """A record stamped ``event_ms`` arrived (at ``wall_ms``); close what is due."""
        return self._close_due(self.clock.observe(event_ms, wall_ms))

    def tick(self, wall_ms: int) -> list[Example]:
        """Wall-clock time passes; an idle partition's stream time moves with it."""
        moved = self.clock.tick(wall_ms)
        return [] if moved is None else self._close_due(moved)

    def _close_due(self, now_ms: int) -> list[Example]:
        out: list[Example] = []
        ends = self._ends
        while ends and ends[0][0] <= now_ms:
            _, customer = heapq.heappop(ends)
            state = self.customers.get(customer)
            if state is not None:
                out.extend(self._count(self._due(state, now_ms)))
                self._schedule(customer, state)
        return out

    def _due(self, state: dict[str, Any], now_ms: int) -> list[Example]:
        return close_due(
            state, now_ms, max_closed=self.max_closed, closed_memory_ms=self.closed_memory_ms
        )

    def _schedule(self, customer: str, state: dict[str, Any]) -> None:
        end = next_window_end(state)
        if end is not None:
            heapq.heappush(self._ends, (end, customer))
        elif state["closed"]:
            heapq.heappush(self._ends, (state["closed"][0][1] + self.closed_memory_ms, customer))
        else:
            del self.customers[customer]

    def _count(self, examples: list[Example]) -> list[Example]:
        for ex in examples:
            self.counts["positive" if ex.converted else "negative"] += 1
            if ex.why == "evicted":
                self.counts["evicted"] += 1
        return examples

    def decide(self, pending: Pending) -> list[Example]:
        """Open a decision; returns the example of one evicted by the customer's budget."""
        state = self.customers.get(pending.customer_id)
        if state is None:
            state = self.customers[pending.customer_id] = new_state()
        out = self._count(open_decision(state, pending, self.max_pending))
        heapq.heappush(self._ends, (pending.window_end_ms, pending.customer_id))
        out.extend(self.observe(pending.decided_ms))
        return out

    def respond(self, response: Response) -> tuple[str, Example | None]:
        """Join one response: its result and, for a joined conversion or dismissal,
        the example."""
        result, example = respond(self.customers.get(response.customer_id), response)
        self.counts[result] += 1
        if example is not None:
            self._count([example])
        return result, example

    @property
    def open_windows(self) -> int:
        return sum(len(state["pending"]) for state in self.customers.values())
