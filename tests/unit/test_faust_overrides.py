"""The Faust and aiokafka code that RTIM's shell replaces, copies or reaches into is the
code it was written against.

rtim/stream/consumer.py, app.py, worker.py, store.py, fastpath.py and endoffsets.py override
Faust methods, copy some of them with changes, and read or write private attributes of
Faust and aiokafka objects (their docstrings say so). A new release can change any of that
without an error: the overrides would then silently do something else. Each entry below
is the hash of the source of one method RTIM depends on that way, for the versions
pinned in pyproject.toml; when one changes, the test names it and says what to re-check.
After re-checking, update the hash (the failure message shows the new one) and the pins.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from importlib.metadata import version

import pytest

#: "module:Class.method" -> (sha256 of its source, first 16 hex digits; what to re-check).
GUARDED: dict[str, tuple[str, str]] = {
    # BatchConsumer (rtim/stream/consumer.py)
    "faust.transport.consumer:Consumer.__init__": (
        "302410d59e6972d1",
        "the private state BatchConsumer reads and writes (_acked, _acked_index, _gap, "
        "_read_offset, _committed_offset, _buffered_partitions): names and types",
    ),
    "faust.transport.consumer:Consumer._drain_messages": (
        "44a2500309e83c63",
        "BatchConsumer._drain_messages is a copy of it with the batch path added: port "
        "the change into the copy",
    ),
    "faust.transport.consumer:Consumer._new_offset": (
        "1d2c7ea89a7ad4f1",
        "BatchConsumer._new_offset replaces it (ack list without duplicates, no offsets "
        "below the commit): check the fixed defects are still there and the gap handling",
    ),
    "faust.transport.consumer:Consumer.perform_seek": (
        "0e8c130ff4b0afd8",
        "BatchConsumer.perform_seek wraps it and undoes a stale committed offset: check "
        "that it still sets _committed_offset from the broker's answer",
    ),
    "aiokafka.consumer.consumer:AIOKafkaConsumer.seek_to_committed": (
        "f6cd85c8b70a4ccf",
        "BatchConsumer.seek_to_committed seeks the partitions it leaves alone (no committed "
        "offset, or 0) to their beginning: check whether it still leaves them",
    ),
    "faust.transport.consumer:Consumer.ack": (
        "5fcf41cf45153475",
        "BatchConsumer.ack_batch keeps the same books as ack (_acked, _acked_index) for a "
        "whole batch: keep them in step",
    ),
    "faust.transport.consumer:Consumer._add_gap": (
        "4df2573ded7c1c2c",
        "BatchConsumer._drain_messages calls it as Faust's loop does",
    ),
    "faust.transport.consumer:Consumer._wait_next_records": (
        "6218e1969a636b3f",
        "BatchConsumer._drain_messages calls it instead of getmany(): its return value",
    ),
    "faust.transport.consumer:Consumer._filter_committable_offsets": (
        "dc5e9baf5d994485",
        "Faust's commit path calls _new_offset (replaced by BatchConsumer) from here",
    ),
    "faust.transport.consumer:Consumer.wait_empty": (
        "e4662fe24f094819",
        "BatchConsumer.wait_empty awaits the batch in progress, then this",
    ),
    "faust.transport.consumer:ThreadDelegateConsumer.highwaters": (
        "3a2723b22582ffb7",
        "BatchConsumer.highwaters replaces it with EndOffsetProbe (table recovery reads "
        "up to these offsets)",
    ),
    "faust.transport.consumer:ThreadDelegateConsumer.seek_wait": (
        "e9db5bbc4ceb2543",
        "BatchConsumer._read_again seeks with it from the consumer's own thread",
    ),
    "faust.transport.drivers.aiokafka:Consumer._new_consumer_thread": (
        "0870ec53dea75083",
        "BatchConsumer._new_consumer_thread replaces it with ConsumerThread",
    ),
    "faust.transport.drivers.aiokafka:Consumer._to_message": (
        "7c24f6511b2fcef7",
        "BatchConsumer._drain_messages builds messages with it for the other topics",
    ),
    # ConsumerThread
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_worker_consumer": (
        "c2701bfc3e6f6cad",
        "ConsumerThread._create_worker_consumer sets the aiokafka consumer's "
        "_fetch_max_wait_ms after it: check Faust still hard-codes fetch_max_wait_ms",
    ),
    "aiokafka.consumer.consumer:AIOKafkaConsumer.start": (
        "2f1ba70443327538",
        "ConsumerThread relies on start() reading _fetch_max_wait_ms into its Fetcher",
    ),
    "aiokafka.consumer.subscription_state:Assignment.state_value": (
        "183fea82ef48f3e6",
        "BatchConsumer.partition_report reads _subscription.subscription.assignment and "
        "each state's _position, highwater, paused",
    ),
    "aiokafka.consumer.subscription_state:TopicPartitionState.__init__": (
        "f0b391da1b87af04",
        "BatchConsumer.partition_report reads _position, highwater and paused",
    ),
    # The decision API's fast path (rtim/stream/fastpath.py: RtimWeb, FastSite)
    "faust.web.drivers.aiohttp:Web._new_transport_tcp": (
        "3f9463d869f309ec",
        "RtimWeb._new_transport_tcp replaces it with FastSite: the same host, port and TLS "
        "settings read from the app's conf",
    ),
    "faust.web.drivers.aiohttp:Web.__init__": (
        "52b00c1bd653c82d",
        "RtimWeb.__init__ adds json_errors to the middlewares of the aiohttp Application "
        "it makes (self.web_app): still made there, before any route is served",
    ),
    "faust.web.drivers.aiohttp:Web.start_server": (
        "b0c4f10491828520",
        "the site it starts is the one _new_transport_tcp makes (FastSite), after "
        "runner.setup(), which FastSite.start needs",
    ),
    # Stopping within a bound (ConsumerThread.on_thread_stop, stop_consumer, publisher stop)
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread.on_thread_stop": (
        "8dfc004e258b6c25",
        "ConsumerThread.on_thread_stop replaces it: its own part (the method queue, via "
        "QueueServiceThread) and consumer.stop(), which RTIM bounds with stop_consumer",
    ),
    "mode.threads:QueueServiceThread.on_thread_stop": (
        "b58a5dbce24fd815",
        "ConsumerThread.on_thread_stop calls it in place of Faust's version",
    ),
    "aiokafka.consumer.consumer:AIOKafkaConsumer.stop": (
        "bc5da9c98595299a",
        "stop_consumer (rtim/stream/endoffsets.py) bounds it and closes _client itself when "
        "it fails with the broker gone",
    ),
    "aiokafka.consumer.fetcher:Fetcher.close": (
        "1cd24bc1c442149e",
        "stop_consumer works around its CancelledError (it awaits a fetch task it has just "
        "cancelled): if fixed, the workaround may go",
    ),
    "aiokafka.producer.producer:AIOKafkaProducer.stop": (
        "43ef97147111893b",
        "BatchPublisher.stop bounds it, then cancels _sender.sender_task and closes client",
    ),
    "aiokafka.producer.sender:Sender.__init__": (
        "dae60514401a3817",
        "BatchPublisher.stop reads sender_task",
    ),
    "mode.worker:Worker._schedule_shutdown": (
        "1a6a5dfc88c2298b",
        "rtim.stream.worker.Worker._schedule_shutdown starts the shutdown timer, then calls it",
    ),
    "mode.worker:Worker.__init__": (
        "d4fcd79403d78025",
        "rtim.stream.worker.Worker reads _signal_stop_time and _signal_stop_future, and "
        "walks the services' _children and state when the stop takes too long",
    ),
    # Transport, RtimApp, Worker
    "faust.transport.drivers.aiokafka:Transport": (
        "966a67907f33524d",
        "rtim.stream.consumer.Transport only sets Consumer = BatchConsumer",
    ),
    "faust.app.base:App._new_transport": (
        "42db531312dd776f",
        "RtimApp._new_transport replaces it to build rtim.stream.consumer.Transport",
    ),
    "mode.services:Service.__init__": (
        "ab4d12a25b93044a",
        "BatchConsumer._drain_messages reads _stopped (its own and the fetcher's); the "
        "/health/live view in rtim/stream/app.py reads the app's _crashed",
    ),
    "faust.worker:Worker.on_setup_root_logger": (
        "0d468284fb5c8880",
        "rtim.stream.worker.Worker.on_setup_root_logger replaces it to leave the terminal "
        "spinner out (and the root logger at the worker's level): check what it sets up",
    ),
    "mode.worker:Worker._on_sigusr1": (
        "46183ffb2553ce8e",
        "rtim.stream.worker.Worker._on_sigusr1 logs the partitions, then calls it",
    ),
    "mode.worker:Worker._sentinel_task": (
        "6e66058cf3e1b616",
        "rtim.stream.worker.Worker._sentinel_task replaces it (a tenth of a second instead "
        "of a second): check it is still the loop's last wait before it closes",
    ),
    # TableManager (rtim/stream/app.py)
    "faust.tables.manager:TableManager.on_start": (
        "365dd25fbc0e0684",
        "rtim.stream.app.TableManager.on_start is a copy of it less its one-second sleep: "
        "port the change into the copy",
    ),
    # Leaving the group in generation 0 (rtim/stream/endoffsets.py, stop_consumer)
    "aiokafka.consumer.group_coordinator:GroupCoordinator._maybe_leave_group": (
        "016cd88a16e6c4b5",
        "_leave_generation_zero wraps it and sends LeaveGroup itself in generation 0: check "
        "whether it still skips generation 0 and what else it does (reset_generation)",
    ),
    "aiokafka.consumer.group_coordinator:GroupCoordinator.close": (
        "f30d831089456312",
        "_leave_generation_zero relies on close looking up self._maybe_leave_group once "
        "the coordinator's tasks are done",
    ),
    # The membership fence (ConsumerThread.confirm_membership)
    "aiokafka.consumer.group_coordinator:GroupCoordinator._do_heartbeat": (
        "dc1d6632aaa68e96",
        "ConsumerThread.confirm_membership sends the same HeartbeatRequest (group_id, "
        "generation, member_id) and reads the same error codes as refusals",
    ),
    "aiokafka.consumer.group_coordinator:GroupCoordinator._send_req": (
        "fa4b12e914ce9fcf",
        "ConsumerThread.confirm_membership sends its Heartbeat with it",
    ),
    "aiokafka.consumer.group_coordinator:GroupCoordinator.reset_generation": (
        "537aa37c531b4de9",
        "ConsumerThread.confirm_membership reads generation and member_id (reset here "
        "when the coordinator refuses this member)",
    ),
    "mode.threads:QueueServiceThread.call_thread": (
        "479edda75b54734b",
        "BatchConsumer.confirm_membership runs the check in the consumer's thread with it",
    ),
    # ContextTable (rtim/stream/store.py; built in rtim/stream/app.py as App.Table does)
    "faust.tables.base:Collection.apply_changelog_batch": (
        "b980a78d3ae9b1e8",
        "ContextTable.apply_changelog_batch filters the batch (stale contexts out), then "
        "calls it: check recovery still applies changelog records through it",
    ),
    "faust.stores.memory:Store.apply_changelog_batch": (
        "71863e3cd727aac2",
        "ContextTable.apply_changelog_batch hands it the records that are not stale",
    ),
    "faust.tables.recovery:Recovery._add": (
        "1584a197b11bf835",
        "ContextStore.distrust pops Recovery.active_offsets so that a partition kept "
        "across the rebalance is read from the start (no persisted offset): check _add "
        "still takes the persisted offset, else what active_offsets holds",
    ),
    "faust.app.base:App.Table": (
        "e49f205922bb5121",
        "create_app builds the ContextTable and adds it as App.Table does",
    ),
    "faust.stores.rocksdb:Store.persisted_offset": (
        "6f2e502fb86043a1",
        "ContextStore.distrust deletes every key of a partition, offset_key with them, so "
        "that recovery reads from the start",
    ),
    # ContextStore (rtim/stream/store.py)
    "faust.stores.rocksdb:Store.apply_changelog_batch": (
        "ea3344d369fc4ab5",
        "ContextStore.write does what it does for a batch (WriteBatch per partition, then "
        "set_persisted_offset): keep the two in step; ContextTable.apply_changelog_batch "
        "hands it the records that are not stale",
    ),
    "faust.stores.rocksdb:Store.set_persisted_offset": (
        "b4c811926678346e",
        "ContextStore.write records the changelog offset recovery resumes from with it",
    ),
    "faust.stores.rocksdb:Store._db_for_partition": (
        "cb7e67d5f9efc4bc",
        "ContextStore reads and writes each partition's database through it",
    ),
    "faust.stores.rocksdb:Store.__init__": (
        "c7c0fa2989e8ab4a",
        "ContextStore.size iterates _dbs (partition -> Rdict)",
    ),
    "faust.stores.memory:Store.__post_init__": (
        "e59c82f3785458b2",
        "ContextStore reads and updates the memory store's data dict",
    ),
    # Exactly-once processing (rtim/stream/transactions.py, store.py, consumer.py)
    "faust.tables.manager:TableManager.on_rebalance": (
        "2d2c23a07bf54328",
        "ContextTable.on_rebalance starts the exactly-once producers (fencing the "
        "partitions' earlier owners) before the recovery: check every table is still "
        "told before recovery.on_rebalance",
    ),
    "faust.tables.base:Collection.on_rebalance": (
        "0812ad692171a8fd",
        "ContextTable.on_rebalance awaits its before_recovery hook, then this",
    ),
    "faust.tables.recovery:Recovery._build_highwaters": (
        "91b4cc0d3724ae7b",
        "recovery reads up to the end offset - 1, so EndOffsetProbe(committed=True) "
        "gives the offset after the last committed record (a commit marker is never "
        "delivered)",
    ),
    "aiokafka.consumer.consumer:AIOKafkaConsumer.__init__": (
        "01506f316191f7c9",
        "ConsumerThread._create_worker_consumer sets _isolation_level (the string; "
        "read_committed in exactly-once processing) before start() builds the fetcher",
    ),
    "aiokafka.protocol.transaction:TxnOffsetCommitRequest": (
        "841e324a3ddd2c17",
        "rtim/stream/transactions.py has a producer per input partition because "
        "TxnOffsetCommit has no generation or member id (version 0, no KIP-447): with "
        "them, one producer per worker would fence zombies too",
    ),
    "aiokafka.producer.sender:TxnOffsetCommitHandler.create_request": (
        "4f6bf93bb0a1639e",
        "as for TxnOffsetCommitRequest: offsets committed with the transactional id and epoch only",
    ),
}


def source_of(target: str) -> str:
    module_name, _, qualname = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part)
    return inspect.getsource(obj)  # type: ignore[arg-type]


def digest(target: str) -> str:
    return hashlib.sha256(source_of(target).encode()).hexdigest()[:16]


@pytest.mark.parametrize("target", sorted(GUARDED))
def test_overridden_library_code_is_unchanged(target: str) -> None:
    expected, recheck = GUARDED[target]
    got = digest(target)
    assert got == expected, (
        f"{target} changed (faust-streaming {version('faust-streaming')}, aiokafka "
        f"{version('aiokafka')}, mode-streaming {version('mode-streaming')}). "
        f"Re-check: {recheck}. Then set its hash here to {got!r} and the pins in "
        "pyproject.toml to the versions checked."
    )
