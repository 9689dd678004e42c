"""The ``rtim`` command."""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from rtim.errors import ConfigError
from rtim.names import CLICKSTREAM_TOPIC, MODELS_TOPIC, OFFER_CHANNELS
from rtim.settings import DEFAULTS, describe, load_settings

if TYPE_CHECKING:
    from rtim.offers.catalog import Catalog

#: Exit code for a configuration the user must fix (as for a usage error).
CONFIG_ERROR_EXIT = 2


def _settings_help() -> str:
    # "\b" keeps click from re-wrapping the list into one paragraph.
    lines = [f"{env}={default}\n    {doc}" for env, default, doc in describe()]
    return "\b\n" + "\n".join(lines)


class _Commands(click.Group):
    """Turns a :class:`ConfigError` into one line on stderr and exit code 2.

    The traceback comes first with ``RTIM_LOG_LEVEL=debug`` (read as it is: the
    error may be in the settings themselves).
    """

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            if os.environ.get("RTIM_LOG_LEVEL", "").strip().lower() == "debug":
                traceback.print_exc()
            click.echo(f"rtim: {exc}", err=True)
            ctx.exit(CONFIG_ERROR_EXIT)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """RTIM: a streaming real-time interaction manager.

    Watches every customer's clickstream, keeps a live context per customer,
    decides in milliseconds which offer fits the moment, and publishes the
    decision as a CloudEvent trigger to Kafka.
    """


@main.command(epilog="Settings (environment variables):\n\n" + _settings_help())
@click.option("--broker", help="Kafka bootstrap servers (overrides RTIM_BROKER).")
@click.option(
    "--web-port", type=click.IntRange(0, 65535), help="Web port (overrides RTIM_WEB_PORT)."
)
@click.option("--datadir", help="Table storage directory (overrides RTIM_DATADIR).")
def worker(broker: str | None, web_port: int | None, datadir: str | None) -> None:
    """Run a worker against RTIM_BROKER (a Kafka or Redpanda cluster).

    Workers with the same RTIM_APP_ID form one consumer group: start more to
    scale out (up to one per clickstream partition).
    """
    from rtim.stream.worker import run_worker

    overrides = {"broker": broker, "web_port": web_port, "datadir": datadir}
    settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    run_worker(settings)


@main.command()
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port to listen on (default: a free one).",
)
def broker(port: int | None) -> None:
    """Run the embedded Kafka-compatible broker (memory only) until Ctrl-C."""
    from rtim.broker import run_forever

    run_forever(port)


@main.command()
@click.option("--customers", type=click.IntRange(1), default=200, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=100,
    show_default=True,
    help="Events per second.",
)
@click.option(
    "--duration",
    type=click.FloatRange(0),
    default=0,
    show_default=True,
    help="Stop after this many seconds (0: run until Ctrl-C).",
)
@click.option(
    "--web-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Worker metrics/health port (overrides RTIM_WEB_PORT).",
)
@click.option(
    "--keep-logs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the broker's and the worker's logs in this directory.",
)
def demo(
    customers: int, rate: float, duration: float, web_port: int | None, keep_logs: Path | None
) -> None:
    """Embedded broker + worker + simulator: watch triggers flow, no Kafka needed.

    Starts a Kafka-compatible broker on a free local port, an RTIM worker, and
    the journey simulator; prints every trigger as it is published and a
    metrics line every 5 s.

    It stops everything it started and removes its working directory however
    it ends. Exit status 0 when stopped: after --duration, by Ctrl-C, SIGTERM
    or SIGHUP, or when the reader of its output goes away (rtim demo | head);
    1 if the worker fails (the end of its log is shown); 2 if the web port is
    taken.
    """
    import asyncio

    from rtim.demo import DemoError, run_demo

    try:
        asyncio.run(
            run_demo(
                customers=customers,
                rate=rate,
                duration=duration,
                web_port=web_port,
                keep_logs=keep_logs,
                echo=click.echo,
            )
        )
    except DemoError as exc:
        click.echo(f"rtim: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # before or after the demo's own signal handling
        with contextlib.suppress(OSError):
            click.echo("stopped.")


@main.command()
@click.option("--broker", default=None, help="Bootstrap servers (default: RTIM_BROKER).")
@click.option("--customers", type=click.IntRange(1), default=1000, show_default=True)
@click.option(
    "--events",
    "-n",
    type=click.IntRange(1),
    default=None,
    help="Events to send (default: 10,000, or endless with --rate).",
)
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Events per second (default: as fast as possible).",
)
@click.option("--seed", type=int, default=None, help="Seed for a reproducible stream.")
@click.option(
    "--live/--simulated-time",
    default=True,
    show_default=True,
    help="Stamp events with the wall clock, or with simulated journey time.",
)
@click.option("--topic", default=CLICKSTREAM_TOPIC, show_default=True)
def simulate(
    broker: str | None,
    customers: int,
    events: int | None,
    rate: float | None,
    seed: int | None,
    live: bool,
    topic: str,
) -> None:
    """Send realistic multi-channel customer journeys (Segment events) to Kafka.

    Customers browse on web and app, search, add to cart, abandon or buy, open
    e-mails, call the service centre and visit stores; some stay anonymous,
    others sign in and are identified. Waits for the broker and the topic if
    they are not there yet.
    """
    import asyncio
    import logging

    from rtim.settings import KafkaConnection
    from rtim.simulate import JourneySimulator, past_start_ms
    from rtim.simulate_kafka import produce_events
    from rtim.stopping import on_signals

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_kafka_client()  # the simulator's one line per retry says it all
    kafka = KafkaConnection.parse(broker) if broker else load_settings().kafka
    if events is None and rate is None:
        events = 10_000
    start_ms = None if live else past_start_ms()
    sim = JourneySimulator(customers=customers, seed=seed, live=live, start_ms=start_ms)
    # An endless stream (--rate without -n) has no length for a bar: a count instead.
    progress: Any = (
        click.progressbar(length=events, label=f"sending to {topic}", show_pos=True)
        if events is not None
        else _RunningCount(f"sending to {topic}")
    )

    async def send(update: Callable[[int], None]) -> int | None:
        """The events sent, or None if a signal stopped the sending."""
        task = asyncio.ensure_future(
            produce_events(kafka, topic, sim.events(events), rate=rate, progress=update)
        )
        with on_signals(task.cancel):
            try:
                return await task
            except asyncio.CancelledError:
                if task.cancelled():
                    return None
                raise

    with progress as bar:
        try:
            sent = asyncio.run(send(bar.update))
        except KeyboardInterrupt:  # before the signals are handled
            sent = None
    if sent is not None:
        click.echo(f"sent {sent:,} events")
    elif isinstance(progress, _RunningCount):
        click.echo(f"stopped after {progress.sent:,} events.")
    else:
        click.echo("stopped.")


class _RunningCount:
    """``rtim simulate``'s progress when it sends without end: the events the broker
    has acknowledged, one line on stderr every ``every_s`` seconds (a line, not a
    redrawn bar, so that a log file reads as well as a terminal)."""

    def __init__(self, label: str, every_s: float = 5.0) -> None:
        self.label = label
        self.every_s = every_s
        self.sent = 0
        self._clock = time.monotonic
        self._started = self._shown_at = self._clock()

    def __enter__(self) -> _RunningCount:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, delta: int) -> None:
        self.sent += delta
        now = self._clock()
        if now - self._shown_at >= self.every_s:
            self._shown_at = now
            rate = self.sent / max(now - self._started, 1e-9)
            click.echo(f"{self.label}: {self.sent:,} events ({rate:,.0f}/s)", err=True)


@main.command()
@click.option(
    "--events",
    "-n",
    type=click.IntRange(1_000),
    default=100_000,
    show_default=True,
    help="Events to load.",
)
@click.option(
    "--partitions", type=click.IntRange(1), default=DEFAULTS.partitions, show_default=True
)
@click.option("--customers", type=click.IntRange(1), default=5_000, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Offered rate (events/s) of the latency phase (default: 2,000; 5,000 with --api).",
)
@click.option(
    "--latency-seconds",
    type=click.FloatRange(0),
    default=10,
    show_default=True,
    help="Length of the latency phase (0 skips it).",
)
@click.option(
    "--store", type=click.Choice(["rocksdb", "memory"]), default=DEFAULTS.store, show_default=True
)
@click.option("--broker", default=None, help="Use this broker instead of an embedded one.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the report as JSON to this file.",
)
@click.option(
    "--decisions-mix",
    is_flag=True,
    help="Run the worker on the bench's decision-heavy catalog (a quarter of the events "
    "decide, 12 candidate offers each) instead of the sample catalog.",
)
@click.option(
    "--cost-runs",
    type=click.IntRange(0),
    default=3,
    show_default=True,
    help="Runs of the in-process measurement of one decision's cost (0 skips it).",
)
@click.option(
    "--api",
    is_flag=True,
    help="Measure the decision API instead: POST /v1/decide at --api-rate while the "
    "worker takes live events at --rate, for --latency-seconds.",
)
@click.option(
    "--api-rate",
    type=click.FloatRange(0, min_open=True),
    default=500,
    show_default=True,
    help="Requests/s to the decision API (open loop) with --api.",
)
def bench(
    events: int,
    partitions: int,
    customers: int,
    rate: float | None,
    latency_seconds: float,
    store: str,
    broker: str | None,
    json_path: str | None,
    decisions_mix: bool,
    cost_runs: int,
    api: bool,
    api_rate: float,
) -> None:
    """Benchmark RTIM against a raw aiokafka loop, in one run, on one broker.

    Reports events/s for each (from first to last committed offset), their
    ratio, and p50/p95/p99 latency at a fixed offered rate. RTIM runs with
    responses to its decisions flowing in; the cost of one decision is
    measured on the core in-process.

    With --api: p50/p95/p99 of POST /v1/decide over loopback and its errors,
    while the worker takes live events.
    """
    import asyncio

    if api:
        from rtim.bench_api import api_report_json, format_api_report, run_api_bench

        api_report = asyncio.run(
            run_api_bench(
                event_rate=5_000 if rate is None else rate,
                request_rate=api_rate,
                seconds=latency_seconds,
                partitions=partitions,
                customers=customers,
                broker=broker,
                echo=click.echo,
            )
        )
        click.echo(format_api_report(api_report))
        if json_path:
            with open(json_path, "w", encoding="utf-8") as fh:
                fh.write(api_report_json(api_report))
        return
    rate = 2_000 if rate is None else rate

    from rtim.bench import format_report, report_json, run_bench

    with click.progressbar(length=events, label="loading", file=None) as bar:
        report = asyncio.run(
            run_bench(
                events=events,
                partitions=partitions,
                customers=customers,
                rate=rate,
                latency_seconds=latency_seconds,
                store=store,
                broker=broker,
                decisions_mix=decisions_mix,
                cost_runs=cost_runs,
                echo=lambda m: click.echo("\n" + m if not m.startswith(" ") else m),
                progress=bar.update,
            )
        )
    click.echo("")
    click.echo(format_report(report))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            fh.write(report_json(report))


@main.command("bench-raw", hidden=True)
@click.option("--broker", required=True)
def bench_raw(broker: str) -> None:
    """The raw aiokafka loop `rtim bench` measures RTIM against."""
    import asyncio

    from rtim.bench import raw_pipeline

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(raw_pipeline(broker))


if __name__ == "__main__":  # pragma: no cover
    main()


@main.command()
@click.option(
    "--decisions",
    "-n",
    type=int,
    default=None,
    help="Decisions per seed (default: 20,000; 4,000 with --worker).",
)
@click.option(
    "--seeds", default="1,2,3,4,5", show_default=True, help="Comma-separated market seeds."
)
@click.option(
    "--worker",
    "through_worker",
    is_flag=True,
    help="Through a real worker on an embedded broker instead of the core alone.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results as JSON to this file.",
)
def evaluate(
    decisions: int | None, seeds: str, through_worker: bool, json_path: str | None
) -> None:
    """Run the learner on a simulated market and compare it with an oracle, random
    and the best context-free policy (offline: the core alone, no Kafka).

    With --worker, the same market goes through a worker process on an embedded
    broker: Segment events in, decision records out, responses back; a fresh
    broker and worker per seed, stopped at the end (also on Ctrl-C).
    """
    import json

    from rtim.learn.evaluate import format_summary, run, summarise

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(
            f"not a list of integers: {seeds!r}", param_hint="--seeds"
        ) from None
    if decisions is None:
        # About ten events per moment go through Kafka, and each wave of moments
        # waits for the models: 4,000 moments keep a seed to about half a minute.
        decisions = 4_000 if through_worker else 20_000
    if not seed_list or decisions < 8:
        raise click.BadParameter("give at least one seed and 8 decisions")
    if through_worker:
        from rtim.broker import BrokerError
        from rtim.learn.evaluate_worker import EvaluationError, format_timing, run_seed
        from rtim.stream.process import WorkerError

        echo = lambda line: click.echo(line, err=True)  # noqa: E731
        try:
            runs = [run_seed(seed, decisions, echo=echo) for seed in seed_list]
        except KeyboardInterrupt:
            click.echo("stopped.", err=True)
            raise SystemExit(1) from None
        except (BrokerError, WorkerError, EvaluationError) as exc:
            click.echo(f"rtim: {exc}", err=True)
            raise SystemExit(1) from None
        summary = summarise([r.result for r in runs])
        for run_, timing in zip(summary["runs"], runs, strict=True):
            run_["wall_s"] = round(timing.wall_s, 1)
            run_["decisions_per_s"] = round(timing.decisions_per_s, 1)
        click.echo(format_summary(summary))
        click.echo(format_timing(summary))
    else:
        results = []
        for seed in seed_list:
            click.echo(f"seed {seed}: {decisions:,} decisions ...", err=True)
            results.append(run(seed, decisions))
        summary = summarise(results)
        click.echo(format_summary(summary))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)


def _quiet_kafka_client() -> None:
    """aiokafka logs each failed connection attempt as an error of its own: a command's
    own line says what failed, once."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


@main.command()
@click.option("--broker", default=None, help="Bootstrap servers (default: RTIM_BROKER).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option(
    "--timeout", type=float, default=30, show_default=True, help="Seconds to read the topic."
)
def models(broker: str | None, as_json: bool, timeout: float) -> None:
    """List the shared model of each offer, as every worker decides with it.

    Reads rtim.models to its end: per offer, the examples and positives learned,
    the mean predicted propensity and the observed conversion over its latest
    examples (predicted just before each was learned), the version and the age
    of its newest snapshot.
    """
    import asyncio
    import json

    from aiokafka.errors import KafkaError

    from rtim.learn.learner import models_table
    from rtim.settings import KafkaConnection
    from rtim.stream.models import read_models

    _quiet_kafka_client()

    kafka = KafkaConnection.parse(broker) if broker else load_settings().kafka
    try:
        rows = asyncio.run(read_models(kafka, timeout=timeout)).summaries()
    except (TimeoutError, KafkaError) as exc:
        click.echo(f"rtim: {MODELS_TOPIC} not read from {kafka} ({exc!r})", err=True)
        raise SystemExit(1) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no model snapshots on rtim.models yet")
        return

    for line in models_table(rows):
        click.echo(line)


@main.group()
def offers() -> None:
    """The live catalog (rtim.offers): every worker decides with its newest version."""


@offers.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--broker", default=None, help="Bootstrap servers (default: RTIM_BROKER).")
@click.option("--by", default=None, help="Who applies it (default: $USER).")
@click.option("--timeout", type=float, default=30, show_default=True, help="Seconds for Kafka.")
def offers_apply(file: Path, broker: str | None, by: str | None, timeout: float) -> None:
    """Check a catalog file and publish it as the next version of the live catalog.

    A catalog with errors is not published: each error is printed with its file
    and line, and the exit status is 2 (``rtim offers check`` does the same checks
    without a broker). Published, it is in force on every worker within seconds
    (GET /v1/catalog shows the version). The topics of the channels it names are
    created if they are missing.
    """
    import asyncio
    import getpass

    from aiokafka.errors import KafkaError

    from rtim.offers.catalog import load_catalog
    from rtim.settings import KafkaConnection
    from rtim.stream.catalog import apply_catalog
    from rtim.stream.topics import create_topics

    catalog = load_catalog(file)  # a CatalogError exits with 2 before anything is sent
    assert catalog.text is not None
    _quiet_kafka_client()
    settings = load_settings()
    kafka = KafkaConnection.parse(broker) if broker else settings.kafka
    who = by or os.environ.get("USER") or getpass.getuser()

    async def apply() -> int:
        from rtim.names import OFFERS_TOPIC, trigger_topic

        specs = {OFFERS_TOPIC: 1}
        specs.update({trigger_topic(c): settings.partitions for c in sorted(catalog.channels)})
        await create_topics(
            kafka, specs, replication_factor=settings.replication_factor, timeout=timeout
        )
        return await apply_catalog(kafka, catalog.text or "", by=who, timeout=timeout)

    try:
        version = asyncio.run(apply())
    except (TimeoutError, KafkaError, OSError) as exc:
        click.echo(f"rtim: catalog not published to {kafka} ({exc!r})", err=True)
        raise SystemExit(1) from None
    click.echo(f"catalog version {version} published ({_catalog_counts(catalog)})")


def _catalog_counts(catalog: Catalog) -> str:
    return (
        f"{len(catalog.triggers)} triggers, {len(catalog.offers)} offers, "
        f"{len(catalog.placements)} placements"
    )


@offers.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def offers_check(files: tuple[Path, ...]) -> None:
    """Check catalog files as ``rtim offers apply`` does, without publishing them (no
    broker needed: for an editor, a commit hook or a CI job).

    Each error is printed with its file and line; the exit status is 2 if any file has
    one, else 0.
    """
    from rtim.offers.catalog import CatalogError, load_catalog

    failed = False
    for file in files:
        try:
            catalog = load_catalog(file)
        except CatalogError as exc:
            click.echo(f"rtim: {exc}", err=True)
            failed = True
            continue
        click.echo(f"{file}: ok ({_catalog_counts(catalog)})")
    if failed:
        raise SystemExit(CONFIG_ERROR_EXIT)


_WORKER_URL = click.option(
    "--url",
    default=None,
    help="A worker's web address (default: http://127.0.0.1:RTIM_WEB_PORT); any worker "
    "answers for every customer.",
)
_AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print the worker's JSON answer.")


def _ask_worker(url: str | None, path: str, body: dict[str, Any] | None = None) -> Any:
    """A worker's JSON answer to ``GET path`` (or ``POST`` of ``body``); a failure is
    said and exits 1 (2 for a URL that is none)."""
    import http.client
    import json
    import urllib.error
    import urllib.request

    base = (url or f"http://127.0.0.1:{load_settings().web_port}").rstrip("/")
    address = f"{base}{path}"
    data = None if body is None else json.dumps(body).encode()
    try:
        request = urllib.request.Request(address, data=data)
    except ValueError as exc:  # not a URL at all
        click.echo(f"rtim: --url {base!r} is not a worker's URL ({exc})", err=True)
        raise SystemExit(2) from None
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        said = exc.read().decode(errors="replace")
        click.echo(f"rtim: {address} answered {exc.code}: {said}", err=True)
        raise SystemExit(1) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        click.echo(f"rtim: cannot reach {address} ({exc})", err=True)
        raise SystemExit(1) from None
    try:
        return json.loads(raw)
    except ValueError:
        click.echo(f"rtim: {address} answered, but not in JSON: is it an RTIM worker?", err=True)
        raise SystemExit(1) from None


@main.command()
@click.argument("customer")
@click.option("--channel", required=True, type=click.Choice(sorted(OFFER_CHANNELS)))
@click.option("--placement", default=None, help="A placement of the catalog.")
@click.option("--limit", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--context",
    "attributes",
    multiple=True,
    metavar="NAME=VALUE",
    help="A request attribute conditions may read (event.properties.NAME); repeatable.",
)
@click.option("--request-id", default=None, help="Asked again with it: answered as before.")
@_WORKER_URL
@_AS_JSON
def decide(
    customer: str,
    channel: str,
    placement: str | None,
    limit: int,
    attributes: tuple[str, ...],
    request_id: str | None,
    url: str | None,
    as_json: bool,
) -> None:
    """Ask the decision API for a customer's next best actions (POST /v1/decide): this
    is a decision like any other, recorded and counted against the contact policy."""
    import json

    context = {}
    for attribute in attributes:
        name, equals, value = attribute.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"{attribute!r} is not NAME=VALUE", param_hint="--context")
        context[name] = value
    body: dict[str, Any] = {"customer_id": customer, "channel": channel, "limit": limit}
    optional = {"placement": placement, "context": context, "request_id": request_id}
    body.update((k, v) for k, v in optional.items() if v)
    answer = _ask_worker(url, "/v1/decide", body)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    repeated = "  (asked before: the same answer)" if answer.get("repeated") else ""
    click.echo(f"decision {answer['decision_id']}  by {answer['worker']}{repeated}")
    if not answer["actions"]:
        click.echo(f"  nothing to offer: {answer['reason']}")
    for rank, action in enumerate(answer["actions"], 1):
        click.echo(
            f"  {rank}. {action['offer_id']} on {action['channel']}  score {action['score']:g}"
            f"  propensity {action['propensity']:g}"
        )
        for reason in action["reasons"]:
            click.echo(f"      {reason}")
    click.echo("reasons:")
    for reason in answer["reasons"]:
        click.echo(f"  {reason}")


@main.command()
@click.argument("customer")
@_WORKER_URL
@_AS_JSON
def explain(customer: str, url: str | None, as_json: bool) -> None:
    """Show a customer's context, policy state and last decisions with their reasons."""
    import datetime as dt
    import json
    import urllib.parse

    body = _ask_worker(url, f"/v1/customers/{urllib.parse.quote(customer, safe='')}")
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return

    def when(ms: int | None) -> str:
        if ms is None:
            return "-"
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

    click.echo(f"customer {customer}  (partition {body['partition']}, {body['worker']})")
    if not body["known"]:
        click.echo("  never seen: a request would be decided as for a new visitor")
        return
    ctx = body["context"]
    click.echo(
        f"  events {ctx['n']}, first {when(ctx['first_ms'])}, last {when(ctx['last_ms'])}; "
        f"cart {ctx['cart']['value']:.2f} ({len(ctx['cart']['items'])} items), "
        f"orders {ctx['orders']}, open issues {ctx['issues']}"
    )
    top = sorted(ctx["affinity"].items(), key=lambda kv: -kv[1])[:3]
    if top:
        click.echo("  affinity " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    click.echo("policy:")
    for name, value in body["policy"].items():
        click.echo(f"  {name}: {json.dumps(value)}")
    click.echo("open decisions:")
    for d in body["open_decisions"] or [{}]:
        if d:
            click.echo(f"  {d['decision_id']}  {d['offer_id']}  until {when(d['window_end'])}")
        else:
            click.echo("  none")
    click.echo("last decisions (newest first):")
    if not body["decisions"]:
        click.echo("  none")
    for d in body["decisions"]:
        click.echo(
            f"  {when(d['at'])}  {d['by']}  -> {d['offer'] or 'no offer'} on {d['channel']}"
            f"  ({d['id']})"
        )
        if len(d.get("actions") or ()) > 1:  # a request answered with several actions
            also = ", ".join(f"{offer} on {channel}" for offer, channel, *_ in d["actions"][1:])
            click.echo(f"      also: {also}")
        for reason in d["reasons"]:
            click.echo(f"      {reason}")
