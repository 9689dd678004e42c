"""``rtim bench``: RTIM against the raw-aiokafka ceiling, in one run, on one broker.

Phases (both pipelines run as separate worker processes, measured the same way
from outside, by polling their consumer group's committed offsets):

1. load N simulated clickstream events into ``rtim.clickstream``;
2. throughput of the **raw** loop: aiokafka ``getmany`` -> ``orjson.loads`` ->
   dict update -> one output record per event (``send_batch`` per partition)
   -> commit. This is the practical ceiling of Python on one core;
3. throughput of the **RTIM worker**: validate, dedupe, durable context update
   (RocksDB + changelog), triggers, scoring when a trigger fires, CloudEvents
   and decision records out, metrics, commits; with channel responses flowing
   into ``rtim.responses`` for the decisions it makes (see below);
4. latency at a fixed offered rate: live events (stamped at send time) at
   ``--rate`` events/s while both pipelines run; latency is the time from the
   event's timestamp to the output (raw) or trigger (RTIM) arriving at a
   consumer.

Throughput is (events committed) / (time from the first commit to the last),
so start-up and group joins are not counted, and commits are.

Responses: once the clickstream is loaded, the core runs offline on it (the
records read back from Kafka, with the worker's catalog) to learn which
decisions the worker will make; decision ids depend only on their cause, so
they are the worker's. A mix of responses for them (most decisions get none,
some impressions, clicks, conversions, dismissals; a few late, unknown and
duplicate) is sent to ``rtim.responses`` while the worker runs, each once the
worker has committed the clickstream up to its decision and to its timestamp
(event time), as a channel system would answer. The raw baseline consumes the
clickstream only.

The cost of one decision is measured in-process on the same records: the
engine in batches like the worker's with the catalog, and without its
triggers (the same context updates, no decision); the difference over the
number of decisions.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import gc
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from rtim.broker import EmbeddedBroker
from rtim.decide.cloudevent import iso_ms
from rtim.engine import DecisionRecord, Engine, Record
from rtim.events import customer_key
from rtim.learn.models import POOLED, ModelSet
from rtim.names import CLICKSTREAM_TOPIC, RESPONSES_TOPIC, TRIGGER_TOPIC_PREFIX
from rtim.offers.catalog import Catalog, load_catalog, parse_catalog
from rtim.settings import DEFAULT_CATALOG, DEFAULTS, KafkaConnection
from rtim.simulate import JourneySimulator, past_start_ms
from rtim.simulate_kafka import produce_events
from rtim.stream.endoffsets import true_end_offsets
from rtim.stream.process import WorkerProcess
from rtim.stream.publish import BatchWriter

CLICKSTREAM = CLICKSTREAM_TOPIC
RAW_OUT = "bench.raw.out"
RAW_GROUP = "bench-raw"
RTIM_APP = "rtim-bench"
#: The catalog of ``--decisions-mix``: decision moments on about a quarter of the
#: events, twelve candidate offers each.
DECISIONS_CATALOG = Path(__file__).parent / "data" / "bench_catalog.yaml"


# -- the baseline -----------------------------------------------------------


async def raw_pipeline(
    bootstrap: str, *, group: str = RAW_GROUP, max_records: int = 10_000
) -> None:
    """The ceiling: consume -> parse -> dict update -> produce -> commit, nothing else."""
    consumer = AIOKafkaConsumer(
        CLICKSTREAM,
        **KafkaConnection.parse(bootstrap).client_config(),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_records,
        session_timeout_ms=10_000,
        rebalance_timeout_ms=5_000,
        fetch_max_wait_ms=25,
    )
    producer = AIOKafkaProducer(
        **KafkaConnection.parse(bootstrap).client_config(), acks="all", max_batch_size=512 * 1024
    )
    await consumer.start()
    await producer.start()
    counts: dict[str, int] = defaultdict(int)
    out_parts = sorted(await producer.partitions_for(RAW_OUT))
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=max_records)
            if not fetched:
                continue
            writer = BatchWriter(producer)
            sent = []
            for tp, records in fetched.items():
                part = out_parts[tp.partition % len(out_parts)]
                for rec in records:
                    event = orjson.loads(rec.value)
                    customer = customer_key(event)
                    counts[customer] += 1
                    value = orjson.dumps(
                        {"c": customer, "n": counts[customer], "ts": event.get("timestamp")}
                    )
                    sent.append(await writer.append(RAW_OUT, part, rec.key, value))
            sent.extend(await writer.flush())
            await asyncio.gather(*(fut for _, _, fut in filter(None, sent)))
            await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()


# -- measuring --------------------------------------------------------------


@dataclass
class Throughput:
    events: int
    seconds: float
    events_per_s: float


@dataclass
class Latency:
    samples: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class WorkerProfile:
    """The RTIM worker's own account of the throughput phase (from its metrics)."""

    batches: int
    records_per_batch: float
    #: Wall time per event in each batch stage, microseconds.
    core_us: float
    publish_us: float
    store_us: float
    #: Everything else per event: fetching, decoding, acknowledging, commits.
    other_us: float
    #: CPU seconds the worker process used per wall second (1.0 = one core).
    cpu_cores: float
    #: Of ``publish_us``, the membership checks (the zombie fence), microseconds.
    fence_us: float = 0.0
    #: Time in the garbage collector per event (every thread stops), microseconds.
    gc_us: float = 0.0
    #: Decisions made per clickstream event (the share of decision moments).
    decisions_per_event: float = 0.0
    #: Response records consumed in the same window.
    responses: int = 0
    #: Training records the worker's learner learned in the same window (each closed
    #: decision with an offer is two: its offer's and the pooled model's).
    learned: int = 0
    #: Clickstream events consumed in the window.
    events: int = 0


def _delta_sum(before: dict[str, float], after: dict[str, float], prefix: str) -> float:
    """The change of every sample whose key starts with ``prefix`` (all label values)."""
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))


def worker_profile(
    before: dict[str, float], after: dict[str, float], wall_s: float
) -> WorkerProfile | None:
    """Per-event stage times from two scrapes of a worker's metrics ``wall_s`` apart."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    events = delta(f'rtim_events_consumed_total{{topic="{CLICKSTREAM}"}}')
    batches = delta("rtim_batch_records_count")
    if events <= 0 or batches <= 0 or wall_s <= 0:
        return None

    def per_event_us(stage: str) -> float:
        return round(delta(f'rtim_batch_stage_seconds_sum{{stage="{stage}"}}') / events * 1e6, 1)

    core, publish, store = per_event_us("core"), per_event_us("publish"), per_event_us("store")
    return WorkerProfile(
        batches=int(batches),
        records_per_batch=round(events / batches, 1),
        core_us=core,
        publish_us=publish,
        store_us=store,
        other_us=round(wall_s / events * 1e6 - core - publish - store, 1),
        fence_us=per_event_us("fence"),
        cpu_cores=round(delta("process_cpu_seconds_total") / wall_s, 2),
        gc_us=round(
            sum(delta(f'rtim_gc_pause_seconds_sum{{generation="{g}"}}') for g in "012")
            / events
            * 1e6,
            1,
        ),
        decisions_per_event=round(_delta_sum(before, after, "rtim_decisions_total{") / events, 3),
        responses=int(delta(f'rtim_events_consumed_total{{topic="{RESPONSES_TOPIC}"}}')),
        learned=int(delta('rtim_examples_learned_total{result="learned"}')),
        events=int(events),
    )


@dataclass
class DecisionCost:
    """The cost of one decision, measured in-process on the core (no Kafka)."""

    events: int
    decisions: int
    #: Decisions per event.
    share: float
    #: Candidate offers scored per decision, on average.
    candidates: float
    #: Per decision, microseconds: the median of the runs, and the smallest and largest.
    us: float
    us_min: float
    us_max: float
    runs: int
    #: Per event, microseconds (medians): the catalog, and the catalog without triggers.
    event_us: float
    event_us_without: float


@dataclass
class ResponsesSent:
    """Responses sent to ``rtim.responses`` for the decisions the loaded events make."""

    #: Decisions the loaded events make (with an offer or none), from the offline run.
    decisions: int
    #: Of which with an offer (a trigger out, a decision left open).
    offered: int
    #: Response records by kind: the outcomes, and "late", "unknown", "duplicate".
    planned: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    #: Committed by the RTIM worker's group.
    consumed: int = 0
    #: The worker's join results (``rtim_responses_total`` by result).
    joined: dict[str, int] = field(default_factory=dict)


@dataclass
class BenchReport:
    events: int
    partitions: int
    customers: int
    store: str
    raw: Throughput | None = None
    rtim: Throughput | None = None
    ratio: float | None = None
    offered_rate: float = 0.0
    raw_latency: Latency | None = None
    rtim_latency: Latency | None = None
    rtim_triggers: int = 0
    #: Where the RTIM worker's time went during the throughput phase.
    rtim_profile: WorkerProfile | None = None
    #: "default" (the worker's catalog) or "decisions" (:data:`DECISIONS_CATALOG`).
    mix: str = "default"
    responses: ResponsesSent | None = None
    decision_cost: DecisionCost | None = None
    notes: list[str] = field(default_factory=list)


class TooFewEvents(RuntimeError):
    """The load was processed too fast to measure a rate between two commits."""


async def _committed_total(reader: AIOKafkaConsumer, tps: list[TopicPartition]) -> int:
    total = 0
    for tp in tps:
        offset = await reader.committed(tp)
        total += offset or 0
    return total


async def measure_until_committed(
    bootstrap: str,
    group: str,
    total: int,
    *,
    partitions: int,
    timeout: float,
    proc: subprocess.Popen | None = None,
    at_edges: Callable[[], Awaitable[None]] | None = None,
    topic: str = CLICKSTREAM,
) -> Throughput:
    """Poll the group's committed offsets on ``topic`` until they reach ``total``.

    ``at_edges`` is awaited when the first commit is seen and when the last is.
    """
    # A consumer of the group that never joins it: it only reads committed offsets.
    # (The admin client's OffsetFetch does not decode on the embedded broker.)
    reader = AIOKafkaConsumer(
        **KafkaConnection.parse(bootstrap).client_config(), group_id=group, enable_auto_commit=False
    )
    await reader.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        deadline = time.monotonic() + timeout
        first_t, first_n = None, 0
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{group}: the pipeline process exited with {proc.returncode}")
            try:
                done = await _committed_total(reader, tps)
            except KafkaError:  # the group may not exist yet
                await asyncio.sleep(0.1)
                continue
            now = time.perf_counter()
            if first_t is None and done > 0:
                first_t, first_n = now, done
                if at_edges is not None:
                    await at_edges()
            if done >= total:
                if at_edges is not None:
                    await at_edges()
                assert first_t is not None
                seconds = max(now - first_t, 1e-9)
                n = total - first_n
                if n <= 0:
                    raise TooFewEvents(
                        f"{group}: all {total:,} events were in the first commit seen, so no rate "
                        "can be measured; load more events (--events)"
                    )
                return Throughput(
                    events=n, seconds=round(seconds, 3), events_per_s=round(n / seconds, 1)
                )
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{group}: committed offsets did not reach {total} in {timeout:.0f} s")
    finally:
        await reader.stop()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def _latency(values: list[float]) -> Latency | None:
    if not values:
        return None
    values = sorted(values)
    return Latency(
        samples=len(values),
        p50_ms=round(_percentile(values, 0.50), 2),
        p95_ms=round(_percentile(values, 0.95), 2),
        p99_ms=round(_percentile(values, 0.99), 2),
        max_ms=round(values[-1], 2),
    )


def _iso_now() -> tuple[str, int]:
    now_ms = time.time_ns() // 1_000_000
    moment = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"), now_ms


def _parse_iso_ms(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


async def offered_load_latency(
    bootstrap: str, *, rate: float, seconds: float, customers: int, trigger_topics: list[str]
) -> tuple[list[float], list[float]]:
    """Send live events at ``rate``/s; return (raw latencies, RTIM latencies) in ms."""
    raw_lat: list[float] = []
    rtim_lat: list[float] = []
    consumer = AIOKafkaConsumer(
        RAW_OUT,
        *trigger_topics,
        **KafkaConnection.parse(bootstrap).client_config(),
        auto_offset_reset="latest",
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    # Make sure the consumer has its positions before the first event is sent.
    await consumer.getmany(timeout_ms=200)
    for tp in consumer.assignment():
        await consumer.position(tp)
    producer = AIOKafkaProducer(**KafkaConnection.parse(bootstrap).client_config(), linger_ms=0)
    await producer.start()
    sim = JourneySimulator(customers=customers, seed=7, live=True)
    stream = sim.events()
    stop = asyncio.Event()

    async def collect() -> None:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=100)
            now = time.time() * 1000
            for tp, records in fetched.items():
                for rec in records:
                    body = orjson.loads(rec.value)
                    if tp.topic == RAW_OUT:
                        if body.get("ts"):
                            raw_lat.append(now - _parse_iso_ms(body["ts"]))
                    else:
                        rtim_lat.append(now - _parse_iso_ms(body["data"]["event"]["timestamp"]))

    collector = asyncio.create_task(collect())
    try:
        tick = 0.01
        per_tick = rate * tick
        owed = 0.0
        start = time.perf_counter()
        next_t = start
        while time.perf_counter() - start < seconds:
            owed += per_tick
            for _ in range(int(owed)):
                event = next(stream)
                event["timestamp"], _ = _iso_now()
                await producer.send(
                    CLICKSTREAM, orjson.dumps(event), key=customer_key(event).encode()
                )
            owed -= int(owed)
            next_t += tick
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
        await producer.flush()
        await asyncio.sleep(2.0)  # let the last outputs arrive
    finally:
        stop.set()
        await collector
        await producer.stop()
        await consumer.stop()
    return raw_lat, rtim_lat


async def load_events(
    bootstrap: str, n: int, customers: int, progress: Callable[[int], None] | None
) -> int:
    """Produce ``n`` simulated events (simulated time) into the clickstream."""
    sim = JourneySimulator(customers=customers, seed=42, start_ms=past_start_ms())
    return await produce_events(bootstrap, CLICKSTREAM, sim.events(n), progress=progress)


# -- the core offline: the decisions the load makes, and their cost -----------


async def read_back(bootstrap: str, partitions: int) -> list[Record]:
    """Every record of the clickstream, as the worker reads them, ordered by offset
    then partition (about the order of the events, each partition in its order)."""
    tps = [TopicPartition(CLICKSTREAM, p) for p in range(partitions)]
    ends = await true_end_offsets(bootstrap, tps)
    consumer = AIOKafkaConsumer(
        **KafkaConnection.parse(bootstrap).client_config(),
        group_id=None,
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Record] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        left = {tp for tp in tps if ends[tp] > 0}
        while left:
            fetched = await consumer.getmany(*left, timeout_ms=1000, max_records=10_000)
            for tp, records in fetched.items():
                out.extend(
                    Record(tp.partition, r.offset, r.key, r.value, (), r.timestamp) for r in records
                )
                if records and records[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    out.sort(key=lambda r: (r.offset, r.partition))
    return out


def run_core(
    records: list[Record],
    catalog: Catalog,
    *,
    batch: int = DEFAULTS.max_fetch_records,
    models: ModelSet | None = None,
) -> tuple[float, list[DecisionRecord]]:
    """Run the engine over ``records`` in batches like the worker's, with a store in
    memory; the seconds spent in the engine, and the decisions made."""
    store: dict[tuple[int, bytes], bytes] = {}
    engine = Engine(
        catalog=catalog,
        load=lambda partition, key: store.get((partition, key)),
        rng=random.Random(0),
        window_ms=int(DEFAULTS.attribution_window_s * 1000),
        models=models,
    )
    decisions: list[DecisionRecord] = []
    spent = 0.0
    clock = time.thread_time  # CPU time of this thread: what others run meanwhile is not counted
    for i in range(0, len(records), batch):
        started = clock()
        chunk: list[Any] = records[i : i + batch]  # Records are what the engine reads
        result = engine.process(CLICKSTREAM, chunk)
        spent += clock() - started
        for partition, items in result.updates.items():
            for key, value in items.items():
                store[(partition, key)] = value
        decisions.extend(result.decisions)
    return spent, decisions


def trained_models(decisions: list[DecisionRecord]) -> ModelSet:
    """Models that learned from these decisions (one in five converted, at random), each
    offer's and the pooled one, as a worker's have: their weight tables are full, and
    scoring goes through the pooled prior."""
    models = ModelSet()
    rng = random.Random(7)
    for made in decisions:
        body = orjson.loads(made.value)
        if body["offer_id"] is None:
            continue
        own = next(c["features"] for c in body["candidates"] if c["offer_id"] == body["offer_id"])
        features = [*body["features"], *own]
        converted = rng.random() < 0.2
        models.learn(body["offer_id"], features, converted)
        models.learn(POOLED, features, converted)
    return models


def decision_cost(records: list[Record], catalog: Catalog, *, runs: int = 3) -> DecisionCost:
    """Per decision: (engine time with the catalog - without its triggers) / decisions,
    with models trained on the decisions of a first run (:func:`trained_models`).

    Without triggers every event makes the same context update and no decision, so
    the difference is what deciding adds: trigger conditions, eligibility, features,
    scoring, sampling, reasons, the trigger and the decision record, and the larger
    contexts (open decisions) written. Runs alternate, so that a slower spell of a
    shared machine falls on both.
    """
    from rtim.stream.heap import tune_gc, untune_gc  # the worker's garbage collector policy

    none = parse_catalog({}, "no triggers")
    models = trained_models(run_core(records, catalog)[1])
    with_s: list[float] = []
    without_s: list[float] = []
    decisions: list[DecisionRecord] = []
    threshold = gc.get_threshold()
    tune_gc()
    try:
        for _ in range(runs):
            spent, decisions = run_core(records, catalog, models=models)
            with_s.append(spent)
            without_s.append(run_core(records, none, models=models)[0])
    finally:
        untune_gc(threshold)
    n = len(decisions)
    per = sorted((w - wo) / max(n, 1) * 1e6 for w, wo in zip(with_s, without_s, strict=True))
    candidates = sum(len(orjson.loads(d.value)["candidates"]) for d in decisions)
    events = len(records)
    return DecisionCost(
        events=events,
        decisions=n,
        share=round(n / max(events, 1), 3),
        candidates=round(candidates / max(n, 1), 2),
        us=round(statistics.median(per), 1),
        us_min=round(per[0], 1),
        us_max=round(per[-1], 1),
        runs=runs,
        event_us=round(statistics.median(with_s) / max(events, 1) * 1e6, 2),
        event_us_without=round(statistics.median(without_s) / max(events, 1) * 1e6, 2),
    )


# -- responses ----------------------------------------------------------------

#: A response to send: the clickstream offset its partition must be committed to
#: first, its time (ms, event time), the key (customer id) and the value.
Planned = tuple[int, int, bytes, bytes]


def plan_responses(
    records: list[Record], decisions: list[DecisionRecord], *, seed: int = 11
) -> tuple[dict[int, list[Planned]], Counter[str]]:
    """Responses for the decisions (records, decision records as the core made them):
    per partition, in the order to send them; and how many of each kind.

    Of the decisions with an offer, 40% get an impression, a quarter of those a
    click, 30% of the clicks a conversion, within seconds to an hour; 5% of the
    impressions without a click a dismissal; 1% of the decisions a click after their
    window ended (late, and nothing else); 1% a response naming a decision never
    made (unknown); 2% of all responses are sent twice (duplicate). Each is stamped
    after its decision in event time and is sent once the worker has committed the
    clickstream to its decision and to its time.
    """
    rng = random.Random(seed)
    # Stream time of each partition at each of its records.
    times: dict[int, list[int]] = defaultdict(list)
    offsets: dict[int, list[int]] = defaultdict(list)
    for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
        at = int(_parse_iso_ms(orjson.loads(rec.value or b"{}")["timestamp"]))
        seen = times[rec.partition]
        seen.append(max(at, seen[-1]) if seen else at)
        offsets[rec.partition].append(rec.offset)
    kinds: Counter[str] = Counter()
    plan: dict[int, list[Planned]] = defaultdict(list)

    def send(cause: Record, body: dict[str, object], at_ms: int, kind: str) -> None:
        part = cause.partition
        i = bisect.bisect_left(times[part], at_ms)
        due = max(cause.offset, offsets[part][i] if i < len(offsets[part]) else offsets[part][-1])
        body = {**body, "timestamp": iso_ms(at_ms)}
        value = orjson.dumps(body)
        plan[part].append((due + 1, at_ms, cause.key or b"", value))
        kinds[kind] += 1
        if rng.random() < 0.02:
            plan[part].append((due + 1, at_ms, cause.key or b"", value))
            kinds["duplicate"] += 1

    for made in decisions:
        record = orjson.loads(made.value)
        cause = made.cause
        if record["offer_id"] is None or not isinstance(cause, Record):
            continue
        base = {"decision_id": record["decision_id"], "customer_id": record["customer_id"]}
        at = int(record["decided_ms"])
        if rng.random() < 0.01:
            send(
                cause,
                {
                    **base,
                    "decision_id": str(uuid.UUID(int=rng.getrandbits(128))),
                    "outcome": "impression",
                },
                at + 1000,
                "unknown",
            )
        if rng.random() < 0.01:
            late = int(record["window_end_ms"]) + rng.randint(1_000, 3_600_000)
            send(cause, {**base, "outcome": "click"}, late, "late")
            continue
        if rng.random() >= 0.40:
            continue  # no response at all, as for most decisions
        at += rng.randint(500, 20_000)
        send(cause, {**base, "outcome": "impression"}, at, "impression")
        if rng.random() < 0.25:
            at += rng.randint(2_000, 120_000)
            send(cause, {**base, "outcome": "click"}, at, "click")
            if rng.random() < 0.30:
                at += rng.randint(60_000, 3_600_000)
                body = {**base, "outcome": "conversion", "value": round(rng.uniform(10, 300), 2)}
                send(cause, body, at, "conversion")
        elif rng.random() < 0.05:
            send(
                cause,
                {**base, "outcome": "dismissal"},
                at + rng.randint(1_000, 30_000),
                "dismissal",
            )
    for items in plan.values():
        # In event-time order among those due together (all those stamped after the
        # last event are due at the end): a response that arrives after one stamped
        # later would find its decision closed by the partition's stream time.
        items.sort(key=lambda item: item[:2])
    return dict(plan), kinds


async def feed_responses(
    bootstrap: str, group: str, plan: dict[int, list[Planned]], partitions: int
) -> int:
    """Send each planned response once ``group`` has committed the clickstream of its
    partition to the response's offset; returns how many were sent (all of them)."""
    config = KafkaConnection.parse(bootstrap).client_config()
    reader = AIOKafkaConsumer(**config, group_id=group, enable_auto_commit=False)
    producer = AIOKafkaProducer(**config, linger_ms=5)
    await reader.start()
    await producer.start()
    sent = 0
    at = dict.fromkeys(plan, 0)
    try:
        while any(at[p] < len(items) for p, items in plan.items()):
            for part, items in plan.items():
                i = at[part]
                if i >= len(items):
                    continue
                try:
                    committed = await reader.committed(TopicPartition(CLICKSTREAM, part)) or 0
                except KafkaError:  # the group may not exist yet
                    committed = 0
                while i < len(items) and items[i][0] <= committed:
                    _, _, key, value = items[i]
                    await producer.send(RESPONSES_TOPIC, value, key=key)
                    i += 1
                sent += i - at[part]
                at[part] = i
            await asyncio.sleep(0.05)
        await producer.flush()
    finally:
        await producer.stop()
        await reader.stop()
    return sent


async def wait_committed(
    bootstrap: str, group: str, topic: str, partitions: int, *, timeout: float
) -> int:
    """Wait until ``group`` has committed ``topic`` to its end; the records committed."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    ends = await true_end_offsets(bootstrap, tps)
    total = sum(ends.values())
    reader = AIOKafkaConsumer(
        **KafkaConnection.parse(bootstrap).client_config(), group_id=group, enable_auto_commit=False
    )
    await reader.start()
    try:
        deadline = time.monotonic() + timeout
        done = 0
        while time.monotonic() < deadline:
            try:
                done = await _committed_total(reader, tps)
            except KafkaError:
                done = 0
            if done >= total:
                return done
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{group}: {topic} committed to {done} of {total} in {timeout:.0f} s")
    finally:
        await reader.stop()


_RESULT = re.compile(r'result="(\w+)"')


def join_results(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """The worker's responses by join result between two scrapes of its metrics."""
    out: Counter[str] = Counter()
    for key, value in after.items():
        if key.startswith("rtim_responses_total{"):
            found = _RESULT.search(key)
            if found:
                out[found[1]] += int(value - before.get(key, 0.0))
    return {k: v for k, v in sorted(out.items()) if v}


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rtim", *args], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def run_bench(
    *,
    events: int = 100_000,
    partitions: int = 4,
    customers: int = 5_000,
    rate: float = 2_000.0,
    latency_seconds: float = 10.0,
    store: str = "rocksdb",
    broker: str | None = None,
    workdir: Path | None = None,
    echo: Callable[[str], None] = print,
    progress: Callable[[int], None] | None = None,
    decisions_mix: bool = False,
    responses: bool = True,
    cost_runs: int = 3,
    cost_events: int = 50_000,
) -> BenchReport:
    """The whole bench; ``decisions_mix`` runs the worker with :data:`DECISIONS_CATALOG`,
    ``responses`` sends responses while it runs, ``cost_runs`` times the cost of one
    decision on the first ``cost_events`` events (0: not measured)."""
    report = BenchReport(
        events=events,
        partitions=partitions,
        customers=customers,
        store=store,
        mix="decisions" if decisions_mix else "default",
    )
    catalog_path = DECISIONS_CATALOG if decisions_mix else DEFAULT_CATALOG
    workdir = workdir or Path(tempfile.mkdtemp(prefix="rtim-bench-"))
    embedded = None
    if broker is None:
        embedded = EmbeddedBroker(log_path=workdir / "broker.log").start()
        broker = embedded.bootstrap
    raw_proc: subprocess.Popen[bytes] | None = None
    rtim_worker: WorkerProcess | None = None
    try:
        from rtim.settings import Settings
        from rtim.stream.topics import create_topics, topic_specs

        settings = Settings(broker=broker, partitions=partitions)
        trigger_topics = [t for t in topic_specs(settings) if t.startswith(TRIGGER_TOPIC_PREFIX)]
        await create_topics(broker, {**topic_specs(settings), RAW_OUT: partitions})
        echo(
            f"loading {events:,} simulated events "
            f"({customers:,} customers, {partitions} partitions)..."
        )
        loaded = await load_events(broker, events, customers, progress)
        ends = await true_end_offsets(
            broker, [TopicPartition(CLICKSTREAM, p) for p in range(partitions)]
        )
        total = sum(ends.values())
        assert total == loaded, f"loaded {loaded} but the topic holds {total}"

        plan: dict[int, list[Planned]] = {}
        if responses or cost_runs > 0:
            echo("the core offline on the loaded events: which decisions, at what cost ...")
            records = await read_back(broker, partitions)
            catalog = load_catalog(catalog_path)
            if cost_runs > 0:
                report.decision_cost = cost = await asyncio.to_thread(
                    decision_cost, records[:cost_events], catalog, runs=cost_runs
                )
                echo(
                    f"  one decision: {cost.us:,.1f} us ({cost.candidates:.1f} candidates, "
                    f"{cost.share:.0%} of events decide)"
                )
            if responses:
                _, made = await asyncio.to_thread(run_core, records, catalog)
                plan, kinds = plan_responses(records, made)
                report.responses = ResponsesSent(
                    decisions=len(made),
                    offered=sum(1 for d in made if d.offered),
                    planned=dict(sorted(kinds.items())),
                )
            del records

        echo("raw aiokafka baseline: consume -> parse -> update -> produce -> commit ...")
        raw_proc = _spawn(["bench-raw", "--broker", broker], workdir / "raw.log")
        try:
            report.raw = await measure_until_committed(
                broker, RAW_GROUP, total, partitions=partitions, timeout=600, proc=raw_proc
            )
            echo(f"  raw:  {report.raw.events_per_s:>10,.0f} events/s")
        except TooFewEvents as exc:
            report.notes.append(str(exc))

        echo(
            f"RTIM worker ({store} store): validate, dedupe, context, triggers, score, publish ..."
        )
        rtim_worker = WorkerProcess(
            broker=broker,
            app_id=RTIM_APP,
            datadir=workdir / "rtim-data",
            store=store,
            log_path=workdir / "rtim.log",
            env={
                "RTIM_PARTITIONS": str(partitions),
                "RTIM_LOG_LEVEL": "warning",
                "RTIM_CATALOG": str(catalog_path),
            },
        ).start()
        feeder = (
            asyncio.create_task(feed_responses(broker, RTIM_APP, plan, partitions))
            if plan
            else None
        )
        scrapes: list[tuple[float, dict[str, float]]] = []

        async def scrape() -> None:
            assert rtim_worker is not None
            try:
                scrapes.append((time.perf_counter(), await asyncio.to_thread(rtim_worker.metrics)))
            except OSError as exc:
                report.notes.append(f"could not read the worker's metrics: {exc}")

        try:
            report.rtim = await measure_until_committed(
                broker,
                RTIM_APP,
                total,
                partitions=partitions,
                timeout=900,
                proc=rtim_worker.proc,
                at_edges=scrape,
            )
            echo(f"  rtim: {report.rtim.events_per_s:>10,.0f} events/s")
        except TooFewEvents as exc:
            report.notes.append(str(exc))
        if len(scrapes) == 2:
            (t0, before), (t1, after) = scrapes
            report.rtim_profile = worker_profile(before, after, t1 - t0)
        if feeder is not None and report.responses is not None:
            # The clickstream is all committed, so every response is due: wait until
            # they are all sent and consumed too.
            report.responses.sent = await asyncio.wait_for(feeder, 300)
            report.responses.consumed = await wait_committed(
                broker, RTIM_APP, RESPONSES_TOPIC, partitions, timeout=300
            )
            try:
                final = await asyncio.to_thread(rtim_worker.metrics)
                report.responses.joined = join_results({}, final)
            except OSError as exc:
                report.notes.append(f"could not read the worker's metrics: {exc}")
            echo(f"  responses: {report.responses.consumed:,} consumed")
        if report.raw and report.rtim:
            report.ratio = round(report.rtim.events_per_s / report.raw.events_per_s, 3)

        if latency_seconds > 0:
            echo(f"latency: {rate:,.0f} live events/s for {latency_seconds:.0f} s through both ...")
            report.offered_rate = rate
            raw_lat, rtim_lat = await offered_load_latency(
                broker,
                rate=rate,
                seconds=latency_seconds,
                customers=customers,
                trigger_topics=trigger_topics,
            )
            report.raw_latency = _latency(raw_lat)
            report.rtim_latency = _latency(rtim_lat)
            report.rtim_triggers = len(rtim_lat)
    finally:
        if rtim_worker is not None:
            rtim_worker.stop()
        _stop(raw_proc)
        if embedded is not None:
            embedded.stop()
    return report


def format_report(report: BenchReport) -> str:
    mix = "decision-heavy mix (12 offers)" if report.mix == "decisions" else "default catalog"
    lines = [
        f"rtim bench: {report.events:,} events, {report.customers:,} customers, "
        f"{report.partitions} partitions, {report.store} store, {mix}, one process each",
        "",
        f"{'pipeline':<28}{'events/s':>12}{'seconds':>10}",
    ]
    for name, tp in (("raw aiokafka (ceiling)", report.raw), ("RTIM worker", report.rtim)):
        if tp:
            lines.append(f"{name:<28}{tp.events_per_s:>12,.0f}{tp.seconds:>10.2f}")
    if report.ratio is not None:
        lines.append(f"{'ratio RTIM / raw':<28}{report.ratio:>12.2f}")
    if report.raw_latency or report.rtim_latency:
        lines += [
            "",
            f"latency at {report.offered_rate:,.0f} events/s offered "
            "(event timestamp -> output at a consumer), ms:",
            f"{'pipeline':<28}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}{'samples':>9}",
        ]
        for name, lat in (
            ("raw aiokafka", report.raw_latency),
            ("RTIM (triggers)", report.rtim_latency),
        ):
            if lat:
                lines.append(
                    f"{name:<28}{lat.p50_ms:>8.1f}{lat.p95_ms:>8.1f}{lat.p99_ms:>8.1f}"
                    f"{lat.max_ms:>8.1f}{lat.samples:>9,}"
                )
    prof = report.rtim_profile
    if prof:
        lines += [
            "",
            f"RTIM worker, throughput phase: {prof.batches:,} batches of "
            f"{prof.records_per_batch:,.0f} records, {prof.cpu_cores:.2f} CPU cores busy;",
            f"wall time per event: core {prof.core_us:.1f} us, publish {prof.publish_us:.1f} us "
            f"(of which membership checks {prof.fence_us:.1f} us), store {prof.store_us:.1f} us, "
            f"the rest (fetch, decode, ack, commit) {prof.other_us:.1f} us;",
            f"of all that, garbage collection {prof.gc_us:.1f} us;",
            f"decisions per event {prof.decisions_per_event:.1%}, "
            f"responses consumed meanwhile {prof.responses:,}, training records learned "
            f"{prof.learned:,} ({prof.learned / max(prof.events, 1):.1%} of the events)",
        ]
    sent = report.responses
    if sent:
        planned = ", ".join(f"{k} {v:,}" for k, v in sent.planned.items())
        joined = ", ".join(f"{k} {v:,}" for k, v in sent.joined.items()) or "none"
        lines += [
            "",
            f"responses (to RTIM only; the raw baseline reads the clickstream alone): "
            f"{sent.sent:,} sent for {sent.offered:,} decisions with an offer "
            f"(of {sent.decisions:,}), {sent.consumed:,} consumed;",
            f"sent: {planned};",
            f"the worker joined them: {joined}",
        ]
    cost = report.decision_cost
    if cost:
        lines += [
            "",
            f"one decision, in-process on the core ({cost.events:,} of the events, "
            f"{cost.decisions:,} decisions = {cost.share:.1%} of them, "
            f"{cost.candidates:.1f} candidates each):",
            f"{cost.us:.1f} us per decision (median of {cost.runs} runs, "
            f"{cost.us_min:.1f} to {cost.us_max:.1f}); per event {cost.event_us:.2f} us "
            f"with the decisions, {cost.event_us_without:.2f} us without",
        ]
    notes = list(report.notes)
    if prof and sent and sent.offered and prof.learned < sent.offered:
        # Two training records per decision with an offer, learned once its attribution
        # window closes (an hour and more of event time): a short run learns few.
        notes.append(
            f"the learner learned {prof.learned / 2 / sent.offered:.0%} of the decisions "
            "with an offer during the throughput phase (each is learned once its "
            "attribution window closes): its cost in a steady state is not all in this "
            "run; a longer one (-n 400000) has more of it"
        )
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def report_json(report: BenchReport) -> str:
    return json.dumps(asdict(report), indent=2)
