"""``rtim demo``: embedded broker + worker + simulator, triggers printed as they arrive.

The demo also plays the channel systems (:class:`ChannelSystems`): each trigger's offer is
shown, and answered on ``rtim.responses`` as a channel system would answer it, seconds
later: an impression, a click and a conversion for some, a dismissal for others. The
worker joins them to its decisions and its models learn from them, which the metrics line
shows (responses, examples) and the models' table at the end (``GET /v1/models``).

The demo leaves nothing behind, however it ends: after ``--duration``; on Ctrl-C,
SIGTERM or SIGHUP (the terminal closing), which stop the worker, then the broker, in
order; when whatever reads its output goes away (``rtim demo | head``), which is a
normal end too; or killed outright, when the kernel kills the worker and the broker
with it (see :mod:`rtim.stream.process`) and a small janitor process removes the
working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from rtim.broker import EmbeddedBroker
from rtim.decide.cloudevent import iso_ms
from rtim.errors import ConfigError
from rtim.learn.learner import models_table
from rtim.learn.models import POOLED
from rtim.names import CLICKSTREAM_TOPIC, DLQ_TOPIC, RESPONSES_TOPIC, TRIGGER_TOPIC_PREFIX
from rtim.settings import KafkaConnection, Settings, load_settings
from rtim.simulate import JourneySimulator
from rtim.simulate_kafka import produce_events
from rtim.stopping import on_signals
from rtim.stream.process import WorkerProcess
from rtim.stream.topics import create_topics, topic_specs

Echo = Callable[[str], None]

#: Grace period of the worker's own shutdown before it is killed.
WORKER_STOP_TIMEOUT_S = 10.0


class DemoError(RuntimeError):
    """The demo cannot go on (its worker died); the message carries the worker's log tail."""


class _Output:
    """The demo's lines. A reader that goes away ends the demo; it is not an error.

    ``rtim demo | head -3`` closes the pipe (BrokenPipeError) and a closed terminal
    answers EIO: then the demo stops everything and ends with status 0, as on Ctrl-C.
    """

    def __init__(self, echo: Echo, on_closed: Callable[[], None]) -> None:
        self._echo = echo
        self._on_closed = on_closed
        self.closed = False

    def __call__(self, line: str) -> None:
        if self.closed:
            return
        try:
            self._echo(line)
        except OSError:
            self.closed = True
            # Python flushes stdout once more at exit; what is still buffered there
            # would fail again (a message and status 120), so let it go nowhere.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            self._on_closed()


# Removes the demo's working directory once the demo has gone, even when it was
# SIGKILLed: it reads the pids of the demo's children from its stdin, a pipe whose
# other end only the demo holds, so end of file means the demo has ended; it waits
# until those children are gone too (the kernel kills them with the demo), then
# removes the directory. Standard library only, so it starts in milliseconds.
_JANITOR = """
import os, shutil, sys, time

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False

pids = [int(line) for line in sys.stdin]
deadline = time.monotonic() + 15
while any(alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class _Janitor:
    """The process running :data:`_JANITOR` for one working directory."""

    def __init__(self, workdir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _JANITOR, str(workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal must not end it first
        )

    def watch(self, pid: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{pid}\n".encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def check_port_free(port: int) -> None:
    """Raise :class:`ConfigError` if the worker could not listen on ``port``.

    Binds as the worker's web server does (loopback, SO_REUSEADDR), so a port still
    in TIME_WAIT from the previous run counts as free and any listener as taken.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(
                f"web port {port} is taken ({exc.strerror}): choose another with "
                "RTIM_WEB_PORT or --web-port"
            ) from exc


async def _until_ready(worker: WorkerProcess, stop: asyncio.Event, timeout: float) -> bool:
    """Wait until the worker is ready (True) or a stop is asked for (False)."""
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        if not worker.alive:
            raise DemoError(_worker_died(worker, "during start-up"))
        if await asyncio.to_thread(worker.status, "/health/ready", 1.0) == 200:
            return True
        if time.monotonic() > deadline:
            raise DemoError(
                f"the worker was not ready after {timeout:.0f} s; the end of its log:\n"
                + worker.log_tail()
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    return False


def _worker_died(worker: WorkerProcess, when: str) -> str:
    code = worker.proc.returncode if worker.proc else None
    tail = worker.log_tail()
    log = f"the end of its log:\n{tail}" if tail.strip() else "its log is empty"
    return f"the worker exited {when} (status {code}); {log}"


#: How often a trigger's offer converts, by the moment that fired it (the sample
#: catalog's triggers; others convert at :data:`DEFAULT_CONVERSION`): offers made at
#: checkout or to a customer waiting on a service issue convert more than those made
#: while browsing, which is what the models come to learn.
CONVERSION_BY_MOMENT = {
    "checkout-started": 0.35,
    "service-issue": 0.30,
    "cart-builder": 0.15,
    "app-regular": 0.10,
    "browse-intent": 0.08,
    "post-purchase": 0.05,
}
DEFAULT_CONVERSION = 0.10
#: Share of the triggers shown (an impression), and of those not converting dismissed.
IMPRESSION_RATE = 0.7
DISMISSAL_RATE = 0.15


class ChannelSystems:
    """The demo's channel systems: they answer each trigger on ``rtim.responses`` as
    real ones would, seconds later (in wall-clock time, which is the demo's event time).

    A trigger is shown (an impression, most of them, within a second or two); it
    converts with the chance its moment has (:data:`CONVERSION_BY_MOMENT`), a click
    first, the conversion 2-12 s after the trigger; one that does not convert is
    dismissed now and then, 1-6 s after. A demo of a few minutes closes no attribution
    window (an hour to a week of event time in the sample catalog), so
    its models learn the conversions and dismissals; decisions left without either
    become negative examples when their windows end.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random(7)
        #: (when, seq, key, body): a heap of the responses planned.
        self._due: list[tuple[float, int, bytes, dict[str, str]]] = []
        self._seq = 0

    def answer(self, trigger: bytes, now: float) -> None:
        """Plan the responses to one trigger (a CloudEvent), from ``now`` (monotonic)."""
        try:
            data = orjson.loads(trigger)["data"]
            decision_id, customer_id = data["decision_id"], data["customer_id"]
            moment = data["trigger"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        r = self.rng

        def respond(outcome: str, after: float) -> None:
            body = {"decision_id": decision_id, "customer_id": customer_id, "outcome": outcome}
            self._seq += 1
            heapq.heappush(self._due, (now + after, self._seq, customer_id.encode(), body))

        if r.random() < IMPRESSION_RATE:
            respond("impression", r.uniform(0.2, 2.0))
        if r.random() < CONVERSION_BY_MOMENT.get(moment, DEFAULT_CONVERSION):
            converted = r.uniform(2.0, 12.0)
            respond("click", r.uniform(1.0, converted))
            respond("conversion", converted)
        elif r.random() < DISMISSAL_RATE:
            respond("dismissal", r.uniform(1.0, 6.0))

    def due(self, now: float) -> list[tuple[bytes, bytes]]:
        """The responses due by ``now`` (key, value), each stamped with the wall clock."""
        out = []
        stamp = iso_ms(int(time.time() * 1000))
        while self._due and self._due[0][0] <= now:
            _, _, key, body = heapq.heappop(self._due)
            out.append((key, orjson.dumps({**body, "timestamp": stamp})))
        return out


async def _send_responses(
    bootstrap: str, systems: ChannelSystems, counts: dict[str, int], every: float = 0.2
) -> None:
    producer = AIOKafkaProducer(**KafkaConnection.parse(bootstrap).client_config())
    await producer.start()
    try:
        while True:
            await asyncio.sleep(every)
            due = systems.due(time.monotonic())
            for key, value in due:
                await producer.send(RESPONSES_TOPIC, value, key=key)
            if due:
                await producer.flush()
                counts["responses"] += len(due)
    finally:
        await producer.stop()


def format_trigger(topic: str, value: bytes) -> str:
    """One line per trigger, for people watching the demo."""
    try:
        ce = orjson.loads(value)
        data = ce["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{topic}: (unreadable trigger)"
    return (
        f"{ce['time'][11:23]}  {data['channel']:<11} {ce['subject'][:22]:<22} "
        f"{data['offer']['id']:<20} score={data['score']:<8.3f} "
        f"moment={data['trigger']:<16} cart={data['context']['cart_value']}"
    )


async def _print_triggers(
    bootstrap: str,
    topics: list[str],
    echo: Echo,
    counts: dict[str, int],
    systems: ChannelSystems,
) -> None:
    consumer = AIOKafkaConsumer(
        *topics,
        DLQ_TOPIC,
        **KafkaConnection.parse(bootstrap).client_config(),
        auto_offset_reset="latest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for rec in records:
                    if tp.topic == DLQ_TOPIC:
                        counts["dead letters"] += 1
                        reason = dict(rec.headers).get("rtim.errors.reason", b"?").decode()
                        echo(f"  dead letter ({reason}) from partition {tp.partition}")
                    else:
                        counts["triggers"] += 1
                        echo(format_trigger(tp.topic, rec.value))
                        systems.answer(rec.value, time.monotonic())
    finally:
        await consumer.stop()


async def _status(worker: WorkerProcess, echo: Echo, counts: dict[str, int], every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            m = await asyncio.to_thread(worker.metrics)
        except OSError:
            continue
        lat_n = m.get("rtim_decision_latency_seconds_count", 0.0)
        lat_avg = m.get("rtim_decision_latency_seconds_sum", 0.0) / lat_n * 1000 if lat_n else 0.0
        consumed = m.get('rtim_events_consumed_total{topic="rtim.clickstream"}', 0.0)
        responses = sum(v for k, v in m.items() if k.startswith("rtim_responses_total{"))
        examples = sum(v for k, v in m.items() if k.startswith("rtim_training_examples_total{"))
        positives = sum(
            v
            for k, v in m.items()
            if k.startswith("rtim_training_examples_total{") and 'label="positive"' in k
        )
        echo(
            f"-- events consumed {consumed:,.0f}"
            f" | customers {m.get('rtim_context_customers', 0):,.0f}"
            f" | triggers {counts['triggers']:,}"
            f" | no-offer moments {m.get('rtim_decisions_no_offer_total', 0):,.0f}"
            f" | mean decision latency {lat_avg:.1f} ms"
            f" | responses {responses:,.0f}"
            f" | examples {examples:,.0f} ({positives:,.0f} positive) --"
        )


def _models(worker: WorkerProcess) -> list[dict[str, Any]]:
    with urllib.request.urlopen(worker.url + "/v1/models", timeout=5) as resp:
        rows: list[dict[str, Any]] = orjson.loads(resp.read())["models"]
    return rows


async def run_demo(
    *,
    customers: int = 200,
    rate: float = 100.0,
    duration: float = 0.0,
    web_port: int | None = None,
    keep_logs: Path | None = None,
    echo: Echo = print,
) -> dict[str, int]:
    """Run until ``duration`` seconds have passed (0: until stopped); return the counts.

    ``web_port`` defaults to the ``RTIM_WEB_PORT`` setting. The working directory
    (worker data, logs) is removed at the end; ``keep_logs`` names a directory that
    keeps the broker's and the worker's logs.

    Raises
    ------
    ConfigError
        If the web port is taken (checked before anything is started).
    DemoError
        If the worker dies; the message ends with its log tail.
    """
    port = web_port if web_port is not None else load_settings().web_port
    check_port_free(port)
    counts = {"triggers": 0, "dead letters": 0, "events": 0, "responses": 0}
    stop = asyncio.Event()
    out = _Output(echo, on_closed=stop.set)
    # A signal during the clean-up below only sets `stop` again.
    with on_signals(stop.set):
        workdir = Path(tempfile.mkdtemp(prefix="rtim-demo-"))
        janitor = _Janitor(workdir)
        try:
            logdir = keep_logs or workdir
            logdir.mkdir(parents=True, exist_ok=True)
            await _run(
                customers=customers,
                rate=rate,
                duration=duration,
                port=port,
                workdir=workdir,
                logdir=logdir,
                janitor=janitor,
                stop=stop,
                counts=counts,
                out=out,
            )
        except DemoError as exc:
            if keep_logs is None:
                raise
            raise DemoError(f"{exc}\nlogs kept in {keep_logs}") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            janitor.close()
    out(
        f"sent {counts['events']:,} events, received {counts['triggers']:,} triggers, "
        f"{counts['dead letters']:,} dead letters; sent back {counts['responses']:,} responses"
    )
    if keep_logs is not None:
        out(f"logs kept in {keep_logs}")
    return counts


async def _run(
    *,
    customers: int,
    rate: float,
    duration: float,
    port: int,
    workdir: Path,
    logdir: Path,
    janitor: _Janitor,
    stop: asyncio.Event,
    counts: dict[str, int],
    out: Echo,
) -> None:
    # The broker first, while this process has no other thread: only then can the
    # broker ask the kernel to end it with this process (see rtim.broker).
    with EmbeddedBroker(log_path=logdir / "broker.log") as broker:
        assert broker.pid is not None
        janitor.watch(broker.pid)
        out(f"embedded broker on {broker.bootstrap} (memory only)")
        settings = Settings(broker=broker.bootstrap)
        specs = topic_specs(settings)
        await create_topics(broker.bootstrap, specs)
        if stop.is_set():  # stopped while the broker was starting
            return
        worker = WorkerProcess(
            broker=broker.bootstrap,
            datadir=workdir / "worker-data",
            web_port=port,
            log_path=logdir / "worker.log",
            env={"RTIM_LOG_LEVEL": "warning"},
        )
        worker.start()  # from the main thread, which lives as long as the worker
        assert worker.proc is not None
        janitor.watch(worker.proc.pid)
        tasks: list[asyncio.Task[object]] = []
        try:
            if not await _until_ready(worker, stop, timeout=120.0):
                return
            out(f"worker ready: metrics {worker.url}/metrics, health {worker.url}/health/ready")
            out(f"worker log: {worker.log_path}")
            out(
                f"simulating {customers} customers at {rate:g} events/s on web, app, email, "
                "call centre and store, and the channel systems answering the triggers on "
                f"{RESPONSES_TOPIC}; triggers below (Ctrl-C stops)\n"
            )
            trigger_topics = [t for t in specs if t.startswith(TRIGGER_TOPIC_PREFIX)]
            sim = JourneySimulator(customers=customers, live=True)
            systems = ChannelSystems()

            def sent(n: int) -> None:
                counts["events"] += n

            tasks = [
                asyncio.create_task(
                    _print_triggers(broker.bootstrap, trigger_topics, out, counts, systems)
                ),
                asyncio.create_task(_send_responses(broker.bootstrap, systems, counts)),
                asyncio.create_task(_status(worker, out, counts, every=5.0)),
                asyncio.create_task(
                    produce_events(
                        broker.bootstrap, CLICKSTREAM_TOPIC, sim.events(), rate=rate, progress=sent
                    )
                ),
            ]
            started = time.monotonic()
            while not stop.is_set() and (duration <= 0 or time.monotonic() - started < duration):
                for task in tasks:
                    if task.done():
                        task.result()  # surface a crashed task
                if not worker.alive:
                    raise DemoError(_worker_died(worker, "while the demo ran"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if tasks and worker.alive:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    rows = await asyncio.to_thread(_models, worker)
                    out("\nthe offers' models, as the worker decides with them (GET /v1/models):")
                    for line in (
                        models_table(rows) if rows else ["no model has learned an example yet"]
                    ):
                        out("  " + line)
                    out(
                        f"  ({POOLED} is the pooled model every offer's prior comes from; "
                        "decisions without a conversion become negative examples when their "
                        "attribution windows end, an hour to a week of event time)"
                    )
            out("\nstopping worker and broker ...")
            worker.stop(timeout=WORKER_STOP_TIMEOUT_S)
