"""The Faust application: topics, the context table, the clickstream processor, web views.

This is the shell around :class:`rtim.engine.Engine` (docs/architecture.md, "The batch
path"). Data flow::

    rtim.clickstream --(BatchConsumer, a fetch at a time)--> ClickstreamProcessor
      --> Engine (in parts of CORE_CHUNK records)
      --> publish changelog + triggers + dead letters (send_batch, awaited)
      --> write the context store --> acknowledge the batch's offsets

With RTIM_PROCESSING_GUARANTEE=exactly_once the publish is into a transaction per input
partition (rtim/stream/transactions.py), committed with the batch's next offsets before
the store is written; nothing is acknowledged to Faust.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from rtim import metrics
from rtim.engine import BatchResult, BatchRun, Engine
from rtim.events.deadletter import DeadLetter, without_value
from rtim.learn.attribution import training_records
from rtim.learn.models import ModelSet
from rtim.names import (
    CLICKSTREAM_TOPIC,
    CONTEXT_TABLE,
    DECISIONS_TOPIC,
    DLQ_TOPIC,
    HANDOVER_HEADER,
    RESPONSES_TOPIC,
    TRAINING_TOPIC,
)
from rtim.offers.catalog import Catalog, load_catalog
from rtim.offers.live import CatalogVersion
from rtim.settings import Settings
from rtim.stream.api import DecisionApi, install_api
from rtim.stream.catalog import LiveCatalog
from rtim.stream.consumer import BatchConsumer, FetchedBatch, Transport
from rtim.stream.fastpath import RtimWeb
from rtim.stream.health import BrokerHealth
from rtim.stream.heap import tune_gc
from rtim.stream.models import SharedModels, install_view
from rtim.stream.publish import BatchPublisher, OutRecord
from rtim.stream.store import ContextStore, ContextTable
from rtim.stream.transactions import Fenced, TransactionalPublisher
from rtim.stream.turns import PEEK_CHUNK, give_way

log = logging.getLogger("rtim.stream")

#: Records the core handles between two turns of the event loop: a few milliseconds of
#: work at most (a turn costs ~10 us).
CORE_CHUNK = 64


class TableManager(faust.tables.TableManager):
    """Faust's table manager, less the second its start sleeps before it registers the
    tables' changelogs: a wait for tables that agents define once they run. RTIM's one
    table exists when the app is made, and the consumer subscribes (and the worker joins
    its group) only once the tables are registered, so every start and restart waited
    that second."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class RtimApp(faust.App):
    """A Faust app whose consumer has RTIM's batch path (:mod:`rtim.stream.consumer`).

    It carries RTIM's settings for the parts Faust has no setting for (the
    consumer's fetch wait, the end-offset probe's connection): Faust builds
    those when the consumer is first used, so they must be known from the start.
    """

    #: The offer models decisions are made with, kept current by :attr:`rtim_shared`.
    rtim_models: ModelSet
    rtim_shared: SharedModels
    #: The decision API (:mod:`rtim.stream.api`).
    rtim_api: DecisionApi

    def __init__(self, settings: Settings) -> None:
        self.rtim_settings = settings
        super().__init__(settings.app_id, **faust_settings(settings))

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)

    def _new_web(self) -> RtimWeb:
        return RtimWeb(self)


def faust_settings(settings: Settings) -> dict[str, Any]:
    """The Faust configuration RTIM runs with.

    Short group timeouts: with Faust's default rebalance timeout (60 s) the first join on
    the embedded broker took 30 s, with 5 s it took 3 s; and a restarted worker waits for
    its old member's session timeout before the group rebalances.
    """
    return {
        **settings.kafka.faust_config(),
        "store": "rocksdb://" if settings.store == "rocksdb" else "memory://",
        "datadir": str(settings.datadir),
        "web_enabled": True,
        "web_port": settings.web_port,
        "web_bind": settings.web_host,
        "canonical_url": settings.canonical_url,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "broker_max_poll_records": settings.max_fetch_records,
        "broker_commit_interval": settings.commit_interval_s,
        "broker_session_timeout": settings.session_timeout_s,
        "broker_heartbeat_interval": max(settings.session_timeout_s / 10, 0.5),
        "broker_rebalance_timeout": max(settings.session_timeout_s / 2, 5.0),
        "stream_processing_timeout": settings.stall_error_s,
        "consumer_auto_offset_reset": "earliest",
        "stream_wait_empty": True,
        "table_standby_replicas": 0,
        "autodiscover": False,
        "logging_config": None,
        "TableManager": TableManager,
    }


def cause_partition(cause: Any) -> int | None:
    return None if cause is None else int(cause.partition)


class ClickstreamProcessor:
    """Runs each fetched batch through the engine and makes its effects durable."""

    def __init__(
        self, app: RtimApp, settings: Settings, table: Any, models: ModelSet | None = None
    ) -> None:
        self.app = app
        self.settings = settings
        self.store = ContextStore(table)
        catalog = load_catalog(settings.catalog)
        partitions = list(range(settings.partitions))
        self.engine = Engine(
            catalog=catalog,
            load=self.store.get,
            source=f"/rtim/{settings.app_id}",
            max_event_bytes=settings.max_event_bytes,
            max_future_skew_ms=int(settings.max_future_skew_s * 1000),
            trigger_ttl_ms=int(settings.trigger_ttl_s * 1000),
            cache_size=settings.cache_customers,
            dedupe_window_ms=int(settings.dedupe_window_s * 1000),
            # Kafka's default partitioner, as producers of the clickstream are asked to use.
            partition_of=self._partition_of,
            models=models,
            window_ms=int(settings.attribution_window_s * 1000),
            idle_ms=int(settings.idle_close_s * 1000),
        )
        self._partitions = partitions
        self.publisher: BatchPublisher | TransactionalPublisher
        if settings.processing_guarantee == "exactly_once":
            self.publisher = TransactionalPublisher(
                settings.kafka,
                app_id=settings.app_id,
                input_topic=CLICKSTREAM_TOPIC,
                client_id=f"{settings.app_id}-publisher",
                max_record_bytes=settings.max_record_bytes,
            )
            table.before_recovery = self._assigned
        else:
            self.publisher = BatchPublisher(
                settings.kafka,
                client_id=f"{settings.app_id}-publisher",
                max_record_bytes=settings.max_record_bytes,
            )
        self.changelog_topic = table.changelog_topic.get_topic_name()
        self._generation: int | None = None
        #: A generation whose membership was not confirmed after a publish: its batches
        #: are dropped until the rebalance asked for then (the store was discarded).
        self._fenced_generation: int | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()  # one batch at a time: fetched ones and idle ticks
        #: Decides the waiting decision requests in a batch about to finish; returns what
        #: to call with whether the batch was stored (:class:`rtim.stream.api.DecisionApi`).
        self.riders: Callable[[BatchRun], Callable[[bool], None]] | None = None
        #: The batch decision requests are decided in now (:meth:`request_run`): the one
        #: being built, or one begun for them while the previous batch is being
        #: persisted; and the generation it belongs to.
        self._open: BatchRun | None = None
        self._open_generation: int | None = None
        #: The task that stores the begun batch if no clickstream batch takes it.
        self._flusher: asyncio.Future[None] | None = None
        #: Decisions answered but not stored, being handed over (:meth:`_lost`), and the
        #: producer that does it (made when first needed).
        self._handing_over: set[asyncio.Future[None]] = set()
        self._handover: BatchPublisher | None = None
        #: The handover's producer class (tests stand one in).
        self.handover_producer: Callable[..., Any] = AIOKafkaProducer
        self._handover_lock = asyncio.Lock()
        #: Set once the live catalog is read (:class:`rtim.stream.catalog.LiveCatalog`
        #: clears it when it starts); batches wait for it.
        self.catalog_loaded = asyncio.Event()
        self.catalog_loaded.set()

    def _partition_of(self, key: bytes) -> int:
        return self.publisher.partition_for(key, self._partitions)

    async def wait_idle(self) -> None:
        """Return once no batch is being processed, and the decision requests answered
        before they were stored are stored (Faust waits for this before it commits on a
        revocation, and at shutdown)."""
        await self._idle.wait()
        if self._open is not None:
            await self._flush_open(self._open, linger=False)

    def _current(self, batch: FetchedBatch) -> bool:
        # A stopping worker stores no more fetched records (they come again to the next
        # owner), but still stores a batch without any: nothing of it would come again
        # (decision requests already answered, windows an idle tick closed).
        return (
            batch.generation_id == self.app.consumer_generation_id
            and batch.generation_id != self._fenced_generation
            and not (self.app.should_stop and batch.records)
        )

    async def handle(self, batch: FetchedBatch) -> None:
        """Process one batch: core, publish, store, acknowledge."""
        if not self.catalog_loaded.is_set():
            await self.catalog_loaded.wait()
        async with self._lock:
            await self._busy(batch)

    async def _busy(self, batch: FetchedBatch, run: BatchRun | None = None) -> bool:
        """:meth:`_handle` with the processor marked busy (``wait_idle`` waits for it);
        the caller holds the lock."""
        self._idle.clear()
        try:
            return await self._handle(batch, run)
        finally:
            self._idle.set()

    async def handle_requests(self, generation: int) -> None:
        """A batch of decision requests alone (no records); a failure is logged and
        forgets the cache. The caller holds the lock."""
        try:
            await self._busy(FetchedBatch(generation, {}))
        except Exception:
            log.exception("decision requests failed")
            self.engine.invalidate()

    async def set_catalog(self, catalog: Catalog) -> None:
        """Decide with ``catalog`` from the next batch on."""
        async with self._lock:
            self.engine.set_catalog(catalog)
        metrics.start_at_zero(
            CLICKSTREAM_TOPIC, ((c, o.id) for o in catalog.offers for c in o.channels)
        )

    async def tick(self) -> None:
        """Close the attribution windows of partitions that received nothing for
        ``RTIM_IDLE_CLOSE_S`` (wall-clock time), as a batch of its own."""
        if self._lock.locked() or self._generation is None:
            return  # a batch is in progress: it moves the stream time itself
        async with self._lock:
            generation = self.app.consumer_generation_id
            if generation != self._generation or self.app.rebalancing:
                return
            run = self.engine.tick(int(time.time() * 1000), self._take_open(generation))
            if run is None:
                return
            await self._busy(FetchedBatch(generation, {}), run)

    def request_run(self) -> BatchRun | None:
        """The batch a decision request answered before it is stored is decided in now
        (docs/architecture.md, "The decision API"), or None when none may be: the worker
        is between generations, or the live catalog is not read yet.

        While a batch is being built, its own. Otherwise one begun now, even while the
        previous batch is being published: it follows that batch (the next clickstream
        batch, or a batch of its own, takes it) and is dropped if that batch is not
        stored, since its contexts grew from that batch's.
        """
        generation = self.app.consumer_generation_id
        if (
            generation is None
            or generation != self._generation
            or generation == self._fenced_generation
            or not self.catalog_loaded.is_set()
            or self.app.rebalancing
        ):
            return None
        if self._open is None:
            # Not trimmed: the batch being published has not stored its contexts yet.
            self._open = self.engine.start_batch(CLICKSTREAM_TOPIC, trim=False)
            self._open_generation = generation
            self._flusher = asyncio.ensure_future(self._flush_open(self._open))
        return self._open

    async def _flush_open(self, run: BatchRun, *, linger: bool = True) -> None:
        """Publish and store a begun batch of decision requests, unless a clickstream batch
        takes it first: while events flow, the next one comes within a fetch's wait."""
        if linger:
            await asyncio.sleep(self.settings.fetch_max_wait_ms / 1000)
        async with self._lock:
            if self._open is not run or self._open_generation is None:
                return
            await self.handle_requests(self._open_generation)

    def _take_open(self, generation: int) -> BatchRun | None:
        """The begun batch of decision requests, for a batch of ``generation`` to build on
        (None if there is none, or it was begun in another generation: then it is lost).

        Called under the processor's lock, so the batch it was begun on is stored by now:
        the cache is trimmed, keeping what the begun batch changed.
        """
        run, self._open = self._open, None
        if run is None:
            return None
        if self._open_generation != generation:
            self._lost(run)
            return None
        self.engine.trim_cache(keep=run)
        return run

    def _lost(self, run: BatchRun | None) -> None:
        """A batch with requests answered before they were stored was not stored: their
        decision records are handed over on rtim.responses, to whichever worker owns
        their customers now (this one, if it keeps them), which adopts them
        (:meth:`BatchRun.add_responses`)."""
        if run is None or not run.answered_early:
            return
        decisions, run.answered_early = run.answered_early, []
        records = [
            OutRecord(
                RESPONSES_TOPIC,
                d.key,
                d.value,
                [*d.headers, (HANDOVER_HEADER, b"1")],
                self._partition_of(d.key),
            )
            for d in decisions
        ]
        task = asyncio.ensure_future(self._hand_over(records))
        self._handing_over.add(task)
        task.add_done_callback(self._handing_over.discard)

    async def _hand_over(self, records: list[OutRecord]) -> None:
        """Publish handed-over decisions, with a producer of their own (this worker's
        batches may not be its to publish any more: fenced, or a transaction's producer
        taken over); retried for ``HANDOVER_TIMEOUT_S``, then counted lost."""
        refused = len(records)
        delay = 0.2
        deadline = time.monotonic() + HANDOVER_TIMEOUT_S
        async with self._handover_lock:
            while True:
                try:
                    if self._handover is None:
                        self._handover = BatchPublisher(
                            self.settings.kafka,
                            client_id=f"{self.settings.app_id}-handover",
                            max_record_bytes=self.settings.max_record_bytes,
                            producer_class=self.handover_producer,
                        )
                    await self._handover.start()
                    await self._handover.publish(records)
                    refused = len(self._handover.refused)
                    break
                except (TimeoutError, KafkaError, OSError) as exc:
                    if self.app.should_stop or time.monotonic() + delay > deadline:
                        log.error("could not hand decisions over (%r)", exc)
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                except Exception:
                    log.exception("could not hand decisions over")
                    break
        handed = len(records) - refused
        if handed:
            metrics.API_DECISIONS_HANDED_OVER.inc(handed)
            log.warning(
                "%d answered decision requests not stored here (their partitions moved, or "
                "the batch before them failed): handed over to their customers' owner",
                handed,
            )
        if refused:
            metrics.API_DECISIONS_LOST.inc(refused)
            log.warning(
                "%d answered decision requests neither stored nor handed over: not counted "
                "as contacts, not learned",
                refused,
            )

    async def stop_handing_over(self, timeout: float) -> None:
        """At shutdown: let the decisions being handed over go out, within ``timeout``."""
        if self._handing_over:
            await asyncio.wait(set(self._handing_over), timeout=timeout)
        if self._handover is not None:
            await self._handover.stop(timeout=timeout)

    def _new_generation(self, generation: int) -> None:
        """Partitions may have moved, and recovery may have rewritten the store."""
        engine = self.engine
        engine.invalidate()  # cached contexts are stale
        # With the cache emptied, a full collection is short; while processing waits for
        # the rebalance, it costs no request its latency.
        tune_gc()
        self.store.recount()
        metrics.CONSUMER_LAG.clear()  # partitions may have moved to other workers
        engine.forget_windows()
        wall_ms = int(time.time() * 1000)
        owned = sorted(
            tp.partition for tp in self._consumer().assignment() if tp.topic == CLICKSTREAM_TOPIC
        )
        started = time.perf_counter()
        found = sum(
            engine.index_windows(p, self.store.items(p, self._partition_of), wall_ms) for p in owned
        )
        log.info(
            "partitions %s: %d customers with open attribution windows (read in %.2f s)",
            owned,
            found,
            time.perf_counter() - started,
        )
        self._generation = generation

    async def _handle(self, batch: FetchedBatch, run: BatchRun | None = None) -> bool:
        """Whether the batch was published and stored (False: dropped, it was not ours)."""
        settle: list[Callable[[bool], None]] = []
        stored = False
        try:
            stored = await self._run_batch(batch, run, settle)
        finally:
            for done in settle:
                done(stored)
        return stored

    async def _run_batch(
        self, batch: FetchedBatch, run: BatchRun | None, settle: list[Callable[[bool], None]]
    ) -> bool:
        if not self._current(batch):
            return False  # revoked meanwhile: the records come again from the committed offset
        if batch.generation_id != self._generation:
            self._new_generation(batch.generation_id)
        if run is None:
            run = self._take_open(batch.generation_id) or self.engine.start_batch(CLICKSTREAM_TOPIC)
        stored = False
        try:
            stored = await self._build_and_store(batch, run, settle)
        finally:
            if not stored:
                # Nothing of it is stored: neither is what was begun on top of it.
                self._lost(run)
                self._lost(self._open)
                self._open = None
        return stored

    async def _build_and_store(
        self, batch: FetchedBatch, run: BatchRun, settle: list[Callable[[bool], None]]
    ) -> bool:
        started = time.perf_counter()
        records = [r for tp_records in batch.records.values() for r in tp_records]
        loop = asyncio.get_running_loop()
        self._open, self._open_generation = run, batch.generation_id
        try:
            # (Once the run is the open one: a request waiting now is decided in it.)
            await give_way(loop)
            for tp, tp_records in batch.records.items():
                add = run.add_responses if tp.topic == RESPONSES_TOPIC else run.add
                for i in range(0, len(tp_records), PEEK_CHUNK):
                    add(tp_records[i : i + PEEK_CHUNK])
                    if (i + PEEK_CHUNK) % CORE_CHUNK:
                        await give_way(loop)
                    else:
                        # A turn for the rest of the worker (health checks, the consumer
                        # thread's results, heartbeats) while the core works on a big batch.
                        await asyncio.sleep(0)
        finally:
            self._open = None
        if self.riders is not None:
            # Decision requests waiting for the lock ride this batch (one publish for all).
            settle.append(self.riders(run))
        result = run.finish()
        await give_way(loop)
        core_done = time.perf_counter()
        metrics.BATCH_STAGES["core"].observe(core_done - started)
        # Each output names the input partition that caused it (its source): a context's
        # partition is its input partition.
        out: list[OutRecord] = [
            OutRecord(self.changelog_topic, key, value, [], partition, partition)
            for partition, items in result.updates.items()
            for key, value in items.items()
        ]
        out.extend(
            OutRecord(t.topic, t.key, t.value, t.headers, None, cause_partition(t.cause))
            for t in result.triggers
        )
        out.extend(
            OutRecord(DLQ_TOPIC, d.key, d.value, d.headers, None, d.partition)
            for d in result.dead_letters
        )
        # Re-keyed copies go out with the batch's other outputs: the records they
        # copy are acknowledged only once the copies are in Kafka.
        out.extend(
            OutRecord(r.topic, r.key, r.value, r.headers, r.partition, r.record.partition)
            for r in result.rekeyed
        )
        out.extend(
            OutRecord(DECISIONS_TOPIC, d.key, d.value, d.headers, None, cause_partition(d.cause))
            for d in result.decisions
        )
        # Two records per example: its offer's, and the pooled model's (training_records).
        out.extend(
            OutRecord(TRAINING_TOPIC, key, value, [], None, e.partition)
            for e in result.examples
            for key, value in training_records(e)
        )
        # Last (_dead_letter_refused reads the outputs above by their position).
        heal = self.store.to_heal(tp.partition for tp in batch.records)
        out.extend(
            OutRecord(self.changelog_topic, key, value, [], partition, partition)
            for partition, items in heal.items()
            for key, value in items.items()
            if key not in result.updates.get(partition, ())
        )
        await give_way(loop)
        written = await self._publish(out, batch)
        refused = written is not None and self.publisher.refused and self._current(batch)
        if refused and not await self._dead_letter_refused(run, result, out, batch):
            written = None
        if written is None or not self._current(batch):
            await self._abandon()
            self.engine.invalidate()
            return False
        written = await self._seal(batch, written)
        if written is None:
            # Published, maybe after another owner's records: nothing of it is stored
            # (the persisted changelog offset stays before them), and recovery reads
            # these partitions again from the start, keeping the newest context per key.
            self.store.distrust(result.updates)
            self.engine.invalidate()
            self._fenced_generation = batch.generation_id
            await self._consumer().rejoin()  # if still a member, recover all the same
            return False
        published = time.perf_counter()
        metrics.BATCH_STAGES["publish"].observe(published - core_done)
        for partition, items in result.updates.items():
            if items:  # (none left if Kafka refused them all)
                await give_way(loop)
                self.store.write(partition, items, written[(self.changelog_topic, partition)])
        self.store.added(result.new_customers)
        self.store.healed(heal)
        metrics.BATCH_STAGES["store"].observe(time.perf_counter() - published)
        await give_way(loop)
        consumer = self._consumer()
        for tp, tp_records in batch.records.items():
            if isinstance(self.publisher, TransactionalPublisher):
                consumer.committed_in_transaction(tp, tp_records[-1].offset + 1)
            else:
                consumer.ack_batch(tp, [r.offset for r in tp_records])
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                max(0, (consumer.highwater(tp) or 0) - tp_records[-1].offset - 1)
            )
        responses = sum(len(r) for tp, r in batch.records.items() if tp.topic == RESPONSES_TOPIC)
        self._observe(result, len(records), responses, started)
        return True

    async def _publish(self, out: list[OutRecord], batch: FetchedBatch) -> dict | None:
        """Publish until Kafka takes it; None if the batch stopped being ours meanwhile."""
        delay = 0.2
        while True:
            try:
                if not await self._still_member(batch, "before_publish"):
                    return None
                await self.publisher.start()
                return await self.publisher.publish(out)
            except Fenced as exc:
                await self._fenced(batch, exc)
                return None
            except (TimeoutError, KafkaError, OSError) as exc:
                metrics.PUBLISH_RETRIES.inc()
                log.warning("publish failed (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                if not self._current(batch):
                    return None

    async def _dead_letter_refused(
        self, run: BatchRun, result: BatchResult, out: list[OutRecord], batch: FetchedBatch
    ) -> bool:
        """Dead-letter the causes of the records Kafka refused (the core says which);
        False if the batch stopped being ours meanwhile.

        A dead letter refused in turn goes again without its value; if that is
        refused too, it is logged and dropped: never retried forever.
        """
        contexts = sum(len(items) for items in result.updates.values())
        triggers = contexts + len(result.triggers)
        letters_end = triggers + len(result.dead_letters)
        rekeyed_end = letters_end + len(result.rekeyed)
        decisions_end = rekeyed_end + len(result.decisions)
        examples_end = decisions_end + 2 * len(result.examples)
        letters: list[DeadLetter] = []
        for index, exc in self.publisher.refused:
            rec = out[index]
            metrics.RECORDS_REFUSED.inc()
            log.error(
                "Kafka refused a record for %s (%r): its cause is dead-lettered", rec.topic, exc
            )
            if index < contexts:
                assert rec.key is not None and rec.partition is not None
                letters.extend(run.refuse_context(rec.partition, rec.key, exc))
            elif index < triggers:
                cause = result.triggers[index - contexts].cause
                if cause is not None:
                    letters.append(run.refused(cause, exc))
            elif index < letters_end:
                letters.append(without_value(result.dead_letters[index - triggers], exc))
            elif index < rekeyed_end:
                letters.append(run.refused(result.rekeyed[index - letters_end].record, exc))
            elif index < decisions_end:
                cause = result.decisions[index - rekeyed_end].cause
                if cause is not None:
                    letters.append(run.refused(cause, exc))
            elif index < examples_end:
                example = result.examples[(index - decisions_end) // 2]
                log.error(
                    "Kafka refused the training example of decision %s (%r): not learned",
                    example.decision_id,
                    exc,
                )
            # else: a stored context published again to heal the changelog; it stays
            # stored, and is published again with the partition's next batch.
        while letters:
            records = [
                OutRecord(DLQ_TOPIC, d.key, d.value, d.headers, None, d.partition) for d in letters
            ]
            if await self._publish(records, batch) is None:
                return False
            smaller = []
            for index, exc in self.publisher.refused:
                metrics.RECORDS_REFUSED.inc()
                if letters[index].value is None:
                    log.error("Kafka refused a dead letter without its value (%r): dropped", exc)
                else:
                    smaller.append(without_value(letters[index], exc))
            letters = smaller
        return True

    async def _seal(self, batch: FetchedBatch, written: dict) -> dict | None:
        """Make the published batch this worker's, or find that it is not (None); the last
        offsets written.

        At least once: the coordinator confirms the membership after the publish.
        Exactly once: the batch's transactions commit, with its next offsets.
        """
        if not isinstance(self.publisher, TransactionalPublisher):
            return written if await self._still_member(batch, "after_publish") else None
        offsets: dict[int, dict[str, int]] = {}
        for tp, records in batch.records.items():
            offsets.setdefault(tp.partition, {})[tp.topic] = records[-1].offset + 1
        try:
            return await self.publisher.commit(
                offsets, self.settings.app_id, lambda: self._current(batch)
            )
        except Fenced as exc:
            self._log_fenced(batch, exc)
            return None

    async def _abandon(self) -> None:
        """Exactly once: abort the transactions of a batch that is dropped."""
        if isinstance(self.publisher, TransactionalPublisher):
            await self.publisher.abort()

    async def _fenced(self, batch: FetchedBatch, exc: Fenced) -> None:
        """Exactly once, a producer fenced while the batch was being published: nothing of
        it is visible (its transactions are aborted) or stored; the worker drops that
        generation's batches and rejoins its group, as when its membership is lost."""
        self._log_fenced(batch, exc)
        self.engine.invalidate()
        self._fenced_generation = batch.generation_id
        await self._consumer().rejoin()

    @staticmethod
    def _log_fenced(batch: FetchedBatch, exc: Fenced) -> None:
        metrics.BATCHES_FENCED.labels("transaction").inc()
        log.warning(
            "producer fenced (%s): batch of %d records dropped",
            exc,
            sum(len(r) for r in batch.records.values()),
        )

    async def _assigned(self, assigned: set[Any]) -> None:
        """Exactly once: start the producers of the assigned clickstream partitions (which
        fences their earlier owners' producers) before their contexts are recovered."""
        assert isinstance(self.publisher, TransactionalPublisher)
        partitions = {tp.partition for tp in assigned if tp.topic == CLICKSTREAM_TOPIC}
        delay = 0.5
        while not self.app.should_stop:
            try:
                await self.publisher.assign(partitions)
                return
            except (TimeoutError, KafkaError, OSError) as exc:
                log.warning(
                    "transactional producers not started (%r); retrying in %.1f s", exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _consumer(self) -> BatchConsumer:
        consumer = self.app.consumer
        assert isinstance(consumer, BatchConsumer)
        return consumer

    async def _still_member(self, batch: FetchedBatch, stage: str) -> bool:
        """Whether the coordinator confirms, now, the membership that fetched ``batch``.

        The fence against a worker that was paused or cut off past its session
        timeout (docs/architecture.md, "Zombie writers"). Before the publish, a recent
        accepted check is enough (:meth:`BatchConsumer.membership_lease`); after it,
        the coordinator is always asked. False if it refused;
        raises TimeoutError if it did not answer (before the publish, the batch is
        retried; after it, :meth:`_handle` stores nothing).
        """
        consumer = self._consumer()
        if stage == "before_publish" and consumer.membership_lease(batch.generation_id):
            # The previous batch's check (after its publish) still holds; after it
            # is decided whether this batch is stored.
            return True
        asked = time.perf_counter()
        member = await consumer.confirm_membership(batch.generation_id)
        metrics.BATCH_STAGES["fence"].observe(time.perf_counter() - asked)
        if member is None and stage == "before_publish":
            raise TimeoutError("the group coordinator did not confirm this worker's membership")
        if not member:
            metrics.BATCHES_FENCED.labels(stage).inc()
            log.warning(
                "no longer a member of generation %d (%s): batch of %d records dropped",
                batch.generation_id,
                stage.replace("_", " "),
                sum(len(r) for r in batch.records.values()),
            )
        return bool(member)

    @staticmethod
    def _observe(result: Any, n: int, responses: int, started: float) -> None:
        """Count what a stored batch of ``n`` records (``responses`` of them from
        rtim.responses) consumed, changed and produced."""
        metrics.EVENTS_CONSUMED.labels(CLICKSTREAM_TOPIC).inc(n - responses)
        if responses:
            metrics.EVENTS_CONSUMED.labels(RESPONSES_TOPIC).inc(responses)
        for (outcome, joined), count in result.responses.items():
            metrics.RESPONSES.labels(outcome, joined).inc(count)
        for adopted, count in result.adopted.items():
            metrics.API_DECISIONS_ADOPTED.labels(adopted).inc(count)
        offered = sum(1 for d in result.decisions if d.offered)
        metrics.DECISIONS.labels("yes").inc(offered)
        metrics.DECISIONS.labels("no").inc(len(result.decisions) - offered)
        for example in result.examples:
            label = "positive" if example.converted else "negative"
            metrics.TRAINING_EXAMPLES.labels(label, example.why).inc()
        metrics.EVENTS_APPLIED.inc(result.applied)
        metrics.EVENTS_DUPLICATE.inc(result.duplicates)
        for rekeyed in result.rekeyed:
            metrics.EVENTS_REKEYED.labels(rekeyed.reason).inc()
        metrics.CONTEXT_WRITES.inc(sum(len(i) for i in result.updates.values()))
        metrics.DECISIONS_NO_OFFER.inc(result.no_offer)
        for reason, count in result.rejected.items():
            metrics.OFFERS_REJECTED.labels(reason).inc(count)
        for reason, count in result.invalid.items():
            metrics.EVENTS_DEAD_LETTERED.labels(reason).inc(count)
        now_ms = time.time() * 1000
        for trig in result.triggers:
            metrics.TRIGGERS_SENT.labels(trig.channel, trig.offer_id).inc()
            if trig.source_ms:
                metrics.DECISION_LATENCY.observe(max(0.0, (now_ms - trig.source_ms) / 1000))
        metrics.BATCH_RECORDS.observe(n)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)


def create_app(settings: Settings) -> RtimApp:
    """Build the RTIM Faust app for these settings."""
    app = RtimApp(settings)

    def raw_topic(name: str) -> Any:
        # bytes in, bytes out: the core parses the records itself
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )

    clickstream = raw_topic(CLICKSTREAM_TOPIC)
    table = app.tables.add(
        ContextTable(  # app.Table(), with recovery that keeps the newest context
            app,
            name=CONTEXT_TABLE,
            beacon=app.tables.beacon,
            key_type=bytes,  # bytes types make Faust use the "raw" codec (serialised by RTIM)
            value_type=bytes,
            partitions=settings.partitions,
        )
    )
    responses = raw_topic(RESPONSES_TOPIC)
    # The offer models decisions are made with, kept current from rtim.models.
    app.rtim_models = ModelSet()
    processor = ClickstreamProcessor(app, settings, table, app.rtim_models)
    broker = BrokerHealth(settings.kafka, client_id=f"{settings.app_id}-health", loop=app.loop)
    app.add_dependency(broker)  # started and stopped with the app
    app.rtim_shared = SharedModels(settings, app.rtim_models, loop=app.loop)
    app.add_dependency(app.rtim_shared)
    install_view(app, app.rtim_shared)
    # The live catalog: the file given at start is version 0, until rtim.offers has one.
    live = LiveCatalog(
        settings.kafka,
        client_id=f"{settings.app_id}-catalog",
        current=CatalogVersion(version=0, source=str(settings.catalog)),
        swap=processor.set_catalog,
        # The clickstream is decided with the live catalog from the first record on.
        loaded=processor.catalog_loaded,
        loop=app.loop,
    )
    app.add_dependency(live)
    app.rtim_api = DecisionApi(app, processor, live)
    processor.riders = app.rtim_api.ride
    install_api(app, app.rtim_api)

    # Subscribe the consumer to the clickstream, and hand its records to the
    # processor a fetch at a time instead of one message at a time.
    app.topics.add(clickstream)
    # Responses are co-partitioned with the clickstream (same partition count): Faust's
    # assignor gives partition p of both to the same worker, the owner of the contexts.
    app.topics.add(responses)
    consumer = app.consumer
    assert isinstance(consumer, BatchConsumer)
    consumer.route_batches(
        {CLICKSTREAM_TOPIC, RESPONSES_TOPIC}, processor.handle, processor.wait_idle
    )

    @app.timer(interval=IDLE_TICK_S)
    async def close_idle_windows() -> None:
        await processor.tick()

    @app.on_before_shutdown.connect
    async def stop_publisher(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Sent after the consumer stopped and the last batch finished.
        await processor.publisher.stop(timeout=PUBLISHER_STOP_TIMEOUT)
        await processor.stop_handing_over(timeout=PUBLISHER_STOP_TIMEOUT)

    install_views(app, processor, broker)
    return app


#: How often partitions that receive nothing are checked for windows to close.
IDLE_TICK_S = 1.0
#: Seconds a worker keeps trying to hand over decisions it answered but could not store.
HANDOVER_TIMEOUT_S = 30.0

#: Seconds the publisher gets at shutdown to deliver what it holds (nothing, after a
#: batch finished; records of a batch cut short are given up: their input comes again).
PUBLISHER_STOP_TIMEOUT = 2.0


def is_ready(app: RtimApp, broker: BrokerHealth) -> bool:
    """Ready: started, reaching Kafka, not rebalancing or stopping, and the tables recovered."""
    try:
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
    except Exception:  # not started yet
        return False
    return bool(
        app.started and broker.up and not app.rebalancing and recovered and not app.should_stop
    )


def install_views(app: RtimApp, processor: ClickstreamProcessor, broker: BrokerHealth) -> None:
    metrics.observe_gc_pauses()
    metrics.start_at_zero(
        CLICKSTREAM_TOPIC,
        ((c, o.id) for o in processor.engine.catalog.offers for c in o.channels),
    )
    metrics.CONTEXT_CUSTOMERS.set_function(processor.store.size)
    metrics.OPEN_WINDOWS.set_function(processor.engine.open_windows)
    metrics.WORKER_READY.set_function(lambda: 1.0 if is_ready(app, broker) else 0.0)

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        body, _ = metrics.exposition()
        return web.bytes(body, content_type="text/plain; version=0.0.4")

    @app.page("/health/live")
    async def live_view(web: Any, request: Any) -> Any:
        alive = not app.should_stop and not app._crashed.is_set()
        return web.json({"live": alive}, status=200 if alive else 503)

    @app.page("/health/ready")
    async def ready_view(web: Any, request: Any) -> Any:
        ready = is_ready(app, broker)
        return web.json({"ready": ready}, status=200 if ready else 503)
