"""``rtim bench --api``: the decision API's latency while the worker takes a clickstream.

One worker on an embedded broker (or ``--broker``) takes live simulated events at a
fixed rate (``--rate``, 5,000/s by default) while ``POST /v1/decide`` requests go to it
over loopback at their own fixed rate (``--api-rate``, 500/s) for ``--latency-seconds``.
The requests follow an open-loop schedule: request *i* is due at start + i / rate and is
sent then whatever the earlier ones are doing, and its latency runs from when it was
due to its answer, so time spent queueing (in the client, the socket, the worker's event
loop behind a clickstream batch) is in it. Requests ask for customers whose events went
in lately (their contexts are live), on the channel of their latest event.

The whole load is built before it starts, and the requests go from a process of their
own, so that neither sender's work delays the other's; the first ``WARMUP_S`` seconds
of load are not measured (errors in them are still reported).
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from rtim.bench import Latency, _iso_now, _latency
from rtim.broker import EmbeddedBroker
from rtim.events import customer_key
from rtim.names import CLICKSTREAM_TOPIC, OFFER_CHANNELS
from rtim.settings import DEFAULT_CATALOG, KafkaConnection, Settings
from rtim.simulate import JourneySimulator
from rtim.stream.process import WorkerProcess
from rtim.stream.publish import BatchWriter
from rtim.stream.topics import create_topics, topic_specs

#: The latency objective of the decision API's p99 on loopback (docs/architecture.md).
OBJECTIVE_P99_MS = 5.0
#: How often the schedules are looked at.
TICK_S = 0.002
#: Customers recently seen that requests choose from.
RECENT_CUSTOMERS = 2_000


@dataclass
class ApiReport:
    event_rate: float
    request_rate: float
    seconds: float
    #: Requests sent, answered 200, and the others by status ("timeout", "error" too).
    sent: int = 0
    ok: int = 0
    offered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    events_sent: int = 0
    latency: Latency | None = None
    #: The worker's own account (``rtim_api_seconds``): mean, and the upper bounds of the
    #: histogram buckets that hold its p50 and p99, in ms (forwarding and queueing for the
    #: processor's lock included; the client and the socket not).
    worker_mean_ms: float | None = None
    worker_p50_ms: float | None = None
    worker_p99_ms: float | None = None
    #: Training records the worker's learner learned by the end (decisions whose
    #: attribution windows closed during the run), and model snapshots it published.
    learned: int = 0
    snapshots: int = 0
    notes: list[str] = field(default_factory=list)


#: What stands for an event's timestamp in its planned body until it is sent (as long
#: as an ISO 8601 timestamp with milliseconds, so the body's length is its real one).
_STAMP_TEXT = "2000-01-01T00:00:00.000Z"
_STAMP = orjson.dumps(_STAMP_TEXT)
#: Seconds a request may take before it counts as timed out.
REQUEST_TIMEOUT_S = 10.0
#: Seconds the request client is given to start before the load begins.
CLIENT_START_S = 3.0
#: Seconds of load before the measured part: the first requests and batches of a worker
#: that has just started (connections opened, caches filled) are not its steady state.
WARMUP_S = 2.0


@dataclass
class Plan:
    """The whole load, built before it starts so that the senders only send: the events
    (key, body with :data:`_STAMP` for its timestamp) and the request bodies, in order."""

    events: list[tuple[int, bytes, bytes]]
    requests: list[bytes]


def plan_load(
    event_rate: float, request_rate: float, seconds: float, customers: int, partitions: int
) -> Plan:
    """Events from the journey simulator (partition, key, body); each request asks for a
    customer whose events went in lately (as of when it is due), on the channel of their
    latest event."""
    sim = JourneySimulator(customers=customers, seed=11, live=True)
    stream = sim.events()
    recent: dict[str, str] = {}  # customer -> channel of its latest event
    rng = random.Random(5)
    events: list[tuple[int, bytes, bytes]] = []
    every = list(range(partitions))
    partitioner = DefaultPartitioner()

    def planned(event: dict) -> str:
        event["timestamp"] = _STAMP_TEXT
        key = customer_key(event)
        encoded = key.encode()
        events.append((partitioner(encoded, every, every), encoded, orjson.dumps(event)))
        return key

    requests: list[bytes] = []
    for i in range(int(seconds * request_rate)):
        while len(events) < int(i / request_rate * event_rate) or not events:
            event = next(stream)
            key = planned(event)
            recent.pop(key, None)
            recent[key] = _channel(event)
            if len(recent) > RECENT_CUSTOMERS:
                del recent[next(iter(recent))]
        customer = rng.choice(list(recent))
        body = {"customer_id": customer, "channel": recent[customer], "limit": 3}
        requests.append(orjson.dumps(body))
    while len(events) < int(seconds * event_rate):
        planned(next(stream))
    return Plan(events, requests)


async def api_load(
    url: str,
    bootstrap: str,
    *,
    event_rate: float,
    request_rate: float,
    seconds: float,
    customers: int,
    partitions: int,
) -> ApiReport:
    """Send live events and decision requests at their rates; the requests' report.

    The requests go from a process of their own (:func:`ask_all`), as channel systems'
    calls come from elsewhere than the clickstream's producers: neither sender's work
    delays the other's.
    """
    report = ApiReport(event_rate=event_rate, request_rate=request_rate, seconds=seconds)
    length = WARMUP_S + seconds
    plan = await asyncio.to_thread(
        plan_load, event_rate, request_rate, length, customers, partitions
    )
    producer = AIOKafkaProducer(**KafkaConnection.parse(bootstrap).client_config(), linger_ms=1)
    await producer.start()
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        f.write(b"\n".join(plan.requests))
    start = time.monotonic() + CLIENT_START_S
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        url,
        f.name,
        repr(request_rate),
        repr(start),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        sent = 0
        while (now := time.monotonic()) - start < length:
            due = min(len(plan.events), int((now - start) * event_rate))
            if due > sent:
                stamp = b'"' + _iso_now()[0].encode() + b'"'
                # In one produce request per partition, as a collector sends in bulk.
                writer = BatchWriter(producer)
                for partition, key, body in plan.events[sent:due]:
                    value = body.replace(_STAMP, stamp, 1)
                    await writer.append(CLICKSTREAM_TOPIC, partition, key, value)
                await writer.flush()
                sent = due
            await asyncio.sleep(TICK_S)
        report.events_sent = sent
        out, _ = await asyncio.wait_for(client.communicate(), timeout=length + 30)
    finally:
        if client.returncode is None:
            client.kill()
        await producer.stop()
        await asyncio.to_thread(Path(f.name).unlink, missing_ok=True)
    asked = orjson.loads(out)
    report.sent, report.ok, report.offered = asked["sent"], asked["ok"], asked["offered"]
    report.errors = asked["errors"]
    report.latency = _latency(asked["latencies"])
    return report


class Connections:
    """Kept-alive HTTP/1.1 connections to the worker, one per request in flight.

    The client is a minimal one (a request is bytes built once, an answer is its status
    line, its Content-Length and its body) so that, on a small machine, the CPU a channel
    system spends on its own calls (on its own machines) takes as little as possible from
    the worker and the broker the bench measures.
    """

    def __init__(self, url: str) -> None:
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.head = (
            f"POST /v1/decide HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def decide(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` to /v1/decide: the answer's status and body."""
        conn = self.idle.pop() if self.idle else await self.open()
        reader, writer = conn
        try:
            writer.write(b"%s%d\r\n\r\n%s" % (self.head, len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lines = head.lower().split(b"\r\n")
            length = next(int(h[15:]) for h in lines if h.startswith(b"content-length:"))
            answer = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if b"connection: close" in lines:
            writer.close()
        else:
            self.idle.append(conn)
        return status, answer


async def ask_all(url: str, bodies: list[bytes], rate: float, start: float) -> dict:
    """Send each request when it is due (open loop, request *i* at ``start`` + i / rate,
    on the monotonic clock every process shares); its latency runs from when it was due
    to its answer. Those due in the first :data:`WARMUP_S` are sent but not counted,
    unless they fail."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counts = {"sent": 0, "ok": 0, "offered": 0}
    pending: set[asyncio.Task[None]] = set()
    connections = Connections(url)

    async def ask(due: float, body: bytes, measured: bool) -> None:
        try:
            status, answer = await asyncio.wait_for(connections.decide(body), REQUEST_TIMEOUT_S)
            if status != 200:
                errors[str(status)] += 1
            elif measured:
                counts["ok"] += 1
                if orjson.loads(answer)["actions"]:
                    counts["offered"] += 1
        except TimeoutError:
            errors["timeout"] += 1
        except (OSError, ValueError, StopIteration, asyncio.IncompleteReadError):
            errors["error"] += 1
        if measured:
            latencies.append((time.monotonic() - due) * 1000)

    # Connections opened before the load, as a channel system's pool keeps them.
    connections.idle.extend(await asyncio.gather(*(connections.open() for _ in range(8))))
    for i, body in enumerate(bodies):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        measured = due >= start + WARMUP_S
        task = asyncio.create_task(ask(due, body, measured))
        pending.add(task)
        task.add_done_callback(pending.discard)
        counts["sent"] += measured
    if pending:
        await asyncio.wait(pending, timeout=15)
    for _, writer in connections.idle:
        writer.close()
    return {**counts, "errors": dict(errors), "latencies": latencies}


def _channel(event: dict) -> str:
    """The offer channel a request for this customer would come on (web by default)."""
    context = event.get("context") or {}
    if "app" in context:
        return "app"
    channel = (event.get("properties") or {}).get("channel")
    return channel if channel in OFFER_CHANNELS else "web"


async def run_api_bench(
    *,
    event_rate: float = 5_000.0,
    request_rate: float = 500.0,
    seconds: float = 10.0,
    partitions: int = 4,
    customers: int = 5_000,
    broker: str | None = None,
    workdir: Path | None = None,
    catalog: Path = DEFAULT_CATALOG,
    echo: Callable[[str], None] = print,
) -> ApiReport:
    """Start a broker (unless given) and a worker; measure the decision API under load."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="rtim-bench-api-"))
    embedded = None
    if broker is None:
        embedded = EmbeddedBroker(log_path=workdir / "broker.log").start()
        broker = embedded.bootstrap
    worker: WorkerProcess | None = None
    try:
        await create_topics(broker, topic_specs(Settings(broker=broker, partitions=partitions)))
        worker = WorkerProcess(
            broker=broker,
            app_id="rtim-bench-api",
            datadir=workdir / "rtim-data",
            log_path=workdir / "rtim.log",
            env={
                "RTIM_PARTITIONS": str(partitions),
                "RTIM_LOG_LEVEL": "warning",
                "RTIM_CATALOG": str(catalog),
            },
        ).start()
        await asyncio.to_thread(worker.wait_ready)
        echo(
            f"decision API: {request_rate:,.0f} requests/s while {event_rate:,.0f} events/s "
            f"go in, for {seconds:.0f} s ..."
        )
        report = await api_load(
            worker.url,
            broker,
            event_rate=event_rate,
            request_rate=request_rate,
            seconds=seconds,
            customers=customers,
            partitions=partitions,
        )
        try:
            worker_account(report, await asyncio.to_thread(worker.metrics))
        except OSError as exc:
            report.notes.append(f"could not read the worker's metrics: {exc}")
        return report
    finally:
        if worker is not None:
            worker.stop()
        if embedded is not None:
            embedded.stop()


def worker_account(report: ApiReport, scraped: dict[str, float]) -> None:
    """Fill in the worker's own account of its answers from a scrape of its metrics."""
    report.learned = int(scraped.get('rtim_examples_learned_total{result="learned"}', 0.0))
    report.snapshots = int(scraped.get("rtim_model_snapshots_published_total", 0.0))
    prefix = 'rtim_api_seconds_bucket{endpoint="decide",le="'
    buckets = sorted(
        (float(name[len(prefix) : -2]), count)
        for name, count in scraped.items()
        if name.startswith(prefix)
    )
    total = scraped.get('rtim_api_seconds_count{endpoint="decide"}', 0.0)
    if not total:
        return
    report.worker_mean_ms = round(
        scraped['rtim_api_seconds_sum{endpoint="decide"}'] / total * 1000, 2
    )

    def bound(q: float) -> float:
        return next((le * 1000 for le, count in buckets if count >= q * total), float("inf"))

    report.worker_p50_ms, report.worker_p99_ms = bound(0.50), bound(0.99)


def format_api_report(report: ApiReport) -> str:
    lines = [
        f"decision API over loopback, {report.request_rate:,.0f} requests/s (open loop) while "
        f"the worker takes {report.event_rate:,.0f} events/s, {report.seconds:.0f} s "
        f"(after {WARMUP_S:g} s of warm-up)",
        f"  requests  {report.sent:>8,} sent, {report.ok:,} answered 200 "
        f"({report.offered:,} with an action)",
        f"  events    {report.events_sent:>8,} sent",
    ]
    if report.errors:
        lines.append(
            "  errors    " + ", ".join(f"{k}: {v:,}" for k, v in sorted(report.errors.items()))
        )
    else:
        lines.append("  errors           0")
    lat = report.latency
    if lat is not None:
        verdict = "within" if lat.p99_ms <= OBJECTIVE_P99_MS else "over"
        lines.append(
            f"  latency   p50 {lat.p50_ms:.2f} ms  p95 {lat.p95_ms:.2f} ms  "
            f"p99 {lat.p99_ms:.2f} ms  max {lat.max_ms:.2f} ms  "
            f"({verdict} the p99 objective of {OBJECTIVE_P99_MS:g} ms)"
        )
    if report.worker_mean_ms is not None:
        lines.append(
            f"  worker    mean {report.worker_mean_ms:.2f} ms, p50 <= {report.worker_p50_ms:g} ms, "
            f"p99 <= {report.worker_p99_ms:g} ms (its own rtim_api_seconds)"
        )
    lines.append(
        f"  learner   {report.learned:,} training records learned, {report.snapshots:,} model "
        "snapshots published meanwhile"
    )
    lines.extend(f"  note: {n}" for n in report.notes)
    return "\n".join(lines)


def api_report_json(report: ApiReport) -> str:
    return orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2).decode()


if __name__ == "__main__":
    # The request client of :func:`api_load`: URL, file of request bodies, rate, start.
    _url, _path, _rate, _start = sys.argv[1:5]
    _bodies = Path(_path).read_bytes().split(b"\n")
    _asked = asyncio.run(ask_all(_url, _bodies, float(_rate), float(_start)))
    sys.stdout.buffer.write(orjson.dumps(_asked))
