"""The decisioning core, batch at a time: records in, state changes and outputs out.

:class:`Engine` is plain synchronous Python with no Kafka and no asyncio in it.
The stream shell hands it every clickstream record of one fetch; it returns
what must be written (the new value of every customer context that changed,
once per customer), what must be published (triggers, dead letters) and the
counts the metrics need. The shell persists and publishes all of it, and only
then acknowledges the records, so that a crash at any point redelivers them;
duplicates are then recognised per customer (see
:func:`rtim.context.model.is_duplicate`) and not applied twice.

An event changes its customer's context completely or not at all. An event
that fails half way (an exception in the update or in a decision) is
dead-lettered, and its customer's context is put back as it was before the
event: rebuilt from the store (which holds the context as of the start of the
batch) and the batch's earlier events of that customer, replayed with the
trigger cool-downs they set; the failed event's triggers are dropped. This
costs nothing per event until something fails. After a failure, the
customer's context is copied (serialised) before each of its further events in
the batch, so that a stream of failing events costs one copy each, not one
rebuild each. In the same way, a context that would serialise to more than
:data:`rtim.context.model.MAX_CONTEXT_BYTES` is rebuilt event by event with
its size checked after each, and the events that would take it over the
ceiling are dead-lettered (``too_large``) with their triggers.

A customer's context lives on one partition: the one its id maps to with
Kafka's default partitioner (``partition_of``). A valid record keyed by
anything but its customer id (no key, an empty one, a session id...), or keyed
right but on another partition (a producer with another partitioner), is not
applied where it landed: it is returned in :attr:`BatchResult.rekeyed`, for the
shell to publish again to the clickstream with the customer id as key (and the
headers of :data:`REKEYED_FROM_PARTITION` and :data:`REKEYED_FROM_OFFSET`). The
cache holds each partition's contexts apart, so a context read or created for
one partition is never handed to a record of another.

Examples
--------
>>> from rtim.offers.catalog import parse_catalog
>>> engine = Engine(catalog=parse_catalog({}), load=lambda partition, key: None)
>>> rec = Record(partition=0, offset=7, key=b"u1", value=b'{"type": "page", '
...     b'"messageId": "m1", "userId": "u1", "timestamp": "2026-11-25T10:00:00Z"}')
>>> result = engine.process("rtim.clickstream", [rec, Record(0, 8, b"x", b"{oops")])
>>> result.applied, [d.reason for d in result.dead_letters]
(1, ['malformed_json'])
"""

from __future__ import annotations

import heapq
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import orjson

from rtim.context.model import (
    DEDUPE_WINDOW_MS,
    MAX_CONTEXT_BYTES,
    Context,
    apply_consent,
    apply_event,
    id_token,
    is_duplicate,
    load_context,
    new_context,
    note_change,
)
from rtim.decide.arbitrate import Decision, decide, decision_id, round6, window_end
from rtim.decide.cloudevent import CONTENT_TYPE, encode_trigger
from rtim.decide.explain import note_decision, note_record, remembered, remembers
from rtim.decide.policy import (
    dismissed_offer,
    record_contact,
    record_dismissal,
    rejection_kind,
    shown_together,
)
from rtim.decide.record import encode_record, read_handover
from rtim.decide.request import DecideRequest
from rtim.events import DeadLetter, InvalidEvent, dead_letter, error_reason, parse_event
from rtim.events.segment import Event
from rtim.learn.attribution import (
    DEFAULT_IDLE_MS,
    MAX_PENDING_PER_CUSTOMER,
    Example,
    InvalidResponse,
    Pending,
    StreamClock,
    action_id,
    close_due,
    has_decision,
    next_window_end,
    open_decision,
    parse_response,
    respond,
)
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import ModelSet
from rtim.learn.policy import Candidate
from rtim.names import CLICKSTREAM_TOPIC, HANDOVER_HEADER, RESPONSES_TOPIC, trigger_topic
from rtim.offers.catalog import Catalog, Offer
from rtim.settings import DEFAULTS
from rtim.triggers.rules import RuleIndex, TriggerRule, fired_rules

#: A stored context's latest event time, read without decoding it.
_LAST_MS = re.compile(rb'"last_ms":(\d+)')
#: How a stored context with no open decision reads.
_NOTHING_PENDING = b'"pending":[]'

#: Headers of a re-keyed record: where the record it copies was read from.
REKEYED_FROM_PARTITION = "rtim.rekeyed.from.partition"
REKEYED_FROM_OFFSET = "rtim.rekeyed.from.offset"
#: Why a record is re-keyed (``rtim_events_rekeyed_total{reason}``): its key is not
#: its customer id, or it is but the record is on another partition than that id's.
REKEY_REASONS = ("key", "partition")


class RecordLike(Protocol):
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Record(NamedTuple):
    """A consumed record, as the core needs it (the shell may pass its own type)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int | None = None


@dataclass(slots=True)
class Trigger:
    """A trigger to publish: CloudEvent bytes for ``rtim.triggers.<channel>``."""

    channel: str
    offer_id: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    #: When the causing record entered Kafka (ms), for end-to-end latency.
    source_ms: int | None
    #: The clickstream record that made the decision.
    cause: RecordLike | None = None

    @property
    def topic(self) -> str:
        return trigger_topic(self.channel)


@dataclass(slots=True)
class DecisionRecord:
    """A decision record to publish to ``rtim.decisions`` (:mod:`rtim.decide.record`)."""

    key: bytes
    value: bytes
    #: The record that made the decision.
    cause: RecordLike | None = None
    offered: bool = True
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class Rekeyed:
    """A valid record to publish again to its topic, keyed by its customer id."""

    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]]
    #: The customer's partition (None: Kafka's default partitioner decides).
    partition: int | None
    #: One of :data:`REKEY_REASONS`.
    reason: str
    #: The record as it was read.
    record: RecordLike
    #: Where it is published again (the topic it was read from).
    topic: str = CLICKSTREAM_TOPIC


@dataclass(slots=True)
class BatchResult:
    """Everything one batch changed and produced."""

    #: partition -> customer key -> serialised context (one entry per customer).
    updates: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
    triggers: list[Trigger] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    new_customers: int = 0
    #: Decision moments where no offer was eligible (a decision of "nothing").
    no_offer: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    #: Valid records that landed where their customer's context does not live.
    rekeyed: list[Rekeyed] = field(default_factory=list)
    #: Every decision made (with an offer or none), to record on ``rtim.decisions``.
    decisions: list[DecisionRecord] = field(default_factory=list)
    #: Closed decisions to learn from (``rtim.training``).
    examples: list[Example] = field(default_factory=list)
    #: Responses consumed, by (outcome, join result); invalid ones are in ``invalid``.
    responses: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Offers decisions did not make, by the kind of reason (:data:`rtim.decide.policy.REJECTIONS`).
    rejected: Counter[str] = field(default_factory=Counter)
    #: Decision requests answered (:meth:`BatchRun.decide`), in order.
    answers: list[Answer] = field(default_factory=list)
    #: Decisions handed over by another worker (:meth:`BatchRun.add_responses`), by
    #: result: ``adopted``, or ``duplicate`` (the context already has it).
    adopted: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Action:
    """One ranked action of a decision request's answer."""

    offer: Offer
    channel: str
    score: float
    propensity: float
    reasons: list[str]

    def as_json(self) -> dict[str, Any]:
        offer = self.offer
        return {
            "offer_id": offer.id,
            "name": offer.name,
            "channel": self.channel,
            "creative": dict(offer.creative),
            "score": self.score,
            "propensity": self.propensity,
            "reasons": self.reasons,
        }


@dataclass(slots=True)
class Answer:
    """What a decision request gets: its decision, the ranked actions, the reasons."""

    decision_id: str
    customer_id: str
    channel: str
    placement: str | None
    partition: int
    actions: list[Action]
    reasons: list[str]
    #: The customer had no context (decided as a new visitor).
    new_customer: bool
    decided_ms: int
    #: Asked before with the same ``request_id``: the answer it got then, not recorded again.
    repeated: bool = False

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision_id": self.decision_id,
            "customer_id": self.customer_id,
            "channel": self.channel,
            "placement": self.placement,
            "actions": [a.as_json() for a in self.actions],
            "reasons": self.reasons,
            "new_customer": self.new_customer,
            "partition": self.partition,
        }
        if self.repeated:
            out["repeated"] = True
        if not self.actions:
            out["reason"] = next(
                (r for r in reversed(self.reasons) if r.startswith("no-offer:")), "no-offer"
            )
        return out


class Engine:
    """Validate, dedupe, update contexts, evaluate triggers, decide, for whole batches.

    Parameters
    ----------
    catalog
        Trigger rules and offers.
    load
        ``load(partition, key) -> bytes | None`` reads a stored context.
    models
        The offers' propensity models (:class:`rtim.learn.models.ModelSet`), which the
        worker keeps current from ``rtim.models``; empty ones if not given.
    features
        How a decision's features are built from the context and the moment.
    window_ms
        Attribution window of offers that set none (``RTIM_ATTRIBUTION_WINDOW_S``).
    idle_ms
        Wall-clock time without records after which a partition's stream time moves
        with the wall clock (:meth:`tick`).
    rng
        The source of the Thompson draws.
    source
        The CloudEvents ``source`` of published triggers.
    cache_size
        Decoded contexts kept between batches; the store is the truth.
    dedupe_window_ms
        How long (in the customer's event time) a ``messageId`` is remembered;
        see :mod:`rtim.context.model`.
    partition_of
        The clickstream partition of a customer key (Kafka's default
        partitioner). None: a record keyed by its customer id is applied on
        whatever partition it is (only records with another key are re-keyed).
    """

    def __init__(
        self,
        *,
        catalog: Catalog,
        load: Callable[[int, bytes], bytes | None],
        models: ModelSet | None = None,
        features: FeatureBuilder | None = None,
        window_ms: int = int(DEFAULTS.attribution_window_s * 1000),
        idle_ms: int = DEFAULT_IDLE_MS,
        rng: random.Random | None = None,
        source: str = "/rtim",
        max_event_bytes: int = DEFAULTS.max_event_bytes,
        max_future_skew_ms: int = int(DEFAULTS.max_future_skew_s * 1000),
        trigger_ttl_ms: int = int(DEFAULTS.trigger_ttl_s * 1000),
        cache_size: int = DEFAULTS.cache_customers,
        clock: Callable[[], float] = time.time,
        dedupe_window_ms: int = DEDUPE_WINDOW_MS,
        partition_of: Callable[[bytes], int] | None = None,
    ) -> None:
        # (placement, channel) -> the offers a request there may get, and its moment.
        self._placed: dict[tuple[str | None, str], tuple[Catalog, TriggerRule]] = {}
        self.set_catalog(catalog)
        if features is not None:
            self.features = features
        self.models = models if models is not None else ModelSet()
        self.window_ms = window_ms
        self.idle_ms = idle_ms
        self.rng = rng or random.Random()
        # Per partition: its stream time, and when its customers' open windows end
        # (a heap of (window end, customer key); an entry may be stale: the context
        # is the truth).
        self._clocks: dict[int, StreamClock] = {}
        self._windows: dict[int, list[tuple[int, bytes]]] = {}
        self.source = source
        self.max_event_bytes = max_event_bytes
        self.max_future_skew_ms = max_future_skew_ms
        self.trigger_ttl_ms = trigger_ttl_ms
        self.cache_size = cache_size
        self._load = load
        self._clock = clock
        # Per partition: customer key -> decoded context.
        self._cache: dict[int, dict[bytes, Context]] = {}
        self.dedupe_window_ms = dedupe_window_ms
        self.partition_of = partition_of
        #: Stored contexts that were of an older shape or damaged, and repaired on load.
        self.repaired = 0

    def set_catalog(self, catalog: Catalog) -> None:
        """Decide with this catalog from the next batch on (call between batches): its
        trigger index, feature builder and placements' offers."""
        self.catalog = catalog
        self._rules = RuleIndex(catalog.triggers)
        self.features = FeatureBuilder(catalog.features)
        self._placed.clear()

    def request_catalog(
        self, placement_id: str | None, channel: str
    ) -> tuple[Catalog, TriggerRule]:
        """The offers a request may get (those of its placement, on its channel, whatever
        their triggers), and the decision moment it is decided as.

        Raises KeyError for a placement the catalog does not have, and ValueError for
        a channel the placement is not on.
        """
        found = self._placed.get((placement_id, channel))
        if found is not None:
            return found
        catalog = self.catalog
        allowed: tuple[str, ...] | None = None
        if placement_id is not None:
            placement = catalog.placement(placement_id)
            if placement is None:
                raise KeyError(placement_id)
            if channel not in placement.channels:
                raise ValueError(
                    f"placement {placement_id!r} is on {list(placement.channels)}, not {channel!r}"
                )
            allowed = placement.offers
        offers = tuple(
            replace(o, triggers=None)
            for o in catalog.offers
            if channel in o.channels and (allowed is None or o.id in allowed)
        )
        rule = TriggerRule(
            id=f"placement:{placement_id}" if placement_id else f"request:{channel}",
            description="a decision request",
            cooldown_ms=0,
        )
        found = self._placed[(placement_id, channel)] = (replace(catalog, offers=offers), rule)
        return found

    def decide_request(self, request: DecideRequest) -> tuple[Answer, BatchResult]:
        """Decide one request as a batch of its own (see :meth:`BatchRun.decide`)."""
        run = self.start_batch(CLICKSTREAM_TOPIC)
        answer = run.decide(request)
        return answer, run.finish()

    def invalidate(self) -> None:
        """Forget every cached context (after a rebalance or a failed batch)."""
        self._cache.clear()

    def cached(self, partition: int) -> dict[bytes, Context]:
        """The cached contexts of one partition."""
        cache = self._cache.get(partition)
        if cache is None:
            cache = self._cache[partition] = {}
        return cache

    def context(self, partition: int, key: bytes) -> Context | None:
        """The current context of a customer on a partition, or None if never seen."""
        cache = self.cached(partition)
        ctx = cache.get(key)
        if ctx is None:
            raw = self._load(partition, key)
            if raw is None:
                return None
            ctx, repaired = load_context(raw, key.decode("utf-8", "replace"))
            cache[key] = ctx
            self.repaired += repaired
        return ctx

    def stored(self, partition: int, key: bytes) -> Context | None:
        """The customer's context as the store holds it (bypassing the cache)."""
        raw = self._load(partition, key)
        return None if raw is None else load_context(raw, key.decode("utf-8", "replace"))[0]

    # -- attribution windows ---------------------------------------------------

    def clock(self, partition: int) -> StreamClock:
        """The stream time of a partition."""
        clock = self._clocks.get(partition)
        if clock is None:
            clock = self._clocks[partition] = StreamClock(self.idle_ms)
        return clock

    def forget_windows(self) -> None:
        """Forget every partition's open windows and stream time (after a
        rebalance; :meth:`index_windows` learns them again for the partitions kept)."""
        self._clocks.clear()
        self._windows.clear()

    def index_windows(
        self, partition: int, contexts: Iterable[tuple[bytes, bytes]], wall_ms: int
    ) -> int:
        """Learn a partition's open windows, and its stream time (the latest event
        time of its customers), from its stored contexts; returns how many
        customers have open decisions."""
        heap = self._windows.setdefault(partition, [])
        latest = -1
        found = 0
        last_ms = _LAST_MS.search
        for key, raw in contexts:
            match = last_ms(raw)
            if match is not None and int(match[1]) > latest:
                latest = int(match[1])
            if _NOTHING_PENDING in raw:
                continue
            ctx, _ = load_context(raw, key.decode("utf-8", "replace"))
            end = next_window_end(ctx)
            if end is not None:
                heap.append((end, key))
                found += 1
        heapq.heapify(heap)
        if latest >= 0:
            self.clock(partition).observe(latest, wall_ms)
        return found

    def open_windows(self) -> int:
        """Customers with open decisions, about (the index may hold closed ones)."""
        return sum(len(heap) for heap in self._windows.values())

    def windows(self, partition: int) -> list[tuple[int, bytes]]:
        """The heap of (window end, customer key) of a partition."""
        heap = self._windows.get(partition)
        if heap is None:
            heap = self._windows[partition] = []
        return heap

    def _schedule(self, partition: int, key: bytes, end_ms: int) -> None:
        heapq.heappush(self.windows(partition), (end_ms, key))

    def tick(self, wall_ms: int, run: BatchRun | None = None) -> BatchRun | None:
        """Wall-clock time passes: close the windows that end on partitions idle for
        ``idle_ms``; a batch with their changes and examples (``run`` if one is given),
        or None if nothing moved and none was given."""
        for partition, clock in list(self._clocks.items()):
            moved = clock.tick(wall_ms)
            heap = self._windows.get(partition)
            if moved is None or not heap or heap[0][0] > moved:
                continue
            if run is None:
                run = self.start_batch(CLICKSTREAM_TOPIC)
            run._close_due(partition, moved)
        return run

    def trim_cache(self, keep: BatchRun | None = None) -> None:
        """Bring the cache back within ``cache_size``, the oldest inserted first. Contexts
        of earlier batches are all persisted by now, so any may go; but those ``keep``
        (a batch begun before this moment) changed are not, and stay."""
        total = sum(len(cache) for cache in self._cache.values())
        excess = total - self.cache_size
        if excess > 0:
            share = (excess + self.cache_size // 10) / total
            for partition, cache in self._cache.items():
                kept = keep._changed.get(partition, ()) if keep is not None else ()
                for key in list(cache)[: math.ceil(len(cache) * share)]:
                    if key not in kept:
                        del cache[key]

    def process(self, topic: str, records: Iterable[RecordLike]) -> BatchResult:
        """Run one batch of clickstream records through the core."""
        run = self.start_batch(topic)
        run.add(records)
        return run.finish()

    def start_batch(self, topic: str, *, trim: bool = True) -> BatchRun:
        """Begin a batch to feed in parts (:meth:`BatchRun.add`), so that a caller
        can give its event loop a turn between parts; see :meth:`process`.

        Every earlier batch must be persisted (in the store) by now: contexts
        not used lately may leave the cache and be read from the store again.
        With ``trim=False`` none leaves, and the batch may begin while the previous
        one is still being persisted (decision requests answered before they are
        stored begin one so); it must then be persisted after that one, and not at
        all if that one is not. Whoever goes on with it calls :meth:`trim_cache`
        with it once the previous one is persisted.
        """
        if trim:
            self.trim_cache()
        return BatchRun(self, topic)

    def _decide(
        self,
        event: Any,
        ctx: Context,
        key: bytes,
        record: RecordLike,
        now_ms: int,
        result: BatchResult,
        candidates: tuple[TriggerRule, ...],
    ) -> tuple[list[TriggerRule], list[Pending]]:
        """Set the cool-downs of the rules that fire, decide for each, open the
        decisions made in the customer's context; the rules and the decisions."""
        fired = fired_rules(candidates, event, ctx)
        opened: list[Pending] = []
        if not fired:
            return fired, opened
        for rule in fired:
            ctx["fired"][rule.id] = event.timestamp_ms
            decision = decide(
                self.catalog,
                self.models,
                self.features,
                rule,
                event,
                ctx,
                now_ms=now_ms,
                ttl_ms=self.trigger_ttl_ms,
                window_ms=self.window_ms,
                rng=self.rng,
            )
            offer = decision.offer
            for reason in decision.reasons:
                # rejected:, suppressed: (and skipped:, raised:); a decision undone by a
                # failing event stays counted.
                if reason[0] in "rs":
                    kind = rejection_kind(reason)
                    if kind is not None:
                        result.rejected[kind] += 1
            result.decisions.append(
                DecisionRecord(key, encode_record(decision), record, offer is not None)
            )
            note_decision(ctx, decision, rule.id)
            if offer is None:
                result.no_offer += 1
                continue
            opened.append(self._open(ctx, key, record.partition, decision, result))
            result.triggers.append(
                Trigger(
                    channel=decision.channel,
                    offer_id=offer.id,
                    key=key,
                    value=encode_trigger(decision, source=self.source),
                    # Structured mode with the content-type header only. The Kafka binding
                    # lets ce_ headers come along, but readers that look for them first
                    # (the official Python SDK) then take the record for binary mode.
                    headers=[_CONTENT_TYPE_HEADER],
                    source_ms=getattr(record, "timestamp", None),
                    cause=record,
                )
            )
        return fired, opened

    def _open(
        self,
        ctx: Context,
        key: bytes,
        partition: int,
        decision: Decision,
        result: BatchResult,
        action: tuple[Candidate, str, int] | None = None,
    ) -> Pending:
        """Keep a decision open in the customer's context until its window ends, and
        count it as a contact of the customer (caps). ``action``: one of a request's
        actions after its first, with its channel and window end, kept open and counted
        on its own."""
        assert decision.offer is not None and decision.window_end_ms is not None
        at_ms = decision.event.timestamp_ms
        if action is None:
            candidate, channel, end = decision.ranked[0], decision.channel, decision.window_end_ms
            pending_id = decision.decision_id
        else:
            candidate, channel, end = action
            pending_id = action_id(decision.decision_id, candidate.offer.id)
        offer = candidate.offer
        pending = Pending(
            pending_id, decision.customer_id, offer.id, candidate.features, at_ms, end
        )
        record_contact(ctx, self.catalog.policy, at_ms, channel, offer)
        self._hold(ctx, key, partition, pending, result)
        return pending

    def _hold(
        self, ctx: Context, key: bytes, partition: int, pending: Pending, result: BatchResult
    ) -> None:
        """Keep ``pending`` open in the customer's context until its window ends."""
        first = next_window_end(ctx)
        evicted = open_decision(ctx, pending, MAX_PENDING_PER_CUSTOMER)
        if evicted:  # seldom: no list per decision for the examples it made
            result.examples.extend(_at(partition, evicted))
        if first is None or pending.window_end_ms < first:
            # One entry per customer, at its first window end: when it comes due, the
            # customer's next end is scheduled (so the heap grows with customers, not
            # with decisions).
            self._schedule(partition, key, pending.window_end_ms)

    def _rekeyed(
        self, record: RecordLike, key: bytes, owner: int | None, topic: str = CLICKSTREAM_TOPIC
    ) -> Rekeyed:
        headers = list(getattr(record, "headers", None) or ())
        headers.append((REKEYED_FROM_PARTITION, str(record.partition).encode()))
        headers.append((REKEYED_FROM_OFFSET, str(record.offset).encode()))
        reason = "key" if record.key != key else "partition"
        return Rekeyed(key, record.value, headers, owner, reason, record, topic)

    @staticmethod
    def _dead_letter(
        topic: str, record: RecordLike, exc: BaseException, stage: str = "validate"
    ) -> DeadLetter:
        return dead_letter(
            key=record.key,
            value=record.value,
            original_headers=list(getattr(record, "headers", None) or ()),
            topic=topic,
            partition=record.partition,
            offset=record.offset,
            exc=exc,
            stage=stage,
        )


#: A trigger's one header, made once (a tuple: shared by every trigger's list).
_CONTENT_TYPE_HEADER = ("content-type", CONTENT_TYPE)


def _at(partition: int, examples: list[Example]) -> list[Example]:
    """The examples, made on this input partition."""
    return [replace(e, partition=partition) for e in examples]


class _Close(NamedTuple):
    """A journal entry: the customer's windows that ended by ``at_ms`` were closed."""

    partition: int
    offset: int
    key: bytes
    value: None
    at_ms: int


#: Join results of responses that are not about a decision of this partition's (their
#: time does not move its stream time).
UNATTRIBUTED = frozenset({"unknown", "early"})


def _changes(joined: str) -> int:
    """What a response with this join result changed in its customer's context."""
    # joined, or late (its outcome remembered); nothing for a duplicate or an early one
    return 0 if joined in ("duplicate", "early") else 1


def _answer_again(
    request: DecideRequest, asked: dict[str, Any], partition: int, catalog: Catalog
) -> Answer:
    """The answer to a request asked again (its ``request_id`` was decided for this
    customer already, among the decisions its context remembers: a client's retry), from
    the context's summary of it: the same decision id, actions (scores, propensities, draws
    and levers as they were) and reasons, plus ``repeated:<request_id>``. Nothing is
    decided, counted or recorded again. An action whose offer is no longer in the catalog
    is left out. (A summary written before it kept the draw and the levers has an action's
    eligibility rules and context weights only.)"""
    offers = catalog.offers_by_id
    actions = []
    for offer_id, channel, score, mean, *parts in asked.get("actions") or ():
        offer = offers.get(offer_id)
        if offer is None:
            continue
        reasons = _offer_reasons(offer, asked["reasons"])
        if parts:
            sampled, levers = parts
            reasons.extend(_score_reasons(offer, sampled, levers))
        actions.append(Action(offer, channel, score, mean, reasons))
    return Answer(
        decision_id=asked["id"],
        customer_id=request.customer_id,
        channel=request.channel,
        placement=request.placement,
        partition=partition,
        actions=actions,
        reasons=[*asked["reasons"], f"repeated:{request.request_id}"],
        new_customer=False,
        decided_ms=asked["at"],
        repeated=True,
    )


def _offer_reasons(offer: Offer, reasons: list[str]) -> list[str]:
    """An action's eligibility rules, and the context weights of a decision's ``reasons``
    that weighed its score."""
    weighed = f":{offer.id}="
    return [f"eligible:{cond.text}" for cond in offer.eligibility] + [
        r for r in reasons if r.startswith("weight:") and weighed in r
    ]


def _score_reasons(offer: Offer, sampled: float, levers: dict[str, float] | None) -> list[str]:
    """What an action's score is made of: the propensity drawn for it (Thompson sampling's
    draw, ``sampled:<offer>=``) and the levers it was multiplied by (``lever:<offer>:``;
    under a contact policy the decision's, else the offer's value and priority), so that
    the score is the product of the numbers these reasons show."""
    if levers is None:
        levers = {"value": offer.value, "priority": offer.priority}
    return [
        f"sampled:{offer.id}={sampled:g}",
        *(f"lever:{offer.id}:{k}={v:g}" for k, v in levers.items()),
    ]


class _Request(NamedTuple):
    """A journal entry: a decision request (its context attributes as the value)."""

    partition: int
    offset: int
    key: bytes
    value: bytes
    at_ms: int


class BatchRun:
    """One batch in progress: contexts changed so far, outputs, counts."""

    def __init__(self, engine: Engine, topic: str) -> None:
        self.engine = engine
        self.topic = topic
        self.result = BatchResult()
        self.now_ms = int(engine._clock() * 1000)
        self._changed: dict[int, dict[bytes, Context]] = {}
        # The events applied, in order: customer keys and records, and for those
        # that fired rules, the rules and the triggers made. Read only when an
        # event fails or a context is too large. (Parallel lists: no object per
        # event for the garbage collector to track.)
        self._keys: list[bytes] = []
        self._records: list[RecordLike] = []
        self._fired: dict[int, tuple[list[TriggerRule], tuple[Any, ...], list[Pending]]] = {}
        # Entries that are not clickstream events: "response" or "close" (a _Close).
        self._kinds: dict[int, str] = {}
        # Customers (partition, key) with a failed event in this batch: copied
        # before each event.
        self._fragile: set[tuple[int, bytes]] = set()
        self._created: set[tuple[int, bytes]] = set()
        # Records dead-lettered after they were applied (the ceiling), by id().
        self._withdrawn: set[int] = set()
        #: The decision records of the batch's requests answered before it is stored: if
        #: it is not, the worker hands them over (:func:`~rtim.decide.record.read_handover`).
        self.answered_early: list[DecisionRecord] = []

    def _parse(self, record: RecordLike) -> Any:
        engine = self.engine
        return parse_event(
            record.value,
            max_bytes=engine.max_event_bytes,
            now_ms=self.now_ms,
            max_future_skew_ms=engine.max_future_skew_ms,
        )

    def add(self, records: Iterable[RecordLike]) -> None:
        """Apply records, in order, to the batch."""
        engine = self.engine
        result = self.result
        triggers = result.triggers
        changed = self._changed
        keys = self._keys
        records_applied = self._records
        fired_at = self._fired
        fragile = self._fragile
        topic = self.topic
        now_ms = self.now_ms
        candidates_for = engine._rules.candidates
        parse = parse_event
        max_bytes = engine.max_event_bytes
        skew = engine.max_future_skew_ms
        window_ms = engine.dedupe_window_ms
        traits = engine.catalog.traits
        categories = engine.catalog.consent_categories
        partition_of = engine.partition_of
        rekeyed = result.rekeyed
        decisions = result.decisions
        examples = result.examples
        cache: dict[bytes, Context] = {}
        cache_partition = -1
        consumed = applied = 0
        # The partition's stream time, and its heap of window ends (see _advance).
        clock: StreamClock | None = None
        stream = -1
        ends: list[tuple[int, bytes]] = []
        for record in records:
            consumed += 1
            partition = record.partition
            offset = record.offset
            if partition != cache_partition:
                if clock is not None and stream >= 0:
                    clock.observe(stream, now_ms)
                cache, cache_partition = engine.cached(partition), partition
                clock, ends = engine.clock(partition), engine.windows(partition)
                stream = -1 if clock.stream_ms is None else clock.stream_ms
            try:
                event = parse(
                    record.value, max_bytes=max_bytes, now_ms=now_ms, max_future_skew_ms=skew
                )
            except InvalidEvent as exc:
                result.invalid[exc.reason] += 1
                result.dead_letters.append(engine._dead_letter(topic, record, exc))
                continue
            key = ctx = snapshot = None
            mark = no_offer = marks = -1
            changing = False
            try:
                key = event.customer_id.encode()
                if record.key != key:
                    owner = None if partition_of is None else partition_of(key)
                    rekeyed.append(engine._rekeyed(record, key, owner))
                    continue
                if partition_of is not None and partition_of(key) != partition:
                    rekeyed.append(engine._rekeyed(record, key, partition_of(key)))
                    continue
                if event.timestamp_ms > stream:
                    stream = event.timestamp_ms
                    if ends and ends[0][0] <= stream:
                        # Windows this event's time passes close before it is applied:
                        # the result is the same whatever the batches (a replay learns
                        # what the live run learned).
                        self._close_due(partition, stream)
                ctx = cache.get(key)
                if ctx is None:
                    ctx = engine.context(partition, key)
                token = id_token(event.message_id)
                if ctx is None:
                    ctx = cache[key] = new_context(event.customer_id)
                    result.new_customers += 1
                    self._created.add((partition, key))
                elif is_duplicate(ctx, event, partition, offset, token):
                    result.duplicates += 1
                    continue
                if fragile and (partition, key) in fragile:
                    snapshot = orjson.dumps(ctx)
                changing = True
                apply_event(ctx, event, partition, offset, token, window_ms, traits, categories)
                candidates = candidates_for(event)
                if candidates:
                    mark = len(triggers)
                    marks = len(decisions)
                    marke = len(examples)
                    no_offer = result.no_offer
                    fired, opened = engine._decide(
                        event, ctx, key, record, now_ms, result, candidates
                    )
                    if fired:
                        made = (*triggers[mark:], *decisions[marks:])
                        fired_at[len(keys)] = (fired, made, opened)
                contexts = changed.get(partition)
                if contexts is None:
                    contexts = changed[partition] = {}
                contexts[key] = ctx
                keys.append(key)
                records_applied.append(record)
                applied += 1
            except Exception as exc:  # one bad event must not stop the stream
                if changing and key is not None:
                    if mark >= 0:
                        del triggers[mark:]
                        del decisions[marks:]
                        del examples[marke:]
                        result.no_offer = no_offer
                    if not isinstance(exc, InvalidEvent) or mark >= 0:
                        self._restore(key, partition, snapshot)
                    elif ctx is not None and ctx["n"] == 0:
                        # Refused by apply_event (which then changes nothing), and
                        # a new customer with nothing applied.
                        self._forget(key, partition)
                reason = error_reason(exc)
                result.invalid[reason] += 1
                result.dead_letters.append(engine._dead_letter(topic, record, exc, stage="process"))
        if clock is not None and stream >= 0:
            clock.observe(stream, now_ms)
        result.consumed += consumed
        result.applied += applied

    def add_responses(self, records: Iterable[RecordLike]) -> None:
        """Join response records (``rtim.responses``) to their customers' decisions."""
        engine = self.engine
        result = self.result
        partition_of = engine.partition_of
        latest_ms = self.now_ms + engine.max_future_skew_ms
        for record in records:
            result.consumed += 1
            partition = record.partition
            headers = getattr(record, "headers", None)
            if headers and any(name == HANDOVER_HEADER for name, _ in headers):
                self._adopt(record, headers)
                continue
            try:
                response = parse_response(record.value or b"")
                if response.timestamp_ms > latest_ms:
                    raise InvalidResponse(
                        "clock_skew",
                        "timestamp is more than RTIM_MAX_FUTURE_SKEW_S ahead of the clock",
                        field="timestamp",
                    )
            except InvalidResponse as exc:
                self._refuse_response(record, exc)
                continue
            key = response.customer_id.encode()
            owner = None if partition_of is None else partition_of(key)
            if record.key != key or (owner is not None and owner != partition):
                result.rekeyed.append(engine._rekeyed(record, key, owner, RESPONSES_TOPIC))
                continue
            ctx = engine.context(partition, key)
            joined, example = self._respond(ctx, response)
            result.responses[(response.outcome, joined)] += 1
            if ctx is not None and joined != "unknown":
                self._journal(partition, key, ctx, record, "response", _changes(joined))
            if example is not None:
                result.examples.append(replace(example, partition=partition))
            if joined not in UNATTRIBUTED:
                # Its time moves the partition's stream time (after the join: a
                # response past its window is late either way). One that names no
                # decision here, or is stamped before its decision, says nothing of
                # this partition's time: its channel system's clock may be anything.
                self._advance(partition, response.timestamp_ms)

    def _adopt(self, record: RecordLike, headers: Sequence[tuple[str, bytes]]) -> None:
        """Take over a decision another worker answered but could not store (its batch
        was dropped: the partition moved, or the worker was fenced): open what it opened,
        count its contacts, remember it and record it, as if it were decided here; unless
        the customer's context has it already (its batch reached the changelog after all,
        or it was handed over before)."""
        engine = self.engine
        result = self.result
        partition = record.partition
        try:
            decided, opened = read_handover(record.value)
            key = decided["customer_id"].encode()
            if engine.partition_of is not None and engine.partition_of(key) != partition:
                raise InvalidResponse("wrong_type", "handed over to another customer's partition")
        except InvalidResponse as exc:
            self._refuse_response(record, exc)
            return
        at_ms = decided["decided_ms"]
        self._advance(partition, at_ms)
        ctx = engine.context(partition, key)
        the_id = decided["decision_id"]
        if ctx is not None and (has_decision(ctx, the_id) or remembers(ctx, the_id)):
            result.adopted["duplicate"] += 1
            return
        result.adopted["adopted"] += 1
        entry: Any = _Request(partition, record.offset, key, record.value or b"", at_ms)
        made = DecisionRecord(
            key,
            record.value or b"",
            entry,
            bool(opened),
            [(name, value) for name, value in headers if name != HANDOVER_HEADER],
        )
        result.decisions.append(made)
        if ctx is None:
            if not opened:
                return  # a new visitor offered nothing has no context
            ctx = new_context(decided["customer_id"])
            self._keep_new(partition, key, ctx)
        for pending in opened:
            engine._hold(ctx, key, partition, pending, result)
        self._decided_again(ctx, (made,), at_ms)
        self._fired[len(self._keys)] = ([], (made,), opened)
        self._journal(partition, key, ctx, entry, "request")

    def _refuse_response(self, record: RecordLike, exc: InvalidResponse) -> None:
        """Dead-letter a record of ``rtim.responses`` that cannot be used, with its reason."""
        self.result.invalid[exc.reason] += 1
        self.result.dead_letters.append(self.engine._dead_letter(RESPONSES_TOPIC, record, exc))

    def _keep_new(self, partition: int, key: bytes, ctx: Context) -> None:
        """Keep a new customer's context, made outside the clickstream (a request's, or a
        handed-over decision's): cached, counted, and forgotten if the batch undoes it."""
        self.engine.cached(partition)[key] = ctx
        self.result.new_customers += 1
        self._created.add((partition, key))

    def _respond(self, ctx: Context | None, response: Any) -> tuple[str, Any]:
        """Join a response; a dismissal starts its offer's cool-down (event time)."""
        offer_id = None
        if response.outcome == "dismissal":
            offer_id = dismissed_offer(ctx, response.decision_id, response.offer_id)
        joined, example = respond(ctx, response)
        if offer_id is not None and ctx is not None and joined in ("joined", "late"):
            record_dismissal(ctx, self.engine.catalog.policy, offer_id, response.timestamp_ms)
        return joined, example

    def decide(self, request: DecideRequest) -> Answer:
        """Decide a request on the customer's current context, and record it exactly like
        a trigger's decision: a decision record (``source`` ``api``), the decision open
        in the context's ``pending`` (so that responses join it and it is learned), and
        the context changed in this batch's updates.

        The request must be for a partition this worker owns (the shell routes it).
        With ``limit`` > 1 the answer ranks several actions that may be shown together
        (:func:`~rtim.decide.policy.shown_together`): each counts as a contact and is kept
        open and learned on its own. Raises KeyError for an unknown placement, ValueError
        for a channel the placement is not on.
        """
        engine = self.engine
        result = self.result
        catalog, rule = engine.request_catalog(request.placement, request.channel)
        key = request.customer_id.encode()
        partition = 0 if engine.partition_of is None else engine.partition_of(key)
        at_ms = request.timestamp_ms
        self._advance(partition, at_ms)
        ctx = engine.context(partition, key)
        new = ctx is None
        if ctx is None:
            ctx = new_context(request.customer_id)
            the_id = None
        else:
            the_id = decision_id(ctx["id"], request.request_id, rule.id)
            asked = remembered(ctx, the_id)
            if asked is not None:
                return _answer_again(request, asked, partition, catalog)
        event = Event(
            "request",
            request.request_id,
            request.customer_id,
            None,
            None,
            request.placement,
            request.context,
            {},
            {},
            at_ms,
            request.channel,
            {},
        )
        decision = decide(
            catalog,
            engine.models,
            engine.features,
            rule,
            event,
            ctx,
            now_ms=self.now_ms,
            ttl_ms=engine.trigger_ttl_ms,
            window_ms=engine.window_ms,
            rng=engine.rng,
            the_id=the_id,
        )
        entry: Any = _Request(partition, -1, key, orjson.dumps(request.context), at_ms)
        shown, passed = shown_together(
            catalog.policy,
            ctx,
            decision.ranked,
            decision.channels,
            request.channel,
            at_ms,
            request.limit,
        )
        decision.reasons.extend(passed)
        ends = [window_end(c.offer, at_ms, engine.window_ms) for c, _ in shown]
        made = DecisionRecord(
            key,
            encode_record(
                decision,
                source="api",
                actions=[(c.offer.id, ch, end) for (c, ch), end in zip(shown, ends, strict=True)],
            ),
            entry,
            decision.offer is not None,
        )
        result.decisions.append(made)
        opened: list[Pending] = []
        if decision.offer is None:
            result.no_offer += 1
        actions = []
        # Per action as the context's summary keeps it, so that a retry gets the same:
        # [offer id, channel, score, propensity, draw, levers (None: value and priority)].
        answered: list[list[Any]] = []
        for c, channel in shown:
            offer = c.offer
            score, mean, sampled = round6(c.score), round6(c.mean), round6(c.sampled)
            levers = decision.levers.get(offer.id)
            reasons = _offer_reasons(offer, decision.reasons)
            reasons.extend(_score_reasons(offer, sampled, levers))
            actions.append(Action(offer, channel, score, mean, reasons))
            answered.append([offer.id, channel, score, mean, sampled, levers])
        if decision.offer is not None or not new:
            if new:
                self._keep_new(partition, key, ctx)
            for i, ((c, channel), end) in enumerate(zip(shown, ends, strict=True)):
                action = (c, channel, end) if i else None
                opened.append(engine._open(ctx, key, partition, decision, result, action))
            note_decision(ctx, decision, rule.id, answered)
            self._fired[len(self._keys)] = ([], (made,), opened)
            self._journal(partition, key, ctx, entry, "request")
        answer = Answer(
            decision_id=decision.decision_id,
            customer_id=request.customer_id,
            channel=request.channel,
            placement=request.placement,
            partition=partition,
            actions=actions,
            reasons=decision.reasons,
            new_customer=new,
            decided_ms=at_ms,
        )
        result.answers.append(answer)
        return answer

    def _journal(
        self,
        partition: int,
        key: bytes,
        ctx: Context,
        entry: Any,
        kind: str | None,
        changes: int = 1,
    ) -> None:
        """Note a change of a customer's context that is not a clickstream event (``changes``
        of them in its version: :func:`~rtim.context.model.note_change`)."""
        note_change(ctx, changes)
        contexts = self._changed.get(partition)
        if contexts is None:
            contexts = self._changed[partition] = {}
        contexts[key] = ctx
        if kind is not None:
            self._kinds[len(self._keys)] = kind
        self._keys.append(key)
        self._records.append(entry)

    def _advance(self, partition: int, event_ms: int) -> None:
        """A record of ``event_ms`` arrived: move the partition's stream time, and close
        the windows it passes (before the record is applied)."""
        clock = self.engine.clock(partition)
        before = clock.stream_ms
        now = clock.observe(event_ms, self.now_ms)
        ends = self.engine.windows(partition)
        if (before is None or now > before) and ends and ends[0][0] <= now:
            self._close_due(partition, now)

    def _close_due(self, partition: int, now_ms: int) -> None:
        """Close the open decisions of the partition whose windows end by ``now_ms``."""
        engine = self.engine
        heap = engine._windows.get(partition)
        while heap and heap[0][0] <= now_ms:
            _, key = heapq.heappop(heap)
            ctx = engine.context(partition, key)
            if ctx is None or not ctx["pending"]:
                continue
            closed = close_due(ctx, now_ms)
            if closed:
                self.result.examples.extend(_at(partition, closed))
                entry = _Close(partition, -1, key, None, now_ms)
                self._journal(partition, key, ctx, entry, "close", len(closed))
            end = next_window_end(ctx)
            if end is not None:
                heapq.heappush(heap, (end, key))

    def _forget(self, key: bytes, partition: int) -> None:
        """The customer has no context after all (nothing of it was applied)."""
        self.engine.cached(partition).pop(key, None)
        if (partition, key) in self._created:
            self._created.discard((partition, key))
            self.result.new_customers -= 1

    def _replay(self, key: bytes, partition: int) -> tuple[Context | None, list[Any]]:
        """The customer's context at the start of the batch, and the batch's
        events applied to it: (record, rules fired, triggers made)."""
        records, fired_at, kinds = self._records, self._fired, self._kinds
        entries = [
            (records[i], *fired_at.get(i, ((), (), ())), kinds.get(i))
            for i, k in enumerate(self._keys)
            if k == key and records[i].partition == partition
        ]
        return self.engine.stored(partition, key), entries

    def _apply_again(self, ctx: Context | None, entry: tuple[Any, ...]) -> Context:
        record, fired, made, opened, kind = entry
        if kind == "request" and ctx is None:
            ctx = new_context(record.key.decode())  # a new visitor's first request
        if kind is not None:
            assert ctx is not None  # a response or a window closed changes an existing context
            if kind == "close":
                note_change(ctx, len(close_due(ctx, record.at_ms)))
            elif kind == "request":
                for pending in opened:
                    open_decision(ctx, pending, MAX_PENDING_PER_CUSTOMER)
                self._decided_again(ctx, made, record.at_ms)
                note_change(ctx)
            else:
                joined, _ = self._respond(ctx, parse_response(record.value))
                note_change(ctx, _changes(joined))
            return ctx
        event = self._parse(record)
        if ctx is None:
            ctx = new_context(event.customer_id)
        engine = self.engine
        apply_event(
            ctx,
            event,
            record.partition,
            record.offset,
            None,
            engine.dedupe_window_ms,
            engine.catalog.traits,
            engine.catalog.consent_categories,
        )
        for rule in fired:
            ctx["fired"][rule.id] = event.timestamp_ms
        for pending in opened:
            open_decision(ctx, pending, MAX_PENDING_PER_CUSTOMER)
        self._decided_again(ctx, made, event.timestamp_ms)
        return ctx

    def _decided_again(self, ctx: Context, made: Iterable[Any], at_ms: int) -> None:
        """What the decisions of a replayed event or request did to the context besides
        opening them: remembered for explain, and what they offered counted as contacts
        (caps); read from their decision records."""
        catalog = self.engine.catalog
        by_id = catalog.offers_by_id
        for out in made:
            if not isinstance(out, DecisionRecord):
                continue
            decided = orjson.loads(out.value)
            note_record(ctx, decided)
            if decided["offer_id"] is not None:
                shown = decided.get("actions") or [decided]
                for action in shown:
                    offer = by_id.get(action["offer_id"])
                    if offer is not None:
                        record_contact(ctx, catalog.policy, at_ms, action["channel"], offer)

    def _restore(self, key: bytes, partition: int, snapshot: bytes | None) -> None:
        """Put the customer's context back as it was before the failed event."""
        self._fragile.add((partition, key))
        try:
            if snapshot is not None:
                ctx: Context | None = orjson.loads(snapshot)
            else:
                ctx, entries = self._replay(key, partition)
                for entry in entries:
                    ctx = self._apply_again(ctx, entry)
        except BaseException:
            # The batch cannot go on; its contexts in the cache are not all whole.
            self.engine.invalidate()
            raise
        if ctx is None or (ctx["n"] == 0 and not ctx["pending"]):
            # Nothing of the customer's was ever applied (a new visitor's decision
            # request that offered something keeps its open decision).
            self._forget(key, partition)
            return
        self.engine.cached(partition)[key] = ctx
        contexts = self._changed.get(partition)
        if contexts is not None and key in contexts:
            contexts[key] = ctx

    def _within_ceiling(self, key: bytes, partition: int) -> bytes | None:
        """Rebuild a context that is over the ceiling, refusing the events that
        take it over; return it serialised (None if nothing is left)."""
        engine = self.engine
        result = self.result
        dumps = orjson.dumps
        ctx, entries = self._replay(key, partition)
        blob = None if ctx is None else dumps(ctx)
        refused: set[int] = set()
        for entry in entries:
            record, made = entry[0], entry[2]
            if entry[4] is not None:  # a response or a window closed: they add nothing
                ctx = self._apply_again(ctx, entry)
                blob = dumps(ctx)
                continue
            try:
                trial = self._apply_again(ctx, entry)
                size = len(new := dumps(trial))
                if size > MAX_CONTEXT_BYTES:
                    raise InvalidEvent(
                        "too_large",
                        f"applying the event would make its customer's context {size} bytes "
                        f"long, over the ceiling of {MAX_CONTEXT_BYTES}",
                    )
                ctx, blob = trial, new
            except InvalidEvent as exc:
                ctx = None if blob is None else orjson.loads(blob)
                if ctx is not None and exc.reason == "too_large":
                    # The event's consent still holds: a withdrawal is never refused.
                    ctx, blob = self._consent_alone(ctx, blob, record)
                refused.update(id(t) for t in made)
                self._withdrawn.add(id(record))
                result.applied -= 1
                result.invalid[exc.reason] += 1
                result.dead_letters.append(
                    engine._dead_letter(self.topic, record, exc, stage="process")
                )
        if refused:
            result.triggers[:] = [t for t in result.triggers if id(t) not in refused]
            result.decisions[:] = [d for d in result.decisions if id(d) not in refused]
        if ctx is None:
            self._forget(key, partition)
            return None
        engine.cached(partition)[key] = ctx
        return blob

    def _consent_alone(
        self, ctx: Context, blob: bytes | None, record: RecordLike
    ) -> tuple[Context, bytes | None]:
        """The context with only the consent of a refused event applied, if it carries
        any and the result is within the ceiling (a changed consent takes no more room,
        and the categories kept are bounded); else as it was."""
        trial = orjson.loads(blob) if blob is not None else ctx
        if not apply_consent(trial, self._parse(record), self.engine.catalog.consent_categories):
            return ctx, blob
        note_change(trial)  # a change that is not the event's: a newer version all the same
        new = orjson.dumps(trial)
        if len(new) > MAX_CONTEXT_BYTES:
            return ctx, blob
        return trial, new

    def finish(self) -> BatchResult:
        """Serialise every changed context once and return the batch's result."""
        dumps = orjson.dumps
        updates = self.result.updates
        for partition, contexts in self._changed.items():
            out = updates[partition] = {}
            for key, ctx in contexts.items():
                blob = dumps(ctx)
                if len(blob) > MAX_CONTEXT_BYTES:
                    try:
                        within = self._within_ceiling(key, partition)
                    except BaseException:
                        self.engine.invalidate()  # contexts in the cache may not be whole
                        raise
                    if within is None:
                        continue
                    blob = within
                out[key] = blob
            if not out:
                del updates[partition]
        return self.result

    def refuse_context(self, partition: int, key: bytes, exc: BaseException) -> list[DeadLetter]:
        """Kafka refused the customer's new context: keep none of the batch's
        events of the customer (their context stays as stored) and return their
        dead letters (``refused``). Call after :meth:`finish`; the triggers
        these events made may be out already."""
        kinds = self._kinds
        records = [
            (r, kinds.get(i))
            for i, (k, r) in enumerate(zip(self._keys, self._records, strict=True))
            if k == key and r.partition == partition and id(r) not in self._withdrawn
        ]
        self._forget(key, partition)
        updates = self.result.updates.get(partition)
        if updates is not None:
            updates.pop(key, None)
        self.result.applied -= sum(1 for _, kind in records if kind is None)
        return [self.refused(r, exc) for r, kind in records if kind != "close"]

    def refused(self, record: RecordLike, exc: BaseException) -> DeadLetter:
        """The dead letter of a record whose output Kafka refused (``refused``)."""
        self.result.invalid["refused"] += 1
        reason = InvalidEvent("refused", f"Kafka refused an output of this event: {exc!r}")
        return self.engine._dead_letter(self.topic, record, reason, stage="publish")
