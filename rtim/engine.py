"""The decisioning core, batch at a time: records in, state changes and outputs out.

:class:`Engine` is plain synchronous Python with no Kafka and no asyncio in it.
The stream shell hands it every clickstream record of one fetch; it returns
what must be written (the new value of every customer context that changed,
once per customer), what must be published (triggers, dead letters) and the
counts the metrics need. The shell persists and publishes all of it, and only
then acknowledges the records, so that a crash at any point redelivers them;
duplicates are then recognised per customer (see
:func:`rtim.context.model.is_duplicate`) and not applied twice.

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

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson

from rtim.context.model import Context, apply_event, is_duplicate, new_context
from rtim.decide.arbitrate import decide
from rtim.decide.cloudevent import CONTENT_TYPE, encode_trigger
from rtim.decide.scoring import PropensityModel
from rtim.events import DeadLetter, InvalidEvent, dead_letter, parse_event
from rtim.names import trigger_topic
from rtim.offers.catalog import Catalog
from rtim.settings import DEFAULTS
from rtim.triggers.rules import RuleIndex, TriggerRule, fired_rules


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

    @property
    def topic(self) -> str:
        return trigger_topic(self.channel)


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


class Engine:
    """Validate, dedupe, update contexts, evaluate triggers, decide, for whole batches.

    Parameters
    ----------
    catalog
        Trigger rules and offers.
    load
        ``load(partition, key) -> bytes | None`` reads a stored context.
    model
        The propensity model (a fresh one if not given).
    source
        The CloudEvents ``source`` of published triggers.
    cache_size
        Decoded contexts kept between batches; the store is the truth.
    """

    def __init__(
        self,
        *,
        catalog: Catalog,
        load: Callable[[int, bytes], bytes | None],
        model: PropensityModel | None = None,
        source: str = "/rtim",
        max_event_bytes: int = DEFAULTS.max_event_bytes,
        max_future_skew_ms: int = int(DEFAULTS.max_future_skew_s * 1000),
        trigger_ttl_ms: int = int(DEFAULTS.trigger_ttl_s * 1000),
        cache_size: int = DEFAULTS.cache_customers,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self._rules = RuleIndex(catalog.triggers)
        self.model = model or PropensityModel()
        self.source = source
        self.max_event_bytes = max_event_bytes
        self.max_future_skew_ms = max_future_skew_ms
        self.trigger_ttl_ms = trigger_ttl_ms
        self.cache_size = cache_size
        self._load = load
        self._clock = clock
        self._cache: dict[bytes, Context] = {}

    def invalidate(self) -> None:
        """Forget every cached context (after a rebalance or a failed batch)."""
        self._cache.clear()

    def context(self, partition: int, key: bytes) -> Context | None:
        """The current context of a customer, or None if never seen."""
        ctx = self._cache.get(key)
        if ctx is None:
            raw = self._load(partition, key)
            if raw is None:
                return None
            ctx = self._cache[key] = orjson.loads(raw)
        return ctx

    def _trim_cache(self) -> None:
        # Contexts of earlier batches are all persisted, so any may go; the
        # oldest inserted go first.
        excess = len(self._cache) - self.cache_size
        if excess > 0:
            for key in list(self._cache)[: excess + self.cache_size // 10]:
                del self._cache[key]

    def process(self, topic: str, records: Iterable[RecordLike]) -> BatchResult:
        """Run one batch of clickstream records through the core."""
        run = self.start_batch(topic)
        run.add(records)
        return run.finish()

    def start_batch(self, topic: str) -> BatchRun:
        """Begin a batch to feed in parts (:meth:`BatchRun.add`), so that a caller
        can give its event loop a turn between parts; see :meth:`process`.

        Every earlier batch must be persisted (in the store) by now: contexts
        not used lately may leave the cache and be read from the store again.
        """
        self._trim_cache()
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
    ) -> None:
        fired = fired_rules(candidates, event, ctx)
        if not fired:
            return
        for rule in fired:
            ctx["fired"][rule.id] = event.timestamp_ms
            decision = decide(
                self.catalog,
                self.model,
                rule,
                event,
                ctx,
                now_ms=now_ms,
                ttl_ms=self.trigger_ttl_ms,
            )
            if decision is None:
                result.no_offer += 1
                continue
            result.triggers.append(
                Trigger(
                    channel=decision.channel,
                    offer_id=decision.offer.id,
                    key=key,
                    value=encode_trigger(decision, source=self.source),
                    # Structured mode with the content-type header only. The Kafka binding
                    # lets ce_ headers come along, but readers that look for them first
                    # (the official Python SDK) then take the record for binary mode.
                    headers=[("content-type", CONTENT_TYPE)],
                    source_ms=getattr(record, "timestamp", None),
                )
            )

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


class BatchRun:
    """One batch in progress: contexts changed so far, outputs, counts."""

    def __init__(self, engine: Engine, topic: str) -> None:
        self.engine = engine
        self.topic = topic
        self.result = BatchResult()
        self.now_ms = int(engine._clock() * 1000)
        self._changed: dict[int, dict[bytes, Context]] = {}

    def add(self, records: Iterable[RecordLike]) -> None:
        """Apply records, in order, to the batch."""
        engine = self.engine
        result = self.result
        changed = self._changed
        topic = self.topic
        now_ms = self.now_ms
        candidates_for = engine._rules.candidates
        parse = parse_event
        max_bytes = engine.max_event_bytes
        skew = engine.max_future_skew_ms
        cache = engine._cache
        consumed = applied = 0
        for record in records:
            consumed += 1
            partition = record.partition
            offset = record.offset
            try:
                event = parse(
                    record.value, max_bytes=max_bytes, now_ms=now_ms, max_future_skew_ms=skew
                )
            except InvalidEvent as exc:
                result.invalid[exc.reason] += 1
                result.dead_letters.append(engine._dead_letter(topic, record, exc))
                continue
            try:
                key = event.customer_id.encode()
                ctx = cache.get(key)
                if ctx is None:
                    ctx = engine.context(partition, key)
                if ctx is None:
                    ctx = cache[key] = new_context(event.customer_id)
                    result.new_customers += 1
                elif is_duplicate(ctx, event, partition, offset):
                    result.duplicates += 1
                    continue
                apply_event(ctx, event, partition, offset)
                contexts = changed.get(partition)
                if contexts is None:
                    contexts = changed[partition] = {}
                contexts[key] = ctx
                applied += 1
                candidates = candidates_for(event)
                if candidates:
                    engine._decide(event, ctx, key, record, now_ms, result, candidates)
            except Exception as exc:  # one bad event must not stop the stream
                result.invalid["internal_error"] += 1
                result.dead_letters.append(engine._dead_letter(topic, record, exc, stage="process"))
        result.consumed += consumed
        result.applied += applied

    def finish(self) -> BatchResult:
        """Serialise every changed context once and return the batch's result."""
        dumps = orjson.dumps
        self.result.updates = {
            partition: {key: dumps(ctx) for key, ctx in contexts.items()}
            for partition, contexts in self._changed.items()
        }
        return self.result
