"""The shared models: learning the training topic, and every snapshot swapped in.

Data flow (docs/architecture.md, "Shared models")::

    rtim.training --(group <app_id>-learners: Kafka shares the partitions)--> Learner
      --> every RTIM_MODEL_SNAPSHOT_INTERVAL_S, at revocation and at shutdown:
          changed offers' snapshots, then (acknowledged) the cursors --> rtim.models
    rtim.models --(every partition, from the start, no group)--> ModelBoard --> ModelSet.swap

The exactly-once argument is in :mod:`rtim.learn.learner`. Here: a partition
assigned to this worker's learner is read from its cursor only once the reader
has read the models topic up to its true end offsets as they were at the
assignment, so the board holds everything the previous owner published (it
publishes at revocation, before the group moves on; one that died published
less, and its partitions are read again from an older cursor).

Both loops run on the worker's event loop: the learner takes at most
:data:`LEARN_CHUNK` records per turn, and nothing here is on the clickstream's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import ConsumerStoppedError, KafkaError
from mode import Service

from rtim import metrics
from rtim.learn.learner import Flush, Learner, ModelBoard, cursor_record
from rtim.learn.models import ModelSet
from rtim.names import MODELS_TOPIC, TRAINING_TOPIC
from rtim.settings import KafkaConnection, Settings
from rtim.stream.endoffsets import EndOffsetProbe, stop_consumer

log = logging.getLogger("rtim.models")

#: Training records learned per turn of the event loop (about 26 us each: 3 ms a turn).
LEARN_CHUNK = 100
#: Models records read per turn of the event loop.
READ_CHUNK = 200
#: Seconds a flush may take (its records are published again with the next one).
PUBLISH_TIMEOUT = 10.0
#: Seconds each client gets to stop at shutdown.
STOP_TIMEOUT = 3.0
#: Bytes of a snapshot's record kept for its key and the record's framing.
SNAPSHOT_HEADROOM = 4096
#: Log lines about bad records per minute; the rest are counted in one line.
LOG_LINES_PER_MINUTE = 10


class Throttled:
    """At most ``per_minute`` lines a minute; then one line saying how many were not
    logged."""

    def __init__(self, logger: logging.Logger, per_minute: int = LOG_LINES_PER_MINUTE) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self._window = 0.0
        self._lines = 0
        self._dropped = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window >= 60:
            if self._dropped:
                self.logger.warning("%d more such lines were not logged", self._dropped)
            self._window, self._lines, self._dropped = now, 0, 0
        if self._lines < self.per_minute:
            self._lines += 1
            self.logger.warning(message, *args)
        else:
            self._dropped += 1


class SharedModels(Service):
    """This worker's learner and its reader of every model snapshot.

    Parameters
    ----------
    settings
        The worker's settings (connection, app id, snapshot interval, timeouts).
    models
        The models the engine decides with: every newer snapshot is swapped in.
    """

    def __init__(self, settings: Settings, models: ModelSet, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.kafka = settings.kafka
        self.models = models
        self.interval = settings.model_snapshot_interval_s
        self.group_id = f"{settings.app_id}-learners"
        self.board = ModelBoard()
        # A snapshot's record must fit what the producer sends (its key and headers too).
        self.learner = Learner(
            models.params,
            max_snapshot_bytes=max(
                settings.max_record_bytes // 2, settings.max_record_bytes - SNAPSHOT_HEADROOM
            ),
        )
        #: Per models partition, the offset after the last record the reader took.
        self.read_to: dict[int, int] = {}
        self.models_tps: list[TopicPartition] | None = None
        #: Set once every snapshot written before the start has been read and swapped in.
        self.loaded = asyncio.Event()
        self._read_progress = asyncio.Event()
        self._lock = asyncio.Lock()
        self._producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._probe = EndOffsetProbe(self.kafka)
        self._bad = Throttled(log)

    async def _fetch(
        self, consumer: AIOKafkaConsumer, topic: str, wait_ms: int, most: int
    ) -> dict[TopicPartition, list[Any]]:
        """The next records (none if reading failed: logged, and tried again a second later)."""
        try:
            batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
                timeout_ms=wait_ms, max_records=most
            )
            return batches
        except (KafkaError, ConsumerStoppedError) as exc:
            if not self.should_stop:
                log.warning("reading %s failed (%r); retrying", topic, exc)
                await self.sleep(1.0)
            return {}

    def _client(self, suffix: str) -> dict[str, Any]:
        return {**self.kafka.client_config(), "client_id": f"{self.settings.app_id}-{suffix}"}

    # -- the reader ------------------------------------------------------------

    @Service.task
    async def _read(self) -> None:
        reader = self._reader = AIOKafkaConsumer(
            **self._client("models-reader"),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        if not await self._start(reader):
            return
        partitions = await self._partitions(reader, MODELS_TOPIC)
        tps = [TopicPartition(MODELS_TOPIC, p) for p in partitions]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        self.models_tps = tps
        self._read_progress.set()
        while not self.should_stop:
            batches = await self._fetch(reader, MODELS_TOPIC, 500, READ_CHUNK)
            for tp, records in batches.items():
                for rec in records:
                    self._take(tp.partition, rec.offset, rec.key, rec.value)
                self.read_to[tp.partition] = records[-1].offset + 1
            if batches:
                self._read_progress.set()

    def _take(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        try:
            snapshot = self.board.add(key, value)
        except ValueError as exc:
            metrics.MODEL_RECORDS_INVALID.inc()
            self._bad.warning(
                "%s[%d]@%d skipped, not a model snapshot or cursor: %s",
                MODELS_TOPIC,
                partition,
                offset,
                exc,
            )
            return
        if snapshot is None:
            return
        self.models.swap(snapshot)
        offer = snapshot["offer"]
        made = snapshot.get("made_ms", 0) / 1000
        metrics.MODEL_VERSION.labels(offer).set(snapshot["version"])
        metrics.MODEL_SNAPSHOT_AGE.labels(offer).set_function(lambda: max(0.0, time.time() - made))

    @Service.task
    async def _load(self) -> None:
        ends = await self._models_ends()
        if ends is not None and await self.wait_read(ends):
            self.loaded.set()
            log.info("models read: %d offers", len(self.board.snapshots))

    async def _models_ends(self) -> dict[int, int] | None:
        """The models topic's true end offsets now (retried until the broker answers;
        None if the service stops first)."""
        delay = 0.5
        while not self.should_stop:
            try:
                async with asyncio.timeout(max(10.0, self.settings.session_timeout_s)):
                    ends = await self._probe.end_offsets(await self._models_tps())
                return {tp.partition: end for tp, end in ends.items()}
            except (KafkaError, TimeoutError) as exc:
                log.warning("end offsets of %s not known (%r); retrying", MODELS_TOPIC, exc)
                await self.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    async def wait_read(self, ends: dict[int, int]) -> bool:
        """Return True once the reader has read every models partition up to ``ends``;
        False if the service stops first."""
        while not all(self.read_to.get(p, 0) >= end for p, end in ends.items()):
            if self.should_stop:
                return False
            self._read_progress.clear()
            await self.wait_first(self._read_progress.wait(), timeout=1.0)
        return True

    async def _models_tps(self) -> list[TopicPartition]:
        while self.models_tps is None:
            self._read_progress.clear()
            await self._read_progress.wait()
        return self.models_tps

    # -- the learner -----------------------------------------------------------

    @Service.task
    async def _learn(self) -> None:
        session_ms = int(self.settings.session_timeout_s * 1000)
        consumer = self._consumer = AIOKafkaConsumer(
            **self._client("learner"),
            group_id=self.group_id,
            enable_auto_commit=False,  # the snapshots and cursors say where to resume
            auto_offset_reset="earliest",
            max_poll_records=LEARN_CHUNK,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(session_ms // 10, 500),
            rebalance_timeout_ms=max(session_ms // 2, 5000),
        )
        consumer.subscribe([TRAINING_TOPIC], listener=_Handover(self, consumer))
        if not await self._start(consumer):
            return
        next_flush = time.monotonic() + self.interval
        while not self.should_stop:
            batches = await self._fetch(consumer, TRAINING_TOPIC, 200, LEARN_CHUNK)
            if batches:
                async with self._lock:
                    for tp, records in batches.items():
                        for rec in records:
                            self._learned(tp.partition, rec.offset, rec.value, rec.key)
                await asyncio.sleep(0)
            if time.monotonic() >= next_flush:
                await self.flush()
                next_flush = time.monotonic() + self.interval

    def _learned(self, partition: int, offset: int, value: bytes | None, key: bytes | None) -> None:
        outcome = self.learner.learn(partition, offset, value, key)
        if outcome.result is None:
            return
        metrics.EXAMPLES_LEARNED.labels(outcome.result).inc()
        if outcome.result == "invalid":
            self._bad.warning(
                "%s[%d]@%d skipped, not a training example: %s",
                TRAINING_TOPIC,
                partition,
                offset,
                outcome.problem,
            )

    async def flush(self) -> bool:
        """Publish the changed offers' snapshots, then the cursors; False if Kafka did
        not take them (they go again with the next flush)."""
        async with self._lock:
            if not self.learner.changed:
                return True
            flush = self.learner.flush()
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await self._publish(
                        (s["offer"].encode(), orjson.dumps(s)) for s in flush.snapshots
                    )
                    await self._publish(cursor_record(p, o) for p, o in flush.cursors.items())
            except (KafkaError, OSError, TimeoutError) as exc:
                self.learner.unflushed(flush)
                log.warning(
                    "model snapshots not published (%r); they go again with the next ones", exc
                )
                return False
            self._published(flush)
            return True

    def _published(self, flush: Flush) -> None:
        self.learner.flushed(flush)
        metrics.MODEL_SNAPSHOTS_PUBLISHED.inc(len(flush.snapshots))

    async def _publish(self, records: Iterable[tuple[bytes, bytes]]) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(
                **self._client("models"),
                acks="all",
                linger_ms=5,
                max_request_size=self.settings.max_record_bytes,
            )
            await producer.start()
            self._producer = producer
        futures = [
            await self._producer.send(MODELS_TOPIC, value, key=key) for key, value in records
        ]
        for future in futures:
            await future

    async def take_over(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        """Resume newly assigned training partitions from the snapshots and cursors."""
        ends = await self._models_ends()
        if ends is None or not await self.wait_read(ends):
            return  # stopping: the partitions stay unread here
        training_ends = await self._training_ends(assigned)
        async with self._lock:
            for tp in sorted(assigned):
                cursor = self.board.cursors.get(tp.partition, 0)
                end = training_ends.get(tp)
                offset = self.learner.assign(tp.partition, self.board, end)
                if offset != cursor:
                    log.warning(
                        "%s[%d]: the cursor on %s (%d) is past the partition's end (%s): "
                        "the topic was made again, or the cursor was not written by a "
                        "learner; reading it from its start",
                        TRAINING_TOPIC,
                        tp.partition,
                        MODELS_TOPIC,
                        cursor,
                        end,
                    )
                consumer.seek(tp, offset)
        if assigned:
            log.info(
                "learning %s from %s",
                TRAINING_TOPIC,
                ", ".join(f"[{p}]@{o}" for p, o in sorted(self.learner.positions.items())),
            )

    async def _training_ends(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """The assigned training partitions' end offsets (none if the broker does not
        say within a session timeout: each cursor is then taken as it is)."""
        if not assigned:
            return {}
        try:
            async with asyncio.timeout(max(10.0, self.settings.session_timeout_s)):
                return dict(await self._probe.end_offsets(sorted(assigned)))
        except (KafkaError, TimeoutError) as exc:
            log.warning("end offsets of %s not known (%r)", TRAINING_TOPIC, exc)
            return {}

    async def hand_over(self, revoked: set[TopicPartition]) -> None:
        """Publish what was learned from partitions about to go, and forget them."""
        await self.flush()
        async with self._lock:
            self.learner.revoke(tp.partition for tp in revoked)

    # -- start and stop --------------------------------------------------------

    async def _start(self, client: AIOKafkaConsumer) -> bool:
        """Start a consumer (retried until the broker answers); False if stopping first."""
        delay = 0.5
        while not self.should_stop:
            try:
                await client.start()
                return True
            except KafkaError as exc:
                log.warning("models client not started (%r); retrying in %.1f s", exc, delay)
                await self.sleep(delay)
                delay = min(delay * 2, 5.0)
        return False

    @staticmethod
    async def _partitions(client: AIOKafkaConsumer, topic: str) -> list[int]:
        while True:
            try:
                # (aiokafka's metadata holds only the topics a client asked about)
                partitions = await client._client._wait_on_metadata(topic)
            except KafkaError:
                partitions = None
            if partitions:
                return sorted(partitions)
            await asyncio.sleep(0.5)

    async def on_stop(self) -> None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.flush()
        except TimeoutError:
            log.warning("last model snapshots not published: they are learned again")
        clients = [c for c in (self._consumer, self._reader) if c is not None]
        await asyncio.gather(
            *(stop_consumer(c, STOP_TIMEOUT) for c in clients),
            self._probe.stop(),
            self._stop_producer(),
        )

    async def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await producer.stop()
            except (Exception, asyncio.CancelledError) as exc:
                log.warning("models producer did not close cleanly (%r)", exc)

    def view(self, now_ms: int | None = None) -> list[dict[str, Any]]:
        """``GET /v1/models``: every offer's model, and whether this worker learns it."""
        rows = self.board.summaries(now_ms)
        for row in rows:
            row["learner"] = row["offer"] in self.learner.offers
        return rows


class _Handover(ConsumerRebalanceListener):
    def __init__(self, service: SharedModels, consumer: AIOKafkaConsumer) -> None:
        self.service = service
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.service.hand_over(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.service.take_over(self.consumer, assigned)


def install_view(app: Any, shared: SharedModels) -> None:
    @app.page("/v1/models")
    async def models_view(web: Any, request: Any) -> Any:
        return web.json({"loaded": shared.loaded.is_set(), "models": shared.view()})


async def read_models(kafka: KafkaConnection | str, timeout: float = 30.0) -> ModelBoard:
    """Every record of the models topic up to its true end offsets, on a board."""
    board = ModelBoard()
    consumer = AIOKafkaConsumer(
        **KafkaConnection.parse(kafka).client_config(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    async with asyncio.timeout(timeout):
        try:
            await consumer.start()
            tps = [
                TopicPartition(MODELS_TOPIC, p)
                for p in await SharedModels._partitions(consumer, MODELS_TOPIC)
            ]
            async with EndOffsetProbe(kafka) as probe:
                ends = await probe.end_offsets(tps)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            read = dict.fromkeys(tps, 0)
            while any(read[tp] < ends[tp] for tp in tps):
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for rec in records:
                        if rec.offset < ends[tp]:
                            try:
                                board.add(rec.key, rec.value)
                            except ValueError as exc:
                                log.warning(
                                    "%s[%d]@%d skipped: %s", tp.topic, tp.partition, rec.offset, exc
                                )
                    read[tp] = records[-1].offset + 1
        finally:
            await stop_consumer(consumer, STOP_TIMEOUT)
    return board
