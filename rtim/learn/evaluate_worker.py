"""``rtim evaluate --worker``: the simulated market through a real worker.

The market of :mod:`rtim.learn.evaluate` (the same customers, moments, truth and
responses for a seed), played against the product as it runs: an embedded broker,
one worker process with a catalog made from the market's offers, Segment events
in, decision records out, responses back on ``rtim.responses``.

How a moment reaches the worker
-------------------------------
Each moment becomes Segment calls that bring the customer's context in the worker
to the moment's context, then one call that names the moment (``Market Moment``,
``properties.moment`` = browse, cart or service), which fires the catalog's
trigger of that name (cool-down 0). The first time a customer is seen: an
``identify`` with the plan and segment and an ``Order Completed`` per past order,
at the customer's first-seen time. Before every moment (1 ms before it): the cart
emptied line by line (``Product Removed``, which leaves ``orders`` alone, unlike
``Order Completed``) and filled with the moment's lines, a support ticket opened
or resolved, three page views ending with the moment's pages, and the category
affinities moved to the moment's (``Product Removed`` lowers an interest by 1 per
product, ``Product List Viewed`` raises it by 0.5 per product: within 0.25 of the
moment's value). The calls are computed on a copy of each context built by the
context model itself, so they land where they are meant to. What differs from the
offline context: the number of events seen (``n``), which the market's truth does
not read, and the affinities' rounding.

The 13th offer is in the catalog from the start with ``valid_from`` at the moment
that launches it. Every offer's attribution window is the market's (2 h).

Pacing
------
Moments go in waves (at most :data:`WAVE` at a time): the responses due by the
wave's first moment are sent first, and the worker has taken them in before the
wave's events go (so that no event of the wave moves its partition's stream time
past a window those responses belong to); then the wave's events; then its
decisions are read from ``rtim.decisions`` (matched by the moment's message id),
scored with the market's truth exactly as the offline run scores its own, and
their responses drawn. A response is sent once the market's clock has reached its
timestamp, so the worker hears of responses up to one wave (about 50 minutes of
market time) later than the offline loop does. A wave ends early, before the
moment that would close the window of a response still to come, so that this
response is not late for the worker when it would not be for the offline loop.

The market runs thousands of times faster than its clock, so a wave also waits
until the models the worker decides with have learned every example it wrote
(``rtim_model_version`` against ``rtim_training_examples_total``), as they would
have between moments 15 s apart; snapshots are published every 0.1 s for it. The
numbers then do not depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from rtim.broker import EmbeddedBroker
from rtim.context.model import Context, apply_event, new_context
from rtim.decide.cloudevent import iso_ms
from rtim.events import parse_event
from rtim.learn.attribution import JOIN_RESULTS
from rtim.learn.evaluate import (
    CATEGORIES,
    LATE_OFFER,
    NEW_OFFER,
    OFFERS,
    WINDOW_MS,
    Market,
    Moment,
    RunResult,
    _responses,
    _sigmoid,
    true_logit,
)
from rtim.learn.features import DEFAULT_SPEC_DATA
from rtim.learn.models import POOLED
from rtim.names import CLICKSTREAM_TOPIC, DECISIONS_TOPIC, RESPONSES_TOPIC
from rtim.offers.catalog import Offer
from rtim.settings import KafkaConnection, Settings, load_settings
from rtim.stopping import on_signals
from rtim.stream.process import WorkerError, WorkerProcess
from rtim.stream.topics import create_topics, topic_specs

#: Most moments sent to the worker at once.
WAVE = 200
#: The market's moment kinds (:meth:`rtim.learn.evaluate.Market.moment`): one trigger each.
MOMENT_KINDS = ("browse", "cart", "service")
#: The track event that names a moment.
MOMENT_EVENT = "Market Moment"
#: The identify traits the market's customers have.
TRAITS = ("plan", "segment")
#: Pages the feature spec reads (``pages``, ``last: 3``): a moment's pages are padded to it.
PAGES_SEEN = 3
#: Seconds of the worker's start and of each wait for it.
READY_TIMEOUT_S = 120.0
WAIT_TIMEOUT_S = 120.0
#: Worker settings of the evaluation: only event time closes windows (a wall-clock
#: close would end every window of the market at once, its times being in the past).
WORKER_ENV = {
    "RTIM_LOG_LEVEL": "warning",
    "RTIM_ATTRIBUTION_WINDOW_S": str(WINDOW_MS // 1000),
    "RTIM_IDLE_CLOSE_S": str(10 * 365 * 86_400),
    # Snapshots often: the market runs thousands of times faster than its clock, and
    # each wave waits for the models to have learned what the worker wrote.
    "RTIM_MODEL_SNAPSHOT_INTERVAL_S": "0.1",
}
_RESPONSES_CONSUMED = f'rtim_events_consumed_total{{topic="{RESPONSES_TOPIC}"}}'
_DECISIONS_OFFERED = 'rtim_decisions_total{offered="yes"}'
_EXAMPLES_WRITTEN = "rtim_training_examples_total{"
#: Examples learned by the model of each offer the worker decides with.
_MODEL_VERSION = "rtim_model_version{"
_POOLED_VERSION = f'rtim_model_version{{offer="{POOLED}"}}'


class EvaluationError(RuntimeError):
    """The worker did not answer as expected; the message says what."""


@dataclass
class WorkerRun:
    """One seed through the worker: the market's result and how long it took."""

    result: RunResult
    #: Seconds from the broker's start to the worker's stop.
    wall_s: float
    #: Seconds of the market itself (events in, decisions out, responses back).
    market_s: float

    @property
    def decisions_per_s(self) -> float:
        return self.result.decisions / self.market_s if self.market_s > 0 else 0.0


def market_catalog(launch_ms: int) -> dict[str, Any]:
    """The catalog of the market: a trigger per moment kind, every offer a candidate of
    each, the new offer valid from its launch, the offline run's features."""

    def offer(o: Offer) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": o.id,
            "name": o.name,
            "channels": list(o.channels),
            "value": o.value,
            "attribution_window": WINDOW_MS // 1000,
        }
        if o.category is not None:
            entry["category"] = o.category
        return entry

    late = offer(LATE_OFFER)
    late["valid_from"] = iso_ms(launch_ms)
    return {
        "triggers": [
            {
                "id": kind,
                "when": {"type": "track", "event": MOMENT_EVENT, "properties": {"moment": kind}},
                "cooldown": 0,
            }
            for kind in MOMENT_KINDS
        ],
        "offers": [*(offer(o) for o in OFFERS), late],
        "learning": {"traits": list(TRAITS), "features": DEFAULT_SPEC_DATA},
    }


class Feed:
    """The Segment calls of each moment, and each customer's context as the worker will
    have it once they are applied (built by :func:`rtim.context.model.apply_event`)."""

    def __init__(self, seed: int) -> None:
        self.prefix = f"market-{seed}"
        self.contexts: dict[str, Context] = {}
        self._offset = itertools.count()

    @staticmethod
    def moment_id(prefix: str, i: int) -> str:
        return f"{prefix}-{i}"

    def calls(self, i: int, m: Moment) -> list[dict[str, Any]]:
        """The calls of moment ``i``, in order; the last one names the moment."""
        c = m.customer
        ids = (f"{self.prefix}-{i}.{k}" for k in itertools.count())
        out: list[dict[str, Any]] = []
        ctx = self.contexts.get(c.id)

        def call(kind: str, ts: int, **fields: Any) -> None:
            obj = {"type": kind, "messageId": next(ids), "userId": c.id, "timestamp": ts}
            obj.update(fields)
            self._apply(ctx, obj)
            out.append(obj)

        def track(name: str, properties: dict[str, Any], ts: int = m.at_ms - 1) -> None:
            call("track", ts, event=name, properties=properties, channel=m.channel)

        if ctx is None:
            ctx = self.contexts[c.id] = new_context(c.id)
            seen = c.first_ms
            call("identify", seen, traits={"plan": c.plan, "segment": c.segment}, channel=c.channel)
            for k in range(c.orders):
                track("Order Completed", {"order_id": f"{c.id}-o{k}", "total": 40.0}, seen)
        items = m.ctx["cart"]["items"]
        if ctx["cart"]["items"] != items:
            for pid, (quantity, _) in list(ctx["cart"]["items"].items()):
                track("Product Removed", {"product_id": pid, "quantity": quantity})
            for pid, (quantity, price) in items.items():
                track("Product Added", {"product_id": pid, "quantity": quantity, "price": price})
        if m.ctx["issues"] > ctx["issues"]:
            track("Support Ticket Opened", {"ticket_id": f"{c.id}-t{i}"})
        elif m.ctx["issues"] < ctx["issues"]:
            track("Support Ticket Resolved", {"ticket_id": f"{c.id}-t{i}"})
        pages = m.ctx["pages"]
        for path in [pages[0]] * (PAGES_SEEN - len(pages)) + pages:
            call("page", m.at_ms - 1, properties={"path": path}, channel=m.channel)
        # Interests: down in steps of 1, then up in steps of 0.5, from their values now
        # (the context model decays them at the first call of the moment, not again
        # within a minute).
        target = m.ctx["affinity"]
        down = [
            {"product_id": f"{cat}-x", "category": cat}
            for cat in CATEGORIES
            for _ in range(math.ceil(ctx["affinity"].get(cat, 0.0) - target.get(cat, 0.0) - 0.25))
        ]
        if down:
            track("Product Removed", {"products": down})
        up = [
            {"product_id": f"{cat}-v", "category": cat}
            for cat in CATEGORIES
            for _ in range(round((target.get(cat, 0.0) - ctx["affinity"].get(cat, 0.0)) / 0.5))
        ]
        if up:
            track("Product List Viewed", {"products": up})
        call(
            "track",
            m.at_ms,
            messageId=self.moment_id(self.prefix, i),
            event=MOMENT_EVENT,
            properties={"moment": m.trigger},
            channel=m.channel,
        )
        return out

    def _apply(self, ctx: Context | None, obj: dict[str, Any]) -> None:
        assert ctx is not None
        event = parse_event(orjson.dumps(obj), now_ms=obj["timestamp"])
        apply_event(ctx, event, 0, next(self._offset), traits=TRAITS)


class Scoreboard:
    """The offline run's measures (:func:`rtim.learn.evaluate.run`) of decisions made
    elsewhere: RTIM's expected value, the oracle's, random's, context-free's, on the
    same moments."""

    def __init__(self, decisions: int, block: int = 1000) -> None:
        self.decisions = decisions
        self.launch = decisions // 2
        self.block = block
        self.rtim = self.oracle = self.random = 0.0
        self.per_offer: dict[str, list[float]] = {}  # offer -> [ev first half, second half]
        self._block = [0.0, 0.0]
        self.curve: list[float] = []
        self.quarter = max(1, (decisions - self.launch) // 4)
        self.new_best = [0] * 4
        self.new_taken = [0] * 4
        self.scored = 0

    def offers(self, i: int) -> tuple[Offer, ...]:
        """The offers of moment ``i``: the new one from half way."""
        return OFFERS if i < self.launch else (*OFFERS, LATE_OFFER)

    def score(self, i: int, m: Moment, chosen: str) -> float:
        """Count moment ``i``'s decision; the true conversion probability of the offer."""
        offers = self.offers(i)
        evs = {o.id: _sigmoid(true_logit(o.id, m)) * o.value for o in offers}
        if chosen not in evs:
            raise EvaluationError(f"moment {i}: the worker chose {chosen!r}, not a candidate")
        ev = evs[chosen]
        best_id = max(evs, key=evs.__getitem__)
        best = evs[best_id]
        self.rtim += ev
        self.oracle += best
        self.random += sum(evs.values()) / len(evs)
        half = 0 if i < self.launch else 1
        for offer_id, value in evs.items():
            self.per_offer.setdefault(offer_id, [0.0, 0.0])[half] += value
        self._block[0] += ev
        self._block[1] += best
        self.scored += 1
        if self.scored % self.block == 0:
            self.curve.append(self._block[0] / self._block[1])
            self._block = [0.0, 0.0]
        if i >= self.launch and best_id == NEW_OFFER:
            q = min(3, (i - self.launch) // self.quarter)
            self.new_best[q] += 1
            self.new_taken[q] += chosen == NEW_OFFER
        return ev / next(o.value for o in offers if o.id == chosen)

    def result(self, seed: int, joins: dict[str, int]) -> RunResult:
        context_free = max(v[0] for v in self.per_offer.values()) + max(
            v[1] for v in self.per_offer.values()
        )
        return RunResult(
            seed=seed,
            decisions=self.scored,
            rtim=self.rtim,
            oracle=self.oracle,
            random=self.random,
            context_free=context_free,
            curve=self.curve,
            new_offer_share=[
                t / b if b else 0.0 for t, b in zip(self.new_taken, self.new_best, strict=True)
            ],
            new_offer_best_share=sum(self.new_best) / max(1, self.decisions - self.launch),
            joins=joins,
            examples=joins["positive"] + joins["negative"],
            positives=joins["positive"],
        )


def joins_of(metrics: dict[str, float]) -> dict[str, int]:
    """The join's counts as the offline run names them, from a worker's metrics."""
    counts = dict.fromkeys((*JOIN_RESULTS, "positive", "negative", "evicted"), 0)
    for key, value in metrics.items():
        if key.startswith("rtim_responses_total{"):
            result = key.split('result="', 1)[1].split('"', 1)[0]
            counts[result] += int(value)
        elif key.startswith("rtim_training_examples_total{"):
            label = key.split('label="', 1)[1].split('"', 1)[0]
            counts[label] += int(value)
            if 'why="evicted"' in key:
                counts["evicted"] += int(value)
    return counts


def run_seed(
    seed: int,
    decisions: int,
    *,
    wave: int = WAVE,
    workdir: Path | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> WorkerRun:
    """One seed's market through a fresh broker and worker, stopped at the end (also on
    Ctrl-C, SIGTERM or SIGHUP, which end it with KeyboardInterrupt)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rtim-eval-")))
        try:
            return asyncio.run(_run_seed(seed, decisions, wave, workdir, echo))
        except asyncio.CancelledError:  # by a signal (on_signals, in _run_seed)
            raise KeyboardInterrupt from None


async def _run_seed(
    seed: int, decisions: int, wave: int, workdir: Path, echo: Callable[[str], None]
) -> WorkerRun:
    started = time.monotonic()
    load_settings()  # RTIM_* of the environment reach the worker too: check them first
    # The broker first, while this process has no other thread: only then does the
    # kernel end it with this process (rtim.broker).
    task = asyncio.current_task()
    assert task is not None
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker, on_signals(task.cancel):
        market = Market(seed)
        moments = [market.moment() for _ in range(decisions)]
        catalog = workdir / "market-catalog.yaml"
        launch_ms = moments[decisions // 2].at_ms
        catalog.write_text(yaml.safe_dump(market_catalog(launch_ms), sort_keys=False))
        settings = load_settings(broker=broker.bootstrap, catalog=catalog)
        await create_topics(broker.bootstrap, topic_specs(settings))
        worker = WorkerProcess(
            broker=broker.bootstrap,
            datadir=workdir / "worker-data",
            store="memory",
            log_path=workdir / "worker.log",
            env={
                **WORKER_ENV,
                "RTIM_CATALOG": str(catalog),
                "RTIM_PARTITIONS": str(settings.partitions),
            },
        )
        worker.start()  # from the main thread, which outlives it
        try:
            await _ready(worker)
            echo(f"seed {seed}: worker ready; {decisions:,} moments in waves of {wave}")
            market_started = time.monotonic()
            result = await _play(settings, worker, seed, moments, wave, Scoreboard(decisions), echo)
            market_s = time.monotonic() - market_started
        finally:
            worker.stop(timeout=10)
    return WorkerRun(result, time.monotonic() - started, market_s)


async def _ready(worker: WorkerProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while await asyncio.to_thread(worker.status, "/health/ready", 1.0) != 200:
        _check_alive(worker)
        if time.monotonic() > deadline:
            raise EvaluationError(f"the worker was not ready after {READY_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.1)


def _check_alive(worker: WorkerProcess) -> None:
    if not worker.alive:
        raise WorkerError(f"the worker exited; the end of its log:\n{worker.log_tail()}")


async def _play(
    settings: Settings,
    worker: WorkerProcess,
    seed: int,
    moments: list[Moment],
    wave: int,
    board: Scoreboard,
    echo: Callable[[str], None],
) -> RunResult:
    client = KafkaConnection.parse(settings.broker).client_config()
    producer = AIOKafkaProducer(**client, linger_ms=5, max_request_size=4 * 1024 * 1024)
    decisions = AIOKafkaConsumer(**client, enable_auto_commit=False, fetch_max_wait_ms=20)
    await producer.start()
    await decisions.start()
    try:
        decisions.assign([TopicPartition(DECISIONS_TOPIC, p) for p in range(settings.partitions)])
        await decisions.seek_to_beginning()
        feed = Feed(seed)
        # The offline run's stream of responses for this seed.
        response_rng = random.Random(seed * 7919 + 1)
        # Heap of (arrival, seq, window end of its decision, key, value).
        inbox: list[tuple[int, int, int, bytes, bytes]] = []
        seq = itertools.count()
        times = [m.at_ms for m in moments]
        sent = 0
        start = 0
        while start < len(moments):
            # Responses the market's clock has reached, taken in before the wave's events.
            due = []
            while inbox and inbox[0][0] <= times[start]:
                due.append(heapq.heappop(inbox))
            if due:
                await _send(producer, RESPONSES_TOPIC, [(k, v) for *_, k, v in due])
                sent += len(due)
            await _until(worker, _caught_up(sent), "the responses and the models")
            end = _wave_end(times, start, wave, inbox)
            block = moments[start:end]
            calls = [c for i, m in enumerate(block, start) for c in feed.calls(i, m)]
            await _send(
                producer,
                CLICKSTREAM_TOPIC,
                [(c["userId"].encode(), orjson.dumps(c)) for c in calls],
            )
            wanted = {Feed.moment_id(feed.prefix, i): i for i in range(start, end)}
            made = await _decisions(decisions, worker, wanted)
            for i, m in enumerate(block, start):
                decision_id, offer_id = made[i]
                p = board.score(i, m, offer_id)
                for ts, r in _responses(response_rng, decision_id, m.customer.id, m.at_ms, p):
                    body = {
                        "decision_id": r.decision_id,
                        "customer_id": r.customer_id,
                        "outcome": r.outcome,
                        "timestamp": iso_ms(r.timestamp_ms),
                    }
                    key = r.customer_id.encode()
                    entry = (ts, next(seq), m.at_ms + WINDOW_MS, key, orjson.dumps(body))
                    heapq.heappush(inbox, entry)
            if end // 1000 > start // 1000:
                echo(f"seed {seed}: {end:,} decisions")
            start = end
        # Every batch of the worker counted in its metrics (those of the last decisions too).
        final = await _until(
            worker, _at_least(_DECISIONS_OFFERED, len(moments)), "the last decisions' metrics"
        )
    finally:
        await decisions.stop()
        await producer.stop()
    return board.result(seed, joins_of(final))


def _wave_end(
    times: list[int], start: int, wave: int, inbox: list[tuple[int, int, int, bytes, bytes]]
) -> int:
    """Where the wave starting at ``start`` ends: after ``wave`` moments, or before the
    first moment at or after the end of a window that a response still to come (stamped
    before that end) belongs to, so that the response is sent before the window closes."""
    end = min(start + wave, len(times))
    closing = min((e for ts, _, e, _, _ in inbox if ts < e), default=None)
    if closing is not None:
        end = max(start + 1, min(end, bisect.bisect_left(times, closing, start)))
    return end


async def _send(producer: AIOKafkaProducer, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    futures = [await producer.send(topic, v, key=k) for k, v in items]
    await asyncio.gather(*futures)


def _at_least(sample: str, n: float) -> Callable[[dict[str, float]], bool]:
    return lambda metrics: metrics.get(sample, 0.0) >= n


def _caught_up(responses: int) -> Callable[[dict[str, float]], bool]:
    """The worker has taken in ``responses`` responses, and the models it decides with
    have learned every example it wrote (both counts come from the same batches)."""

    def done(metrics: dict[str, float]) -> bool:
        written = learned = pooled = 0.0
        for key, value in metrics.items():
            if key.startswith(_EXAMPLES_WRITTEN):
                written += value
            elif key == _POOLED_VERSION:
                pooled = value  # (it learns every example too: counted apart)
            elif key.startswith(_MODEL_VERSION):
                learned += value
        return (
            metrics.get(_RESPONSES_CONSUMED, 0.0) >= responses
            and learned >= written
            and pooled >= written
        )

    return done


async def _until(
    worker: WorkerProcess, done: Callable[[dict[str, float]], bool], what: str
) -> dict[str, float]:
    """Poll the worker's metrics until ``done`` holds; the metrics then."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while True:
        metrics = await asyncio.to_thread(worker.metrics)
        if done(metrics):
            return metrics
        _check_alive(worker)
        if time.monotonic() > deadline:
            raise EvaluationError(
                f"the worker did not take in {what} within {WAIT_TIMEOUT_S:.0f} s; "
                f"the end of its log:\n{worker.log_tail()}"
            )
        await asyncio.sleep(0.02)


async def _decisions(
    consumer: AIOKafkaConsumer, worker: WorkerProcess, wanted: dict[str, int]
) -> dict[int, tuple[str, str]]:
    """The worker's decisions of the wanted moments (by message id): moment ->
    (decision id, offer id)."""
    made: dict[int, tuple[str, str]] = {}
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while len(made) < len(wanted):
        for records in (await consumer.getmany(timeout_ms=200)).values():
            for record in records:
                d = orjson.loads(record.value)
                i = wanted.get(d.get("message_id"))
                if i is not None:
                    made[i] = (d["decision_id"], d["offer_id"])
        _check_alive(worker)
        if time.monotonic() > deadline:
            missing = sorted(set(wanted.values()) - set(made))
            raise EvaluationError(
                f"no decision for {len(missing)} moments (first: {missing[:5]}) within "
                f"{WAIT_TIMEOUT_S:.0f} s; the end of the worker's log:\n{worker.log_tail()}"
            )
    return made


def format_timing(summary: dict[str, Any]) -> str:
    """The worker mode's lines after the offline summary: wall time and pace per seed."""
    return "\n".join(
        f"seed {r['seed']}: through the worker in {r['wall_s']:.1f} s wall time "
        f"(start and stop included), {r['decisions_per_s']:,.0f} decisions/s"
        for r in summary["runs"]
    )
