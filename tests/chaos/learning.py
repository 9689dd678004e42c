"""Chaos runs of the learning loop, by hand (minutes each, not part of the suite):

    python -m tests.chaos.learning models [SEED] [SECONDS]
    python -m tests.chaos.learning loop [SEED] [EVENTS]

Two workers on an embedded broker, one of them SIGKILLed or stopped every 2-7 s and
started again while records flow. ``models``: training records for six offers (a
twentieth of them sent again, as a worker's replay after a crash sends them); at the end
every offer's model, on both workers, must have learned each distinct decision exactly
once. ``loop``: simulated events through the whole loop, then an event per partition
eight days on that closes every attribution window; every decision with an offer must be
on rtim.training under its offer and under the pooled model, and learned once by each, on
both workers. Each prints what it counted and OK or MISMATCH (exit 1).
Results so far: docs/architecture.md, "A group whose leader leaves in a rebalance".
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import orjson
from aiokafka.partitioner import DefaultPartitioner

from rtim.broker import EmbeddedBroker
from rtim.learn.attribution import Example, encode_example
from rtim.learn.models import POOLED
from rtim.names import DECISIONS_TOPIC, TRAINING_TOPIC
from rtim.settings import Settings
from rtim.simulate import JourneySimulator, past_start_ms
from rtim.stream.process import WorkerProcess
from rtim.stream.topics import create_topics, topic_specs
from tests.integration.support import PARTITIONS, TEST_ENV, produce, read_topic
from tests.integration.test_shared_models import models

OFFERS = ["free-shipping", "gold-upgrade", "shoes-10", "app-welcome", "callback", "bundle"]
#: Seconds the models get to take everything in once the records stop.
SETTLE_S = 300.0


def examples_seen(worker: WorkerProcess) -> dict[str, int]:
    """Each offer's examples as the worker's GET /v1/models shows them."""
    return {offer: row["examples"] for offer, row in models(worker).items()}


async def chaos(
    rng: random.Random,
    make: Callable[[str], WorkerProcess],
    workers: dict[str, WorkerProcess],
    load: asyncio.Task[int],
) -> int:
    """Kill or stop a worker every 2-7 s and start it again, until ``load`` is done."""
    done = 0
    while not load.done():
        await asyncio.sleep(rng.uniform(2, 7))
        name = rng.choice(sorted(workers))
        if rng.random() < 2 / 3:
            workers[name].kill()
            how = "SIGKILL"
        else:
            await asyncio.to_thread(workers[name].stop, 15)
            how = "stop"
        done += 1
        await asyncio.sleep(rng.uniform(0, 2))
        workers[name] = make(name)
        print(f"{how} {name}", flush=True)
    await load
    for worker in workers.values():
        await asyncio.to_thread(worker.wait_ready, 120)
    return done


async def settle(workers: dict[str, WorkerProcess], want: Callable[[dict[str, int]], bool]):
    """Every worker's models once they show what is wanted or stop moving (SETTLE_S)."""
    deadline, last, still = time.monotonic() + SETTLE_S, None, 0
    while True:
        seen = {name: examples_seen(w) for name, w in sorted(workers.items())}
        if all(want(s) for s in seen.values()) or time.monotonic() > deadline or still >= 10:
            return seen
        still = still + 1 if seen == last else 0
        last = seen
        await asyncio.sleep(2)


def training_records(
    rng: random.Random, seconds: float
) -> tuple[list[tuple[bytes, bytes]], dict[str, int]]:
    """About 400 records a second for ``seconds``; and the distinct decisions per offer."""
    records, sent, recent = [], {o: set() for o in OFFERS}, {o: [] for o in OFFERS}
    for i in range(int(400 * seconds)):
        offer = rng.choice(OFFERS)
        if recent[offer] and rng.random() < 0.05:
            decision = rng.choice(recent[offer][-200:])  # a recent one, published again
        else:
            decision = f"{offer}-{i}"
            sent[offer].add(decision)
            recent[offer].append(decision)
        example = Example(
            decision, offer, ["moment.channel=web", f"n~{i % 5}"], i % 4 == 0, i, "window"
        )
        records.append((offer.encode(), encode_example(example)))
    return records, {o: len(s) for o, s in sent.items()}


def closing_events(last_iso: str) -> list[tuple[bytes, bytes]]:
    """One event per clickstream partition eight days after ``last_iso``."""
    at = datetime.fromisoformat(last_iso.replace("Z", "+00:00")) + timedelta(days=8)
    stamp = at.isoformat().replace("+00:00", "Z")
    partitioner, out, covered, i = DefaultPartitioner(), [], set(), 0
    while len(covered) < PARTITIONS:
        customer = f"closer-{i}"
        i += 1
        partition = partitioner(customer.encode(), list(range(PARTITIONS)), list(range(PARTITIONS)))
        if partition not in covered:
            covered.add(partition)
            event = {
                "type": "track",
                "event": "Page Viewed",
                "messageId": f"close-{customer}",
                "userId": customer,
                "timestamp": stamp,
                "properties": {},
                "context": {},
            }
            out.append((customer.encode(), orjson.dumps(event)))
    return out


async def run(scenario: str, seed: int, size: float) -> bool:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix=f"rtim-chaos-{scenario}-"))
    env = {**TEST_ENV, "RTIM_ATTRIBUTION_WINDOW_S": "900", "RTIM_MODEL_SNAPSHOT_INTERVAL_S": "0.5"}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        bootstrap = broker.bootstrap
        await create_topics(
            bootstrap, topic_specs(Settings(broker=bootstrap, partitions=PARTITIONS))
        )

        def make(name: str) -> WorkerProcess:
            return WorkerProcess(
                broker=bootstrap,
                datadir=workdir / f"{name}-data",
                log_path=workdir / f"{name}.log",
                env=env,
            ).start()

        workers = {"w1": make("w1"), "w2": make("w2")}
        for worker in workers.values():
            await asyncio.to_thread(worker.wait_ready, 120)
        try:
            if scenario == "models":
                records, want = training_records(rng, size)
                load = asyncio.create_task(produce(bootstrap, records, TRAINING_TOPIC, rate=400))
                kills = await chaos(rng, make, workers, load)
                seen = await settle(workers, lambda s: s == want)
                ok = all(s == want for s in seen.values())
                print(f"{kills} kills or stops; distinct decisions sent {want}; seen {seen}")
            else:
                sim = JourneySimulator(customers=2000, seed=seed, start_ms=past_start_ms(30))
                events = list(sim.events(int(size)))
                items = [
                    ((e.get("userId") or e.get("anonymousId")).encode(), orjson.dumps(e))
                    for e in events
                ]
                load = asyncio.create_task(produce(bootstrap, items, rate=1500))
                kills = await chaos(rng, make, workers, load)
                last = max(e["timestamp"] for e in events)
                await produce(bootstrap, closing_events(last))
                seen = await settle(workers, lambda s: False)  # until they stop moving
                decided = [
                    orjson.loads(r.value)
                    for r in await read_topic(bootstrap, DECISIONS_TOPIC, timeout=60)
                ]
                offered = {d["decision_id"] for d in decided if d["offer_id"] is not None}
                training = [
                    orjson.loads(r.value)
                    for r in await read_topic(bootstrap, TRAINING_TOPIC, timeout=60)
                ]
                # A replayed batch may publish a record again (the learners skip it): the
                # decisions under the offers' keys and under the pooled model's are compared.
                ids = {e["decision_id"] for e in training if e["offer_id"] != POOLED}
                pooled = {e["decision_id"] for e in training if e["offer_id"] == POOLED}
                ok = ids == pooled == offered and all(
                    s.get(POOLED) == len(offered) == sum(v for o, v in s.items() if o != POOLED)
                    for s in seen.values()
                )
                print(
                    f"{kills} kills or stops; {len(events):,} events, {len(decided):,} decision "
                    f"records, {len(offered):,} with an offer; training records {len(training):,} "
                    f"({len(ids):,} decisions); examples seen {seen}"
                )
        finally:
            for worker in workers.values():
                worker.stop(15)
    print("OK" if ok else f"MISMATCH (logs in {workdir})")
    return ok


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "models"
    if what not in ("models", "loop"):
        sys.exit(__doc__)
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    size = float(sys.argv[3]) if len(sys.argv) > 3 else (60 if what == "models" else 60_000)
    sys.exit(0 if asyncio.run(run(what, seed, size)) else 1)
