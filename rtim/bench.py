"""``rtim bench``: RTIM against the raw-aiokafka ceiling, in one run, on one broker.

Phases (both pipelines run as separate worker processes, measured the same way
from outside, by polling their consumer group's committed offsets):

1. load N simulated clickstream events into ``rtim.clickstream``;
2. throughput of the **raw** loop: aiokafka ``getmany`` -> ``orjson.loads`` ->
   dict update -> one output record per event (``send_batch`` per partition)
   -> commit. This is the practical ceiling of Python on one core;
3. throughput of the **RTIM worker**: validate, dedupe, durable context update
   (RocksDB + changelog), triggers, scoring when a trigger fires, CloudEvents
   out, metrics, commits;
4. latency at a fixed offered rate: live events (stamped at send time) at
   ``--rate`` events/s while both pipelines run; latency is the time from the
   event's timestamp to the output (raw) or trigger (RTIM) arriving at a
   consumer.

Throughput is (events committed) / (time from the first commit to the last),
so start-up and group joins are not counted, and commits are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from rtim.broker import EmbeddedBroker
from rtim.events import customer_key
from rtim.names import CLICKSTREAM_TOPIC, TRIGGER_TOPIC_PREFIX
from rtim.settings import KafkaConnection
from rtim.simulate import JourneySimulator, past_start_ms
from rtim.simulate_kafka import produce_events
from rtim.stream.endoffsets import true_end_offsets
from rtim.stream.process import WorkerProcess
from rtim.stream.publish import BatchWriter

CLICKSTREAM = CLICKSTREAM_TOPIC
RAW_OUT = "bench.raw.out"
RAW_GROUP = "bench-raw"
RTIM_APP = "rtim-bench"


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
    )


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
) -> Throughput:
    """Poll the group's committed offsets until they reach ``total``.

    ``at_edges`` is awaited when the first commit is seen and when the last is.
    """
    # A consumer of the group that never joins it: it only reads committed offsets.
    # (The admin client's OffsetFetch does not decode on the embedded broker.)
    reader = AIOKafkaConsumer(
        **KafkaConnection.parse(bootstrap).client_config(), group_id=group, enable_auto_commit=False
    )
    await reader.start()
    tps = [TopicPartition(CLICKSTREAM, p) for p in range(partitions)]
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
) -> BenchReport:
    report = BenchReport(events=events, partitions=partitions, customers=customers, store=store)
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
            env={"RTIM_PARTITIONS": str(partitions), "RTIM_LOG_LEVEL": "warning"},
        ).start()
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
    lines = [
        f"rtim bench: {report.events:,} events, {report.customers:,} customers, "
        f"{report.partitions} partitions, {report.store} store, one process each",
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
            f"of all that, garbage collection {prof.gc_us:.1f} us",
        ]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def report_json(report: BenchReport) -> str:
    return json.dumps(asdict(report), indent=2)
