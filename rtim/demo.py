"""``rtim demo``: embedded broker + worker + simulator, triggers printed as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

from rtim.broker import EmbeddedBroker
from rtim.names import TRIGGER_TOPIC_PREFIX
from rtim.settings import KafkaConnection, Settings
from rtim.simulate import JourneySimulator
from rtim.simulate_kafka import produce_events
from rtim.stream.app import CLICKSTREAM_TOPIC, DLQ_TOPIC
from rtim.stream.process import WorkerProcess
from rtim.stream.topics import create_topics, topic_specs

Echo = Callable[[str], None]


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
    bootstrap: str, topics: list[str], echo: Echo, counts: dict[str, int]
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
        echo(
            f"-- events consumed {consumed:,.0f}"
            f" | customers {m.get('rtim_context_customers', 0):,.0f}"
            f" | triggers {counts['triggers']:,}"
            f" | no-offer moments {m.get('rtim_decisions_no_offer_total', 0):,.0f}"
            f" | mean decision latency {lat_avg:.1f} ms --"
        )


async def run_demo(
    *,
    customers: int = 200,
    rate: float = 100.0,
    duration: float = 0.0,
    web_port: int = 6066,
    workdir: Path | None = None,
    echo: Echo = print,
) -> dict[str, int]:
    """Run until ``duration`` seconds have passed (0: until cancelled); return the counts."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="rtim-demo-"))
    counts = {"triggers": 0, "dead letters": 0, "events": 0}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        echo(f"embedded broker on {broker.bootstrap} (memory only)")
        settings = Settings(broker=broker.bootstrap)
        specs = topic_specs(settings)
        await create_topics(broker.bootstrap, specs)
        worker = WorkerProcess(
            broker=broker.bootstrap,
            datadir=workdir / "worker-data",
            web_port=web_port,
            log_path=workdir / "worker.log",
            env={"RTIM_LOG_LEVEL": "warning"},
        )
        worker.start()
        try:
            await asyncio.to_thread(worker.wait_ready, 120.0)
            echo(f"worker ready: metrics {worker.url}/metrics, health {worker.url}/health/ready")
            echo(f"worker log: {worker.log_path}")
            echo(
                f"simulating {customers} customers at {rate:g} events/s on web, app, email, "
                "call centre and store; triggers below (Ctrl-C stops)\n"
            )
            trigger_topics = [t for t in specs if t.startswith(TRIGGER_TOPIC_PREFIX)]
            sim = JourneySimulator(customers=customers, live=True)

            def sent(n: int) -> None:
                counts["events"] += n

            tasks = [
                asyncio.create_task(
                    _print_triggers(broker.bootstrap, trigger_topics, echo, counts)
                ),
                asyncio.create_task(_status(worker, echo, counts, every=5.0)),
                asyncio.create_task(
                    produce_events(
                        broker.bootstrap, CLICKSTREAM_TOPIC, sim.events(), rate=rate, progress=sent
                    )
                ),
            ]
            started = time.monotonic()
            try:
                while duration <= 0 or time.monotonic() - started < duration:
                    done = [t for t in tasks if t.done()]
                    for task in done:
                        task.result()  # surface a crashed task
                    if not worker.alive:
                        raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
                    await asyncio.sleep(0.2)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        finally:
            echo("\nstopping worker and broker ...")
            worker.stop()
    echo(
        f"sent {counts['events']:,} events, received {counts['triggers']:,} triggers, "
        f"{counts['dead letters']:,} dead letters"
    )
    return counts
