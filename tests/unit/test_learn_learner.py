"""The learner: every training example learned once across crashes and take-overs,
duplicates and bad records, snapshots that rebuild the same model, the newest kept."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from rtim.learn import learner as learner_module
from rtim.learn import models as models_module
from rtim.learn.attribution import Example, encode_example, training_records
from rtim.learn.learner import (
    Flush,
    Learner,
    ModelBoard,
    OfferState,
    cursor_record,
    summary,
)
from rtim.learn.models import LATE_AFTER, POOLED, ModelParams, ModelSet, OfferModel

FEATURES = ["moment.channel=web", "cart.value~7", "traits.plan=gold", "page=/shoes", "hour~3"]
#: Training partitions and the offers keyed to them.
OFFERS = {0: ["free-shipping", "gold-upgrade"], 1: ["shoes-10"]}


def example(offer: str, decision: str, rng: random.Random) -> bytes:
    features = rng.sample(FEATURES, 3)
    return encode_example(Example(decision, offer, features, rng.random() < 0.3, 1, "window"))


def training(n: int, seed: int = 1) -> dict[int, list[bytes | None]]:
    """Per partition, the values of a training topic: mostly new decisions, some
    published twice, a few invalid records, and an offer whose first example comes late."""
    rng = random.Random(seed)
    topic: dict[int, list[bytes | None]] = {0: [], 1: []}
    for i in range(n):
        partition = rng.choice([0, 0, 1])
        offers = OFFERS[partition][:1] if i < n // 2 else OFFERS[partition]
        value: bytes | None = example(rng.choice(offers), f"d{i}", rng)
        if i % 17 == 5:
            value = rng.choice([b"not json", b'{"format": 1}', None])
        topic[partition].append(value)
        if i % 11 == 3 and value is not None:
            topic[partition].append(value)  # a customer's worker published it again
    return topic


class Kafka:
    """The models topic as a log, and the learner's read of the training topic."""

    def __init__(self, topic: dict[int, list[bytes | None]]) -> None:
        self.training = topic
        self.models: list[tuple[bytes, bytes]] = []

    def board(self) -> ModelBoard:
        board = ModelBoard()
        for key, value in self.models:
            board.add(key, value)
        return board

    def start(self) -> tuple[Learner, dict[int, int]]:
        """A learner given every partition, resumed from the models topic."""
        learner = Learner(clock_ms=lambda: 1_000)
        board = self.board()
        return learner, {p: learner.assign(p, board) for p in self.training}

    def learn(self, learner: Learner, read: dict[int, int], fraction: float = 1.0) -> None:
        """Read each partition from ``read`` up to ``fraction`` of its records."""
        for partition, values in self.training.items():
            end = int(len(values) * fraction)
            for offset in range(read[partition], end):
                learner.learn(partition, offset, values[offset])
            read[partition] = max(read[partition], end)

    def publish(self, flush: Flush, *, snapshots: int | None = None, cursors: bool = True) -> None:
        """Publish the flush, or a crash's part of it: the first ``snapshots`` and no
        cursor."""
        for snap in flush.snapshots[:snapshots]:
            self.models.append((snap["offer"].encode(), orjson.dumps(snap)))
        if cursors and snapshots is None:
            self.models.extend(cursor_record(p, o) for p, o in flush.cursors.items())


def final_models(kafka: Kafka) -> dict[str, dict[str, Any]]:
    return {
        offer: {k: v for k, v in snap.items() if k != "made_ms"}
        for offer, snap in kafka.board().snapshots.items()
    }


def distinct_decisions(topic: dict[int, list[bytes | None]]) -> dict[str, int]:
    seen: dict[str, set[str]] = {}
    for values in topic.values():
        for value in values:
            try:
                data = orjson.loads(value)  # type: ignore[arg-type]
                seen.setdefault(data["offer_id"], set()).add(data["decision_id"])
            except (TypeError, KeyError, orjson.JSONDecodeError):
                pass
    return {offer: len(ids) for offer, ids in seen.items()}


def clean_run(topic: dict[int, list[bytes | None]]) -> Kafka:
    kafka = Kafka(topic)
    learner, read = kafka.start()
    kafka.learn(learner, read)
    kafka.publish(learner.flush())
    return kafka


@pytest.mark.parametrize(
    ("crash", "snapshots", "cursors"),
    [
        ("before anything of the second flush is published", 0, False),
        ("between one offer's snapshot and the next's", 1, False),
        ("after the snapshots, before the cursors", None, False),
        ("after the cursors", None, True),
    ],
)
def test_a_learner_resumed_after_a_crash_learns_every_example_once(
    crash: str, snapshots: int | None, cursors: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fewer remembered decisions than examples read again: the marks, not the
    # duplicate check, must keep them from being learned twice.
    monkeypatch.setattr(learner_module, "REMEMBERED_DECISIONS", 5)
    topic = training(600)
    kafka = Kafka(topic)
    first, read = kafka.start()
    kafka.learn(first, read, 0.4)
    kafka.publish(first.flush())  # a checkpoint: snapshots and cursors
    kafka.learn(first, read, 0.7)
    kafka.publish(first.flush(), snapshots=snapshots, cursors=cursors)
    # The worker dies here; another one takes every partition over.
    second, read = kafka.start()
    kafka.learn(second, read)
    kafka.publish(second.flush())

    got = final_models(kafka)
    assert {offer: m["examples"] for offer, m in got.items()} == distinct_decisions(topic), crash
    # Not only the counts: the very same models as one learner that never stopped.
    assert got == final_models(clean_run(topic)), crash


def test_an_offer_without_a_snapshot_is_learned_from_the_cursor_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(learner_module, "REMEMBERED_DECISIONS", 5)
    topic = training(300)
    kafka = Kafka(topic)
    first, read = kafka.start()
    kafka.learn(first, read, 0.3)  # only the first offer of each partition so far
    kafka.publish(first.flush())
    assert set(kafka.board().snapshots) == {"free-shipping", "shoes-10"}
    second, read = kafka.start()
    assert read == {p: len(topic[p][: int(len(topic[p]) * 0.3)]) for p in topic}
    kafka.learn(second, read)
    kafka.publish(second.flush())
    assert final_models(kafka) == final_models(clean_run(topic))


def test_the_same_decision_published_twice_is_learned_once_even_across_a_take_over() -> None:
    ex = encode_example(Example("d1", "o", ["a=1"], True, 1, "conversion"))
    other = encode_example(Example("d2", "o", ["a=1"], False, 2, "window"))
    kafka = Kafka({0: [ex, other, ex]})
    learner, read = kafka.start()
    kafka.learn(learner, read)
    assert learner.counts == {"learned": 2, "duplicate": 1, "invalid": 0}
    kafka.publish(learner.flush())
    kafka.training[0].append(ex)  # published again after the snapshot
    second, read = kafka.start()
    assert read == {0: 3}
    kafka.learn(second, read)
    assert second.counts == {"learned": 0, "duplicate": 1, "invalid": 0}
    kafka.publish(second.flush())
    snap = kafka.board().snapshots["o"]
    assert (snap["examples"], snap["positives"]) == (2, 1)


def test_invalid_records_are_counted_and_skipped() -> None:
    good = encode_example(Example("d1", "o", ["a=1"], True, 1, "conversion"))
    bad: list[bytes | None] = [
        b"not json",
        b"[]",
        b'{"format": 1}',
        None,  # a tombstone
        b'{"format": 2, "decision_id": "d"}',
        encode_example(Example("d2", "", ["a=1"], True, 1, "conversion")),
    ]
    learner = Learner()
    learner.assign(0, ModelBoard())
    outcomes = [learner.learn(0, i, v) for i, v in enumerate([*bad, good])]
    assert [o.result for o in outcomes] == ["invalid"] * len(bad) + ["learned"]
    assert all(o.problem for o in outcomes[:-1])
    assert learner.counts == {"learned": 1, "duplicate": 0, "invalid": len(bad)}
    # The position moved past the bad records: a resumed learner does not read them again.
    assert learner.flush().cursors == {0: len(bad) + 1}


def test_records_of_partitions_not_assigned_or_read_before_are_ignored() -> None:
    ex = encode_example(Example("d1", "o", ["a=1"], True, 1, "conversion"))
    learner = Learner()
    assert learner.learn(0, 0, ex).result is None
    learner.assign(0, ModelBoard())
    assert learner.learn(0, 5, ex).result == "learned"
    assert learner.learn(0, 4, ex).result is None  # a stale fetch from before a seek
    learner.revoke([0])
    assert learner.learn(0, 6, ex).result is None
    assert learner.offers == {}


def test_a_model_rebuilt_from_its_snapshot_predicts_the_same() -> None:
    rng = random.Random(3)
    state = OfferState(OfferModel("o", ModelParams()))
    learner = Learner()
    learner.assign(0, ModelBoard())
    for i in range(300):
        learner.learn(0, i, example("o", f"d{i}", rng))
    state = learner.offers["o"]
    snap = orjson.loads(orjson.dumps(state.snapshot(123)))  # through JSON, as on the topic
    rebuilt = OfferState.from_snapshot(snap)
    for _ in range(50):
        features = rng.sample(FEATURES, 3)
        assert rebuilt.model.mean(features) == state.model.mean(features)
    assert rebuilt.snapshot(123) == state.snapshot(123)
    assert rebuilt.marks == {0: 300}
    assert len(rebuilt.seen) == 300


def test_predicted_is_the_models_mean_before_each_example() -> None:
    learner = Learner(ModelParams(prior_probability=0.2, prior_active=2))
    learner.assign(0, ModelBoard())
    fresh = OfferModel("o", learner.params).mean(["a"])
    learner.learn(0, 0, encode_example(Example("d1", "o", ["a"], True, 1, "conversion")))
    (snap,) = learner.flush().snapshots
    row = summary(snap, now_ms=snap["made_ms"] + 2500)
    assert row["predicted"] == pytest.approx(fresh, abs=1e-6)
    assert fresh == pytest.approx(0.2, abs=0.01)  # before: the prior, not what it learned
    assert (row["observed"], row["examples"], row["age_s"]) == (1.0, 1, 2.5)


def test_the_board_keeps_each_offers_newest_snapshot_and_the_last_cursor() -> None:
    model = OfferModel("o")
    snaps = []
    for i in range(3):
        model.learn(["a"], i == 1)
        snaps.append(orjson.dumps(OfferState(model).snapshot(i)))
    board = ModelBoard()
    assert board.add(b"o", snaps[1]) is not None
    assert board.add(b"o", snaps[0]) is None  # older, read later (another partition, no order)
    assert board.snapshots["o"]["version"] == 2
    assert board.add(b"o", snaps[2])["version"] == 3  # type: ignore[index]
    board.add(*cursor_record(0, 10))
    board.add(*cursor_record(0, 7))  # the learner's newest, in log order
    assert board.cursors == {0: 7}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"o", b"not json"),
        (b"o", b"[1]"),
        (b"o", b'{"format": 1, "offer": "o"}'),
        (b"p", orjson.dumps(OfferState(OfferModel("o")).snapshot(0))),  # under another key
        (b"__cursor__.1", b'{"format": 1, "partition": 0, "offset": 3}'),
        (b"__cursor__.0", b'{"format": 1, "partition": 0, "offset": -1}'),
    ],
)
def test_the_board_refuses_what_is_not_a_snapshot_or_a_cursor(key: bytes, value: bytes) -> None:
    board = ModelBoard()
    with pytest.raises(ValueError):
        board.add(key, value)
    assert (board.snapshots, board.cursors) == ({}, {})


def test_snapshots_and_cursors_match_the_topics_schema() -> None:
    schema = orjson.loads(
        (
            Path(__file__).parents[2] / "topics" / "schemas" / "model-snapshot.schema.json"
        ).read_bytes()
    )
    jsonschema.Draft202012Validator.check_schema(schema)
    check = jsonschema.Draft202012Validator(schema)
    kafka = clean_run(training(200))
    assert len(kafka.models) == 5  # three offers, two cursors
    for _, value in kafka.models:
        assert not list(check.iter_errors(orjson.loads(value))), value[:200]
    assert list(check.iter_errors({"format": 1, "partition": 0}))
    # The schema's bounds are the learner's.
    snapshot = schema["$defs"]["snapshot"]["properties"]
    assert snapshot["decisions"]["maxItems"] == learner_module.REMEMBERED_DECISIONS
    assert snapshot["recent"]["maxItems"] == learner_module.RECENT_EXAMPLES
    assert snapshot["weights"]["maxProperties"] == models_module.MAX_WEIGHTS
    assert snapshot["params"]["properties"].keys() == OfferModel("o").snapshot()["params"].keys()


def test_the_reader_swaps_in_only_newer_snapshots_and_skips_bad_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from rtim import metrics
    from rtim.learn.models import ModelSet
    from rtim.settings import Settings
    from rtim.stream.models import SharedModels

    models = ModelSet()
    shared = SharedModels(Settings(), models)
    learner = Learner()
    learner.assign(0, ModelBoard())
    rng = random.Random(5)
    snaps = []
    for i in range(3):
        for j in range(20):
            learner.learn(0, i * 20 + j, example("o", f"d{i}-{j}", rng))
        (snap,) = learner.flush().snapshots
        snaps.append(orjson.dumps(snap))
    shared._take(0, 0, b"o", snaps[1])
    shared._take(1, 0, b"o", snaps[2])
    shared._take(0, 1, b"o", snaps[0])  # older, read after the newest
    shared._take(0, 2, b"o", b"{")
    assert models.models["o"].version == 60
    features = ["cart.value~7", "hour~3"]
    assert models.models["o"].mean(features) == learner.offers["o"].model.mean(features)
    assert metrics.MODEL_VERSION.labels("o")._value.get() == 60
    assert "rtim.models[0]@2 skipped, not a model snapshot or cursor" in caplog.text


def test_bad_records_are_logged_ten_lines_a_minute_then_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from rtim.stream import models as shell

    now = [1000.0]
    monkeypatch.setattr(shell.time, "monotonic", lambda: now[0])
    throttled = shell.Throttled(logging.getLogger("rtim.test"), per_minute=10)
    with caplog.at_level(logging.WARNING, logger="rtim.test"):
        for i in range(25):
            throttled.warning("bad record %d", i)
        now[0] += 61
        throttled.warning("bad record %d", 25)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        *(f"bad record {i}" for i in range(10)),
        "15 more such lines were not logged",
        "bad record 25",
    ]


def test_rtim_models_says_which_broker_it_could_not_read() -> None:
    import socket

    from click.testing import CliRunner

    from rtim.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    result = CliRunner().invoke(main, ["models", "--broker", f"127.0.0.1:{port}", "--timeout", "5"])
    assert result.exit_code == 1
    assert f"rtim: rtim.models not read from 127.0.0.1:{port}" in result.output


def test_a_flush_kafka_did_not_take_goes_again_with_the_next() -> None:
    learner = Learner(clock_ms=lambda: 5)
    learner.assign(0, ModelBoard())
    learner.learn(0, 0, encode_example(Example("d1", "o", ["a=1"], True, 1, "conversion")))
    failed = learner.flush()
    learner.unflushed(failed)  # the publish failed
    again = learner.flush()
    assert again == failed
    learner.flushed(again)
    assert not learner.changed
    assert learner.flush() == Flush([], {})  # nothing new: no snapshot, no cursor


def test_the_pooled_model_learns_every_offers_examples_and_reaches_the_deciders() -> None:
    rng = random.Random(5)
    learner = Learner(ModelParams(prior_active=3))
    learner.assign(0, ModelBoard())
    offset = 0
    for i in range(400):
        offer = rng.choice(["free-shipping", "shoes-10"])
        closed = Example(f"d{i}", offer, rng.sample(FEATURES, 3), rng.random() < 0.05, 1, "window")
        for key, value in training_records(closed):
            assert orjson.loads(value)["offer_id"] == key.decode()
            learner.learn(0, offset, value)
            offset += 1
    snapshots = {s["offer"]: s for s in learner.flush().snapshots}
    assert snapshots[POOLED]["examples"] == 400
    assert snapshots["free-shipping"]["examples"] + snapshots["shoes-10"]["examples"] == 400
    # a worker swaps the pooled snapshot in like an offer's, and an offer it never saw
    # is scored on what every offer taught (5%), not on its prior (20%)
    deciders = ModelSet(learner.params)
    for snap in snapshots.values():
        assert deciders.swap(orjson.loads(orjson.dumps(snap)))
    (new,) = deciders.score(FEATURES[:3], [("new", ())], random.Random(1))
    assert new.mean < 0.12
    (alone,) = ModelSet(learner.params).score(FEATURES[:3], [("new", ())], random.Random(1))
    assert alone.mean == pytest.approx(0.2, abs=0.01)


def test_an_offer_first_learned_once_the_pool_has_evidence_is_marked_late() -> None:
    # A worker scores such an offer on the pooled prior over the sum (see OfferModel.late):
    # the mark must come with the offer's snapshots, whichever learner made its model.
    # An offer first learned when the pool has a few examples is not late: on a worker
    # every offer's first example reaches its learner after the pool has learned some.
    rng = random.Random(1)

    def first_learned_after(pool_examples: int) -> bool:
        pooled = OfferModel(POOLED)
        for i in range(pool_examples):
            pooled.learn(FEATURES[:3], i % 5 == 0)
        board = ModelBoard()
        board.add(POOLED.encode(), orjson.dumps(OfferState(pooled).snapshot(1)))
        learner = Learner()
        learner.assign(1, board)
        learner.learn(1, 0, example("shoes-10", "d1", rng))
        (snapshot,) = learner.flush().snapshots
        return bool(snapshot["late"])

    assert first_learned_after(LATE_AFTER) is True
    assert first_learned_after(LATE_AFTER - 1) is False
    assert first_learned_after(0) is False


def _snapshot(**changes: Any) -> dict[str, Any]:
    """A valid snapshot of a model that learned two examples, with ``changes``."""
    model = OfferModel("o")
    model.learn(["a=1"], True)
    model.learn(["a=2"], False)
    snap = orjson.loads(orjson.dumps(OfferState(model).snapshot(5)))
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = snap
        for name in parents:
            target = target[name]
        target[last] = value
    return snap


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weights": []}, "weights must be an object"),
        ({"weights": {"a=1": [0.1, 0.5]}}, "with the bias"),
        ({"weights__a=1": [0.1]}, "weight 'a=1' is not a [mean, variance] pair"),
        ({"weights__a=1": ["0.1", 0.5]}, "weight 'a=1' is not a belief a model learns"),
        ({"weights__a=1": [1e308, 1e-308]}, "weight 'a=1' is not a belief a model learns"),
        ({"weights__a=1": [0.1, 2.0]}, "variance 2.0 (within"),
        ({"version": "9"}, "version must be an integer >= 0, got '9'"),
        ({"version": 10**9}, "version 1000000000 is not its examples' count 2"),
        ({"examples": 2.0}, "examples must be an integer >= 0"),
        ({"positives": 3}, "3 positives of 2 examples"),
        ({"late": "no"}, "late must be true or false"),
        ({"params__beta": 0}, "beta must be in (0, inf)"),
        ({"params__prior_probability": 2}, "prior_probability must be in (0, 1)"),
        ({"params__exploration": -1e308}, "exploration must be in [0, inf)"),
        ({"params__beta": "5"}, "beta must be a finite number"),
        ({"params__learning_rate": 0.1}, "learning_rate"),
        ({"made_ms": "1796136556407"}, "made_ms must be an integer >= 0"),
        ({"recent": [["0.5", 1], [0.2, "yes"]]}, "recent must be a list of"),
        ({"recent": [[1.5, 1]]}, "recent must be a list of"),
        ({"marks": {"0": -1}}, "marks must map partitions"),
        ({"decisions": [1, 2]}, "decisions must be a list of strings"),
    ],
)
def test_a_snapshot_of_the_wrong_shape_is_refused_naming_what_is_wrong(
    changes: dict[str, Any], message: str
) -> None:
    """Every worker reads the models topic from its start: a record written by
    anything but a learner must be refused there, not crash the reader, break
    scoring (a zero beta divides by zero in every decision) or the models' table."""
    snapshot = _snapshot(**changes)
    with pytest.raises(ValueError, match="not a model snapshot") as refused:
        OfferState.from_snapshot(snapshot)
    assert message in str(refused.value)
    board = ModelBoard()
    with pytest.raises(ValueError):
        board.add(b"o", orjson.dumps(snapshot))
    assert board.snapshots == {}
    if not {"made_ms", "recent", "marks", "decisions"} & changes.keys():  # the model's own
        models = ModelSet()
        with pytest.raises(ValueError):
            models.swap(snapshot)
        assert models.models == {}


def test_a_valid_snapshot_still_loads_and_summarises() -> None:
    board = ModelBoard()
    assert board.add(b"o", orjson.dumps(_snapshot())) is not None
    (row,) = board.summaries(now_ms=5)
    assert (row["offer"], row["examples"], row["positives"], row["version"]) == ("o", 2, 1, 2)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"converted": "false"}, "converted must be true or false, got 'false'"),
        ({"converted": 1}, "converted must be true or false"),
        ({"decision_id": 7}, "decision_id must be a string"),
        ({"offer_id": None}, "offer_id must be a string"),
        ({"closed_ms": "1"}, "closed_ms must be an integer"),
        ({"features": "a=1"}, "features must be a list of strings"),
    ],
)
def test_a_training_record_of_the_wrong_types_is_invalid_not_learned(
    record: dict[str, Any], problem: str
) -> None:
    value = orjson.loads(encode_example(Example("d1", "o", ["a=1"], False, 1, "window")))
    value.update(record)
    learner = Learner()
    learner.assign(0, ModelBoard())
    outcome = learner.learn(0, 0, orjson.dumps(value))
    assert outcome.result == "invalid"
    assert problem in (outcome.problem or "")
    assert learner.offers == {}


def test_a_training_record_under_another_offers_key_is_invalid() -> None:
    """The key's partition is what gives an offer one learner: an example of one offer
    keyed by another would be learned by a second learner."""
    learner = Learner()
    learner.assign(0, ModelBoard())
    value = encode_example(Example("d1", "bundle", ["a=1"], True, 1, "conversion"))
    outcome = learner.learn(0, 0, value, b"free-shipping")
    assert (outcome.result, outcome.problem) == (
        "invalid",
        "an example of 'bundle' keyed 'free-shipping'",
    )
    assert learner.learn(0, 1, value, b"bundle").result == "learned"


def test_a_model_keeps_at_most_its_most_informative_weights() -> None:
    """Keys from open-ended values (a page per product) would grow a model without bound:
    past MAX_WEIGHTS the weights nearest the prior are forgotten, the learned ones stay."""
    model = OfferModel("o")
    for i in range(models_module.MAX_WEIGHTS + 50):
        model.learn(["cart=full", f"pages=p/{i}"], i % 3 == 0)
    weights = model.model.means
    assert len(weights) <= models_module.MAX_WEIGHTS
    assert {"__bias__", "cart=full"} <= weights.keys()
    assert model.examples == model.version == models_module.MAX_WEIGHTS + 50
    # What it forgot is back at the prior, as a key never met.
    gone = next(f"pages=p/{i}" for i in range(100) if f"pages=p/{i}" not in weights)
    assert model.mean([gone]) == model.mean(["pages=never-met"])


def test_a_snapshot_too_large_for_the_topic_is_pruned_to_fit_and_rebuilds_the_same() -> None:
    """One offer with thousands of long keys must not keep its snapshot (and the cursors
    of every offer) from being published."""
    limit = 40_000
    learner = Learner(max_snapshot_bytes=limit)
    learner.assign(0, ModelBoard())
    for i in range(600):
        features = ["cart=full", f"pages=products/{'x' * 60}-{i}"]
        value = encode_example(Example(f"d{i}", "o", features, i % 4 == 0, 1, "window"))
        assert learner.learn(0, i, value).result == "learned"
    (snapshot,) = learner.flush().snapshots
    encoded = orjson.dumps(snapshot)
    assert len(encoded) <= limit
    assert {"__bias__", "cart=full"} <= snapshot["weights"].keys()
    # The learner's own model is the pruned one: a learner resumed from the snapshot
    # decides as this one does.
    rebuilt = OfferState.from_snapshot(orjson.loads(encoded))
    assert rebuilt.snapshot(0) == learner.offers["o"].snapshot(0)


def test_a_training_topic_made_again_is_learned_from_its_start_despite_older_cursors() -> None:
    """After rtim.training is deleted and made again, the models topic still holds
    cursors and marks of the old log, far past the new one's end: the new records
    would all be skipped. A cursor past the partition's end voids it and the marks."""
    old = clean_run(training(300))
    assert all(o > 20 for _, o in old.board().cursors.items())
    # The new log: some 20 records, of decisions made since.
    fresh = {
        p: [v.replace(b'"decision_id":"d', b'"decision_id":"new-d') if v else v for v in values]
        for p, values in training(20, seed=9).items()
    }
    learner = Learner(clock_ms=lambda: 1_000)
    board = old.board()
    before = {offer: snap["examples"] for offer, snap in board.snapshots.items()}
    read = {p: learner.assign(p, board, end=len(values)) for p, values in fresh.items()}
    assert read == {0: 0, 1: 0} and learner.voided == {p: len(v) for p, v in fresh.items()}
    for partition, values in fresh.items():
        for offset, value in enumerate(values):
            learner.learn(partition, offset, value)
    learned = {
        offer: state.model.examples - before.get(offer, 0)
        for offer, state in learner.offers.items()
    }
    assert learned == distinct_decisions(fresh)
    # Once its cursor is the new log's, a take-over reads from it as usual.
    flush = learner.flush()
    old.publish(flush)
    again = Learner()
    assert again.assign(0, old.board(), end=len(fresh[0])) == len(fresh[0])
    assert again.voided == {}


def test_a_cursor_past_the_end_keeps_the_marks_within_the_log() -> None:
    """A cursor record not written by a learner (past the end of a log that is still
    there): the partition is read from its start, and each offer's mark, within the
    log, still says what it learned, so nothing is learned twice."""
    topic = training(300)
    kafka = clean_run(topic)
    before = {offer: snap["examples"] for offer, snap in kafka.board().snapshots.items()}
    kafka.models.append(cursor_record(0, 1_000_000))
    learner = Learner(clock_ms=lambda: 1_000)
    board = kafka.board()
    read = {p: learner.assign(p, board, end=len(values)) for p, values in topic.items()}
    assert read[0] == 0
    kafka.learn(learner, read)
    # Skipped by the marks, not merely caught as duplicates (the digests remember only
    # an offer's last 1,000 decisions).
    assert learner.counts["learned"] == learner.counts["duplicate"] == 0
    assert {o: s.model.examples for o, s in learner.offers.items()} == {
        o: before[o] for o in learner.offers
    }
