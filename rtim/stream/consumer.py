"""A Faust consumer that hands the clickstream to RTIM a whole fetch at a time.

Faust's own drain loop turns every record into a message and awaits a
conductor -> channel -> stream round for each (that path stays near 4-10k
events/s: docs/architecture.md, "Why Faust's consumer is subclassed").
:class:`BatchConsumer` changes one thing: records of the *batch topics* are
collected per fetch and handed over as one :class:`FetchedBatch`; records of
every other topic take Faust's normal path. Faust still owns the group,
assignment, tables, recovery, commits and rebalances:

- a batch is acknowledged (:meth:`BatchConsumer.ack_batch`) only after its
  effects are durable, so Faust commits no offset past unprocessed work (in
  exactly-once processing the batch's transactions commit its offsets instead, and
  :meth:`BatchConsumer.committed_in_transaction` keeps Faust's books);
- a batch is processed in the drain loop itself (not queued, so nothing can
  drop it after its read offsets moved on); records fetched while the flow is
  suspended for a rebalance are dropped before that, and Faust seeks back to
  the committed offsets (the engine recognises what it already applied);
- :meth:`BatchConsumer.wait_empty`, which Faust awaits before it commits on
  revocation and at shutdown, also waits for the batch being processed.

It also replaces ``highwaters`` (the end offsets that table recovery reads up
to) with :class:`~rtim.stream.endoffsets.EndOffsetProbe`, which is exact on the
embedded broker, whose ListOffsets under-reports (docs/architecture.md, "The
embedded broker's end offsets"), and on Kafka.

What this module depends on inside Faust and aiokafka
-----------------------------------------------------
tests/unit/test_faust_overrides.py fails, naming the method and what to re-check,
when the source of any method below changes; pyproject.toml pins the versions it
was checked against (faust-streaming 0.15.3, aiokafka 0.14.0, mode-streaming 0.7.1).

Methods replaced: ``Consumer._drain_messages`` and ``Consumer._new_offset``
(copied with changes), ``Consumer.perform_seek`` and ``wait_empty`` (wrapped; the
commits at stop bounded), ``ThreadDelegateConsumer.seek_to_committed`` (wrapped: the
partitions aiokafka's ``AIOKafkaConsumer.seek_to_committed`` leaves where they are, with
no committed offset or 0, sought to their beginning),
``ThreadDelegateConsumer.highwaters`` (with retries, so that table recovery waits for a
broker that went away), the aiokafka driver's
``Consumer._new_consumer_thread``, ``AIOKafkaConsumerThread._create_worker_consumer``
(wrapped) and ``AIOKafkaConsumerThread.on_thread_stop`` (mode's
``QueueServiceThread.on_thread_stop``, then aiokafka's ``consumer.stop()`` bounded by
:func:`~rtim.stream.endoffsets.stop_consumer`), and ``Transport.Consumer``; in
rtim/stream/app.py ``App._new_transport``, in rtim/stream/worker.py
``Worker._on_sigusr1`` and ``Worker._schedule_shutdown`` (wrapped); in
rtim/stream/store.py ``Collection.apply_changelog_batch`` (``ContextTable``: stale
contexts filtered out, then Faust's) and ``Collection.on_rebalance`` (its
``before_recovery`` hook first: the exactly-once producers), built in rtim/stream/app.py
as ``App.Table`` does.

Private state read or written, on Faust's consumer (created in its ``__init__``):

- ``_acked`` (per partition, the acknowledged offsets not yet committed, sorted by
  ``_new_offset``) and ``_acked_index`` (the same as a set): written by
  :meth:`BatchConsumer.ack_batch` and :meth:`BatchConsumer._new_offset`;
- ``_committed_offset`` (per partition, the offset Faust last committed or sought
  to): read by both, and raised back by :meth:`BatchConsumer.perform_seek`;
- ``_read_offset`` (per partition, the last offset the drain loop handed on):
  read and written by :meth:`BatchConsumer._drain_messages` and ``_read_again``;
- ``_gap`` (per partition, an ``IntervalTree`` of offsets never delivered):
  written through ``_add_gap``, read and chopped by ``_new_offset``;
- ``_buffered_partitions``, and the methods ``_wait_next_records``, ``_add_gap``,
  ``_to_message``: used by the drain loop as Faust's own uses them;
- ``_stopped`` (mode's service event), on the consumer and on the fetcher;
- ``_thread`` and its ``_ensure_consumer()``: read by :meth:`partition_report`.

On aiokafka's group coordinator (``AIOKafkaConsumer._coordinator``): ``generation``,
``member_id``, ``group_id`` and ``_send_req``, by :meth:`ConsumerThread.confirm_membership`
(the membership fence), which sends the same Heartbeat as ``_do_heartbeat``.
On aiokafka's ``AIOKafkaConsumer``: ``_fetch_max_wait_ms`` and ``_isolation_level``
(written by :class:`ConsumerThread` before ``start()`` builds the fetcher from them), and, read
only by :meth:`partition_report`, ``_subscription.subscription.assignment`` and
each partition state's ``_position``; ``_client`` (closed by ``stop_consumer``
when ``stop()`` fails). On ``AIOKafkaProducer`` (``BatchPublisher.stop``):
``_sender.sender_task`` and ``client``. Elsewhere: the app's ``_crashed`` (the
liveness view in rtim/stream/app.py); mode's worker ``_signal_stop_time``,
``_signal_stop_future`` and its services' ``_children`` and ``state``
(rtim/stream/worker.py, when a stop takes too long); in rtim/stream/store.py, the
RocksDB store's ``_db_for_partition``, ``_dbs`` and ``offset_key`` (deleted by
``ContextStore.distrust``).

What the copied code leaves out compared with Faust's:

- ``_drain_messages`` (Faust's loop together with its ``getmany``): the
  ``broker_commit_every`` commit after N acknowledgements (RTIM commits on
  ``broker_commit_interval`` only); the scheduler's round-robin over topics (the
  batch path takes the whole fetch; other topics go in fetch order); the monitor's
  ``track_tp_end_offset`` per record (RTIM's lag gauge comes from the fetch high
  watermarks); the consumer-fetching diagnostic flag; the ``sleep(0)`` every 100
  records (the processor yields every ``CORE_CHUNK`` records); the debug log of
  records dropped below the read offset. A failing ``perform_seek`` when a fetch
  arrives with the flow suspended is logged and the loop goes on, as in Faust's.
- ``_new_offset``: Faust's merge of whole gap intervals past the highest
  acknowledged offset (here only up to it), its treatment of a committed offset of
  0 as none, and its ``None`` forever when the head of the list is missing (here
  :meth:`BatchConsumer._repair_hole` reads the partition again).
- ``perform_seek``: nothing; Faust's runs first, unchanged.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import (
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from aiokafka.protocol.group import HeartbeatRequest, JoinGroupRequest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from rtim.settings import Settings
from rtim.stream.endoffsets import EndOffsetProbe, stop_consumer

UNKNOWN_MEMBER_ID = JoinGroupRequest.UNKNOWN_MEMBER_ID
#: Heartbeat errors meaning "not a member of that generation (any more)".
MEMBERSHIP_REFUSED = frozenset(
    e.errno
    for e in (
        IllegalGenerationError,
        UnknownMemberIdError,
        RebalanceInProgressError,
    )
)


def rtim_settings(app: Any) -> Settings:
    """The settings the app was built with (``RtimApp.rtim_settings``)."""
    settings: Settings = app.rtim_settings
    return settings


@dataclass(slots=True)
class FetchedBatch:
    """The records of one fetch for the batch topics, per topic-partition."""

    generation_id: int
    records: dict[TP, list[Any]]


BatchSink = Callable[[FetchedBatch], Awaitable[None]]


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, with a fetch wait that is ours to set.

    Faust hard-codes ``fetch_max_wait_ms=1500``; a broker that holds each fetch
    for the whole wait when little data is there (the embedded one does) then
    adds up to 1.5 s to every decision. ``RTIM_FETCH_MAX_WAIT_MS`` is read from
    the app when the consumer is built (Faust builds this thread earlier, with
    the consumer).
    """

    #: Seconds the aiokafka consumer gets at shutdown to leave the group and close.
    close_timeout: float = 3.0

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        settings = rtim_settings(self.app)
        # Read by start(), when it builds the fetcher.
        consumer._fetch_max_wait_ms = settings.fetch_max_wait_ms
        if settings.processing_guarantee == "exactly_once":
            # The clickstream (re-keyed copies) and the changelog are written in
            # transactions: records of aborted ones must not be processed or recovered.
            # (Faust reads read_committed only with its own transactions turned on.)
            consumer._isolation_level = "read_committed"
        return consumer

    async def confirm_membership(self, generation_id: int, timeout: float) -> bool | None:
        """Ask the group coordinator whether this consumer is a member of ``generation_id``.

        One Heartbeat of that generation, from this thread (the coordinator's state
        lives here). True: accepted just now; False: refused (another generation,
        unknown member, a rebalance in progress) or this consumer knows it is no longer
        in that generation; None: no answer within ``timeout``.
        """
        coordinator = self._ensure_consumer()._coordinator
        member_id = coordinator.member_id
        if coordinator.generation != generation_id or member_id == UNKNOWN_MEMBER_ID:
            return False
        request = HeartbeatRequest(coordinator.group_id, generation_id, member_id)
        try:
            async with asyncio.timeout(timeout):
                response = await coordinator._send_req(request)
        except (KafkaError, TimeoutError, OSError):
            return None
        if response.error_code == 0:
            return True
        return False if response.error_code in MEMBERSHIP_REFUSED else None

    async def request_rejoin(self) -> None:
        """Make the consumer rejoin its group (a rebalance, then table recovery)."""
        self._ensure_consumer()._coordinator.request_rejoin()

    async def on_thread_stop(self) -> None:
        """Close the aiokafka consumer within ``close_timeout``, whatever the broker does.

        Faust's version awaits ``consumer.stop()`` as it is: with the broker gone it
        raises (:func:`~rtim.stream.endoffsets.stop_consumer` says why) and the
        thread ends without telling the worker, which then waits a minute
        (``shutdown_timeout``) for it.
        """
        # Faust's version minus its consumer.stop(): stop the method queue.
        try:
            await super(faust_aiokafka.AIOKafkaConsumerThread, self).on_thread_stop()
        finally:
            if self._consumer is not None:
                await stop_consumer(self._consumer, self.close_timeout)


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with a batch path for selected topics."""

    batch_topics: frozenset[str] = frozenset()
    _batch_sink: BatchSink | None = None
    _idle_waiters: list[Callable[[], Awaitable[None]]]
    _probe: EndOffsetProbe | None = None
    #: Seconds before a partition whose commit is stuck is read again once more.
    hole_repair_interval: float = 30.0
    _hole_repairs: dict[TP, tuple[int, float]]
    _repairing: set[asyncio.Future[None]]

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._idle_waiters = []
        self._hole_repairs = {}
        self._repairing = set()

    #: Seconds a membership check may wait for the coordinator's answer.
    fence_timeout: float = 5.0
    #: (generation, monotonic time) of the last membership check the coordinator
    #: accepted, the time taken before the request was even queued.
    _confirmed: tuple[int, float] | None = None

    def membership_lease(self, generation_id: int) -> bool:
        """Whether a membership check of ``generation_id`` was accepted recently enough
        that the coordinator cannot have dropped this worker since.

        Kafka's coordinator drops a member no sooner than the session timeout after a
        heartbeat it accepted, and a rebalance that starts later waits for it for the
        rebalance timeout; the lease is half the shorter of the two. A pause (GC,
        SIGSTOP) or a cut longer than that ends it: the next check asks again.
        """
        confirmed = self._confirmed
        if confirmed is None or confirmed[0] != generation_id:
            return False
        conf = self.app.conf
        lease = min(conf.broker_session_timeout, conf.broker_rebalance_timeout) / 2
        return time.monotonic() - confirmed[1] < lease

    async def confirm_membership(self, generation_id: int) -> bool | None:
        """Whether the group coordinator still counts this worker a member of ``generation_id``.

        A worker paused or cut off for longer than the session timeout is no longer a
        member, and its partitions may already be another worker's, without the worker
        knowing it yet (it learns it from its next heartbeat). Fetches need no
        membership, so such a worker goes on fetching and processing; only the
        coordinator's answer tells. True, False (refused) or None (no answer: see
        :meth:`ConsumerThread.confirm_membership`).
        """
        thread = self._thread
        assert isinstance(thread, ConsumerThread)
        asked = time.monotonic()
        try:
            # Bounded here too: the thread's method queue may be busy (a commit waiting
            # for a coordinator) or stopped (shutdown).
            async with asyncio.timeout(self.fence_timeout + 1.0):
                result: bool | None = await thread.call_thread(
                    thread.confirm_membership, generation_id, self.fence_timeout
                )
        except TimeoutError:
            return None
        self._confirmed = (generation_id, asked) if result else None
        return result

    async def rejoin(self) -> None:
        """Ask for a rebalance: every assigned table partition is then recovered again."""
        self._confirmed = None
        thread = self._thread
        assert isinstance(thread, ConsumerThread)
        try:
            async with asyncio.timeout(self.fence_timeout):
                await thread.call_thread(thread.request_rejoin)
        except TimeoutError:  # the heartbeat that found this worker gone rejoins anyway
            self.log.warning("could not ask for a rebalance within %.0f s", self.fence_timeout)

    def route_batches(
        self, topics: set[str], sink: BatchSink, wait_idle: Callable[[], Awaitable[None]]
    ) -> None:
        """Send records of ``topics`` to ``sink`` a fetch at a time.

        ``wait_idle`` must return once the batch being processed (if any) is
        done; it is awaited before Faust commits on revocation and shutdown.
        """
        self.batch_topics = frozenset(topics)
        self._batch_sink = sink
        self._idle_waiters.append(wait_idle)

    def ack_batch(self, tp: TP, offsets: list[int]) -> None:
        """Mark processed offsets of one partition as done (Faust commits them)."""
        committed = self._committed_offset[tp]
        acked_index = self._acked_index[tp]
        acked = self._acked[tp]
        for offset in offsets:
            if (committed is None or offset >= committed) and offset not in acked_index:
                acked_index.add(offset)
                acked.append(offset)

    def committed_in_transaction(self, tp: TP, offset: int) -> None:
        """Exactly once: a transaction committed ``offset`` for ``tp`` with the batch's
        outputs. Faust commits nothing for a batch that is not acknowledged to it; this
        keeps its books as its own commit would (the committed offset, no gaps below it:
        transaction markers in the clickstream would otherwise pile up there)."""
        committed = self._committed_offset.get(tp)
        if committed is None or offset > committed:
            self._committed_offset[tp] = offset
        gaps = self._gap.get(tp)
        if gaps:
            gaps.chop(0, offset)

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit for ``tp`` (None: nothing new), from its acknowledged offsets.

        Faust's own version breaks in two ways this one does not:

        - gap offsets are merged into the ack list without its index, so an
          offset can be in the list twice (Faust's gaps include the first
          offset after them, which is acknowledged too); each duplicate cuts
          the run of consecutive offsets, and a commit then moves by one
          offset per commit interval, or not at all;
        - offsets below the committed one (acknowledged again after a seek
          back) are kept at the head of the list and returned as the run.

        Here the list holds each offset once and only offsets from the
        committed one on; the run is found by bisection (the list is sorted
        and unique, so ``acked[i] - acked[0] == i`` exactly along the run).
        Faust's tolerance of one missing offset at the head is kept: the
        drain loop's read offset is either the last offset read or, after a
        seek, the next one to read.
        """
        acked = self._acked[tp]
        if not acked:
            return None
        index = self._acked_index[tp]
        gaps = self._gap.get(tp)
        if gaps:
            # Offsets in gaps (never delivered: transaction markers, compacted
            # records) up to the highest acknowledged one count as processed.
            top = max(acked)
            for interval in gaps.overlap(0, top + 1):
                for offset in range(interval.begin, min(interval.end, top + 1)):
                    if offset not in index:
                        index.add(offset)
                        acked.append(offset)
            gaps.chop(0, top + 1)
        acked.sort()
        committed = self._committed_offset[tp]
        if committed is not None:
            below = bisect.bisect_left(acked, committed)
            if below:
                index.difference_update(acked[:below])
                del acked[:below]
            if not acked:
                return None
            if acked[0] - committed > 1:
                self._repair_hole(tp, committed, acked[0])
                return None
        first = acked[0]
        run = bisect.bisect_right(range(len(acked)), 0, key=lambda i: acked[i] - first - i)
        index.difference_update(acked[:run])
        last = acked[run - 1]
        del acked[:run]
        return last + 1

    def _repair_hole(self, tp: TP, committed: int, acked_from: int) -> None:
        """Fetch ``tp`` again from its committed offset: records before ``acked_from`` are missing.

        Batches are acknowledged whole and in order, so acknowledged offsets
        past unacknowledged ones mean records that were read but will never be
        acknowledged, and Faust would never commit the partition again (its
        lag would grow without bound). Read again from the commit, they are
        processed (the engine recognises what it applied) and acknowledged.
        Once per committed offset and :attr:`hole_repair_interval`.
        """
        now = time.monotonic()
        last = self._hole_repairs.get(tp)
        if last is not None and last[0] == committed and now - last[1] < self.hole_repair_interval:
            return
        self._hole_repairs[tp] = (committed, now)
        self.log.warning(
            "%s: offsets %d..%d were read but not acknowledged; reading again from %d",
            tp,
            committed,
            acked_from - 1,
            committed,
        )
        task = asyncio.ensure_future(self._read_again(tp, committed))
        self._repairing.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._repairing.discard)

    async def _read_again(self, tp: TP, offset: int) -> None:
        # In the consumer's own thread (Faust's plain seek calls aiokafka from this one).
        try:
            await self.seek_wait({tp: offset})
        except Exception as exc:  # tried again after hole_repair_interval
            self.log.warning("%s: reading again from %d failed: %r", tp, offset, exc)
            return
        self._read_offset[tp] = offset if offset else None  # what the drain loop reads from

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek every assigned partition to its committed offset; a partition of the batch
        topics with none (or 0) to its beginning.

        aiokafka seeks only to a committed offset above 0: a partition never committed
        kept the position its last fetch left it at, so the records of a batch dropped
        since (its generation ended before it was stored) never came again (seen with
        the first records of ``rtim.responses``, handed-over decisions, in a rebalance).
        From the beginning is what the offset reset policy (earliest) says.
        """
        committed = await super().seek_to_committed()
        never = [
            tp for tp, offset in committed.items() if tp.topic in self.batch_topics and not offset
        ]
        if never:
            earliest = await self.earliest_offsets(*never)
            await self.seek_wait({tp: earliest[tp] for tp in never if tp in earliest})
        return committed

    async def perform_seek(self) -> None:
        """Seek to the committed offsets, never moving a tracked commit backwards.

        Faust sets the commit offsets it tracks to what the broker answers here.
        A commit of ours that lands while that answer is on its way makes it
        stale, and the tracked offset would go back below records that were
        acknowledged (and taken off the ack list by that commit) and read (so
        the drain loop skips them when they come again). Faust commits a
        partition only from its tracked offset on, so that partition would
        never be committed again. Only this worker commits its partitions
        (revocation forgets them), so the higher offset is the true one; the
        records between the two come again and are recognised as applied.
        """
        before = {tp: o for tp, o in self._committed_offset.items() if o is not None}
        await super().perform_seek()
        for tp, offset in before.items():
            if tp not in self._committed_offset:
                continue  # revoked meanwhile
            now = self._committed_offset[tp]
            if now is None or now < offset:
                self._committed_offset[tp] = offset

    #: Seconds the last commits at shutdown may take in all; after that the
    #: records processed since the previous commit come again to the next owner.
    stop_commit_timeout: float = 5.0
    _stop_commit_deadline: float | None = None
    _stop_commit_missed = False

    async def wait_empty(self) -> None:
        if not self.app.should_stop:
            await self._wait_empty()
            return
        # Stopping: Faust calls this twice, and aiokafka's commit waits for a
        # group coordinator for as long as the broker is gone.
        if self._stop_commit_deadline is None:
            self._stop_commit_deadline = self.loop.time() + self.stop_commit_timeout
        try:
            async with asyncio.timeout_at(self._stop_commit_deadline):
                await self._wait_empty()
        except TimeoutError:
            if not self._stop_commit_missed:
                self._stop_commit_missed = True
                self.log.warning(
                    "last commit not done within %.0f s (broker unreachable?): the records "
                    "processed since the previous commit will be read again",
                    self.stop_commit_timeout,
                )

    async def _wait_empty(self) -> None:
        for wait_idle in self._idle_waiters:
            await wait_idle()
        await super().wait_empty()

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        if self._probe is None:
            settings = rtim_settings(self.app)
            committed = settings.processing_guarantee == "exactly_once"
            self._probe = EndOffsetProbe(settings.kafka, committed=committed)
        # Table recovery crashes the worker if this raises: a broker that is away
        # for a moment is waited for (Faust gives up after broker_request_timeout).
        delay = 0.5
        while True:
            try:
                return await self._probe.end_offsets(partitions)
            except (KafkaError, TimeoutError, OSError) as exc:
                if self.should_stop:
                    raise
                self.log.warning(
                    "end offsets for table recovery not known (%r); retrying in %.1f s",
                    exc,
                    delay,
                )
                await self.sleep(delay)
                delay = min(delay * 2, 5.0)

    def partition_report(self) -> str:
        """One line per assigned partition: where fetching, reading and committing stand.

        For an operator asking why a partition makes no progress (``kill -USR1``
        on a worker logs it). Read from the consumer thread's state without
        locking: a snapshot, good enough to see a stuck or paused partition.
        """
        try:
            consumer = self._thread._ensure_consumer()
            assignment = consumer._subscription.subscription.assignment
        except Exception as exc:  # not started or not assigned yet
            return f"no assignment ({exc!r})"
        lines = []
        for tp in sorted(assignment.tps):
            state = assignment.state_value(tp)
            acked = self._acked.get(tp) or []
            gaps = self._gap.get(tp)
            lines.append(
                f"{tp.topic}[{tp.partition}] position={state._position} "
                f"highwater={state.highwater} paused={state.paused} "
                f"read={self._read_offset.get(tp)} committed={self._committed_offset.get(tp)} "
                f"acked={len(acked)} (from {min(acked) if acked else None}) "
                f"gaps={sorted((i.begin, i.end) for i in gaps) if gaps else []}"
            )
        return "\n".join(lines) or "no partitions assigned"

    async def on_stop(self) -> None:
        await super().on_stop()
        if self._probe is not None:
            await self._probe.stop()

    async def _drain_messages(self, fetcher: Any) -> None:  # mirrors Faust's loop
        # Faust's loop (faust.transport.consumer.Consumer._drain_messages) with
        # the batch path added; the per-record path is kept for other topics.
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        to_message = self._to_message
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                records, active_partitions = await self._wait_next_records(1.0)
                generation_id = self.app.consumer_generation_id
                if not records or self.should_stop:
                    await asyncio.sleep(0)
                    continue
                if not self.flow_active:
                    # A rebalance began while we fetched: drop the fetch, Faust
                    # seeks back to the committed offsets once it is over.
                    try:
                        await self.perform_seek()
                    except Exception as exc:  # broker gone: the next rebalance seeks again
                        self.log.warning("seek to the committed offsets failed: %r", exc)
                    continue
                batch: dict[TP, list[Any]] = {}
                others: list[tuple[TP, Any]] = []
                for tp, tp_records in records.items():
                    if active_partitions is not None and not (
                        tp in active_partitions or tp in self._buffered_partitions
                    ):
                        continue
                    r_offset = read_offset[tp]
                    fresh = [r for r in tp_records if r_offset is None or r.offset >= r_offset]
                    if not fresh:
                        continue
                    first = fresh[0].offset
                    if r_offset and first - r_offset > 1 and acks_enabled_for(tp.topic):
                        await self._add_gap(tp, r_offset + 1, first)
                    if tp.topic in self.batch_topics:
                        batch[tp] = fresh
                        read_offset[tp] = fresh[-1].offset
                    else:
                        others.extend((tp, r) for r in fresh)
                if batch and self._batch_sink is not None:
                    # Awaited here, not queued: a queued batch can be dropped by
                    # Faust (it clears stream buffers when the flow resumes) after
                    # its read offsets moved on, which would leave a gap that no
                    # commit passes. Not raced against suspend_flow either: a
                    # batch always finishes (wait_empty waits for it on revocation).
                    await self._batch_sink(FetchedBatch(generation_id, batch))
                    # What Faust's stream would note per event: that the partition's
                    # records reach processing. Its check of the event path
                    # (verify_event_path) logs an ERROR every few seconds, five minutes
                    # on, for a partition fetched but never marked.
                    monitor = self.app.monitor
                    if monitor is not None:
                        now = time.monotonic()
                        inbound = monitor.stream_inbound_time
                        for tp in batch:
                            inbound[tp] = now
                for tp, record in others:
                    if not self.flow_active or self.app.consumer_generation_id != generation_id:
                        break
                    await self.wait_first(
                        callback(to_message(tp, record)), self.suspend_flow.wait()
                    )
                    read_offset[tp] = record.offset
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise


class Transport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`BatchConsumer`."""

    Consumer = BatchConsumer
