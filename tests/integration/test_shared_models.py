"""Shared models on the embedded broker: training examples learned by the worker that owns
their partition, every worker showing every model, and a worker killed and replaced
resuming from the snapshots with each example learned exactly once."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

from click.testing import CliRunner

from rtim.cli import main
from rtim.learn.attribution import Example, encode_example
from rtim.names import MODELS_TOPIC, TRAINING_TOPIC
from rtim.stream.process import WorkerProcess

from .support import produce, read_topic


def examples(offer: str, first: int, n: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of ``n`` training records of an offer; every fourth one converted."""
    return [
        (
            offer.encode(),
            encode_example(
                Example(
                    f"{offer}-{i}",
                    offer,
                    ["moment.channel=web", f"n~{i % 3}"],
                    i % 4 == 0,
                    i,
                    "window",
                )
            ),
        )
        for i in range(first, first + n)
    ]


def positives(first: int, n: int) -> int:
    return sum(1 for i in range(first, first + n) if i % 4 == 0)


def view(worker: WorkerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(worker.url + "/v1/models", timeout=5) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def models(worker: WorkerProcess) -> dict[str, dict[str, Any]]:
    return {row["offer"]: row for row in view(worker)["models"]}


def wait_models(
    worker: WorkerProcess, want: dict[str, tuple[int, int]], timeout: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Poll /v1/models until every offer shows these (examples, positives)."""
    deadline = time.monotonic() + timeout
    while True:
        got = models(worker)
        seen = {offer: (row["examples"], row["positives"]) for offer, row in got.items()}
        if seen == want:
            return got
        if not worker.alive or time.monotonic() > deadline:
            raise AssertionError(f"models {seen}, expected {want}:\n{worker.log_tail(30)}")
        time.sleep(0.2)


def test_a_killed_learner_is_replaced_without_learning_anything_twice_or_losing_any(
    kafka, workers
) -> None:
    first = workers("w1").wait_ready()
    batch = [*examples("free-shipping", 0, 40), *examples("gold-upgrade", 0, 30)]
    batch += batch[:5]  # published again by a customer's worker after a crash
    batch += [(b"free-shipping", b"not json"), (b"gold-upgrade", b'{"format": 1}')]
    asyncio.run(produce(kafka.bootstrap, batch, TRAINING_TOPIC))

    got = wait_models(first, {"free-shipping": (40, positives(0, 40)), "gold-upgrade": (30, 8)})
    row = got["free-shipping"]
    assert row["learner"] is True and row["version"] == 40 and row["recent"] == 40
    assert row["observed"] == positives(0, 40) / 40
    assert 0 < row["predicted"] < 1 and 0 <= row["age_s"] < 30
    samples = first.metrics()
    assert samples['rtim_examples_learned_total{result="learned"}'] == 70
    assert samples['rtim_examples_learned_total{result="duplicate"}'] == 5
    assert samples['rtim_examples_learned_total{result="invalid"}'] == 2
    assert samples['rtim_model_version{offer="free-shipping"}'] == 40
    assert samples["rtim_model_snapshots_published_total"] >= 2

    first.kill()  # no snapshot at shutdown: what it published is all there is
    more = [*examples("free-shipping", 40, 20), *examples("shoes-10", 0, 10)]
    more += batch[:3]  # earlier decisions, published again
    asyncio.run(produce(kafka.bootstrap, more, TRAINING_TOPIC))

    second = workers("w2").wait_ready()
    wait_models(
        second,
        {
            "free-shipping": (60, positives(0, 60)),
            "gold-upgrade": (30, 8),
            "shoes-10": (10, positives(0, 10)),
        },
    )
    assert view(second)["loaded"] is True  # it read every snapshot there was at its start
    samples = second.metrics()
    # Only what came after: nothing the first one learned was learned again.
    assert samples['rtim_examples_learned_total{result="learned"}'] == 30
    assert samples['rtim_examples_learned_total{result="duplicate"}'] == 3

    # rtim models reads the same from the broker.
    result = CliRunner().invoke(main, ["models", "--broker", kafka.bootstrap, "--json"])
    assert result.exit_code == 0, result.output
    printed = {row["offer"]: (row["examples"], row["version"]) for row in json.loads(result.output)}
    assert printed == {"free-shipping": (60, 60), "gold-upgrade": (30, 30), "shoes-10": (10, 10)}
    table = CliRunner().invoke(main, ["models", "--broker", kafka.bootstrap])
    assert table.exit_code == 0, table.output
    assert [line.split()[0] for line in table.output.splitlines()[1:]] == sorted(printed)


def learned(*workers: WorkerProcess) -> float:
    return sum(w.metric("rtim_examples_learned_total", result="learned") for w in workers)


def poll(condition: Any, timeout: float, what: str, *workers: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(w.log_tail(20) for w in workers)
            raise AssertionError(f"not within {timeout} s: {what}\n{tails}")
        time.sleep(0.2)


#: Offers whose keys fall on every training partition (0, 1, 1, 2, 3 of 4).
OFFERS = ["free-shipping", "gold-upgrade", "shoes-10", "app-welcome", "callback"]


def test_workers_share_the_learning_and_hand_it_over_at_rebalance_and_stop(kafka, workers) -> None:
    # No snapshot on the interval within this test: only a revocation or a stop publishes.
    slow = {"RTIM_MODEL_SNAPSHOT_INTERVAL_S": "600"}
    one = workers("w1", env=slow).wait_ready()
    first = [rec for i, offer in enumerate(OFFERS) for rec in examples(offer, 0, 10 + i)]
    asyncio.run(produce(kafka.bootstrap, first, TRAINING_TOPIC))
    poll(lambda: learned(one) == len(first), 30, "the first worker learned", one)
    assert models(one) == {}  # learned, not published yet

    two = workers("w2", env=slow).wait_ready()  # the group rebalances: w1 publishes
    want = {offer: (10 + i, positives(0, 10 + i)) for i, offer in enumerate(OFFERS)}
    for worker in (one, two):
        wait_models(worker, want)
    second = [rec for offer in OFFERS for rec in examples(offer, 100, 5)]
    asyncio.run(produce(kafka.bootstrap, second, TRAINING_TOPIC))
    poll(lambda: learned(one, two) == len(first) + len(second), 30, "learned", one, two)
    learners = [{o for o, row in models(w).items() if row["learner"]} for w in (one, two)]
    # The offers' keys fall on every partition: each worker learns some of them.
    assert learners[0] and learners[1] and not learners[0] & learners[1], learners

    counts = learned(one), learned(two)
    assert two.stop() == 0  # publishes what it learned; w1 takes its partitions over
    for i, offer in enumerate(OFFERS):
        want[offer] = (15 + i, positives(0, 10 + i) + positives(100, 5))
    wait_models(one, want)
    third = [rec for offer in OFFERS for rec in examples(offer, 200, 1)]
    asyncio.run(produce(kafka.bootstrap, third, TRAINING_TOPIC))
    poll(lambda: learned(one) >= counts[0] + len(third), 30, "the third batch learned", one)
    # w1 read w2's partitions from where w2's snapshots ended: nothing learned twice.
    assert learned(one) == counts[0] + len(third)
    assert all(row["learner"] for row in models(one).values())
    # Each offer's snapshots come from one learner at a time: their versions only go up.
    versions: dict[bytes, list[int]] = {}
    for rec in asyncio.run(read_topic(kafka.bootstrap, MODELS_TOPIC)):
        if not rec.key.startswith(b"__cursor__."):
            versions.setdefault(rec.key, []).append(json.loads(rec.value)["version"])
    for offer, seen in versions.items():
        assert seen == sorted(set(seen)), (offer, seen)
