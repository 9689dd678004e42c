"""Learning the training topic exactly once, resumable from the published snapshots.

Plain data in, plain data out: no Kafka, no asyncio. The shell
(:mod:`rtim.stream.models`) feeds a :class:`Learner` the records of the
training partitions its worker owns, publishes what :meth:`Learner.flush`
returns to the models topic, and feeds every record of that topic to a
:class:`ModelBoard`, which keeps the newest snapshot of each offer.

Exactly once, by training offset
--------------------------------
Each offer's snapshot carries, per training partition, its *mark*: the offset
after the last record of that partition it has taken into account. A *cursor*
record per training partition (key ``__cursor__.<partition>``) carries the
learner's position: it is published only after the snapshots of every offer
changed before that position have been acknowledged. Records below a cursor
are therefore all in published snapshots. A learner that takes a partition
over reads it from its cursor (from 0 without one) and skips, per offer, the
records below that offer's mark: those are in the offer's snapshot already;
the others are not, since an offer's records of a partition are learned in
offset order. So a crash anywhere (before the snapshots, between two offers'
snapshots, before the cursor) loses nothing and learns nothing twice, for
offers with snapshots and offers without alike.

A training record is keyed by its offer, so each offer has one learner: the
worker that owns the partition of its key.

Duplicates
----------
The worker that closed a decision may publish its example again (after a
crash, a batch's outputs go out again): each offer remembers the decision ids
of its last :data:`REMEMBERED_DECISIONS` examples (as short digests, carried
in its snapshot) and learns a decision once.

What a snapshot adds to :meth:`OfferModel.snapshot`
---------------------------------------------------
``marks`` (training partition -> offset), ``decisions`` (digests of the
remembered decision ids, oldest first), ``recent`` (the last
:data:`RECENT_EXAMPLES` examples as ``[mean predicted before learning it,
converted 0/1]``) and ``made_ms`` (wall-clock time it was made).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import orjson

from rtim.learn.attribution import decode_example
from rtim.learn.models import POOLED, ModelParams, OfferModel, count, is_late

#: Key prefix of the cursor records on the models topic.
CURSOR_PREFIX = "__cursor__."
#: Format of a cursor record's value.
CURSOR_FORMAT = 1
#: Examples per offer over which predicted and observed conversion are reported.
RECENT_EXAMPLES = 1000
#: Decision ids per offer remembered to learn each decision once.
REMEMBERED_DECISIONS = 1000
#: What became of a training record (metric label values); records below an
#: offer's mark (read again after a take-over) are not counted.
LEARN_RESULTS = ("learned", "duplicate", "invalid")


def cursor_key(partition: int) -> str:
    """The key of a training partition's cursor record.

    >>> cursor_key(3)
    '__cursor__.3'
    """
    return f"{CURSOR_PREFIX}{partition}"


def decision_digest(decision_id: str) -> str:
    """A short, stable digest of a decision id (64 bits: collisions are negligible
    among the few thousand ids an offer remembers)."""
    return hashlib.blake2b(decision_id.encode(), digest_size=8).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


class OfferState:
    """One offer's model and what the learner keeps with it."""

    __slots__ = ("decisions", "made_ms", "marks", "model", "recent", "seen")

    def __init__(self, model: OfferModel) -> None:
        self.model = model
        self.marks: dict[int, int] = {}
        self.decisions: deque[str] = deque()
        self.seen: set[str] = set()
        self.recent: deque[tuple[float, int]] = deque(maxlen=RECENT_EXAMPLES)
        self.made_ms = 0

    def remember(self, digest: str) -> None:
        self.decisions.append(digest)
        self.seen.add(digest)
        while len(self.decisions) > REMEMBERED_DECISIONS:
            self.seen.discard(self.decisions.popleft())

    def snapshot(self, made_ms: int) -> dict[str, Any]:
        data = self.model.snapshot()
        data["marks"] = {str(p): o for p, o in sorted(self.marks.items())}
        data["decisions"] = list(self.decisions)
        data["recent"] = [[round(p, 6), c] for p, c in self.recent]
        data["made_ms"] = made_ms
        return data

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> OfferState:
        """Rebuild from :meth:`snapshot`; raises ValueError, naming the field, for
        anything that is not one (see :meth:`OfferModel.from_snapshot`)."""
        state = cls(OfferModel.from_snapshot(data))
        try:
            marks = data.get("marks", {})
            if not isinstance(marks, dict) or not all(
                p.isdigit() and type(o) is int and o >= 0 for p, o in marks.items()
            ):
                raise ValueError("marks must map partitions to offsets >= 0")
            decisions = data.get("decisions", [])
            if type(decisions) is not list or not all(type(d) is str for d in decisions):
                raise ValueError("decisions must be a list of strings")
            recent = data.get("recent", [])
            if type(recent) is not list or not all(map(_is_recent, recent)):
                raise ValueError("recent must be a list of [predicted 0-1, converted 0|1]")
            state.made_ms = count(data, "made_ms") if "made_ms" in data else 0
        except ValueError as exc:
            raise ValueError(f"not a model snapshot: {exc}") from None
        state.marks = {int(p): o for p, o in marks.items()}
        for digest in decisions:
            state.remember(digest)
        state.recent.extend((float(p), c) for p, c in recent)
        return state


def _is_recent(item: Any) -> bool:
    """Whether a snapshot's ``recent`` entry is ``[mean predicted, converted 0|1]``."""
    return (
        type(item) is list
        and len(item) == 2
        and type(item[0]) in (int, float)
        and 0 <= item[0] <= 1
        and type(item[1]) is int
        and item[1] in (0, 1)
    )


def _void(state: OfferState, partition: int, end: int) -> None:
    """Forget the offer's mark on a partition if it is past the partition's end."""
    if state.marks.get(partition, 0) > end:
        del state.marks[partition]


def summary(snapshot: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """What ``rtim models`` and ``GET /v1/models`` show of one offer's snapshot.

    >>> summary({"offer": "o", "examples": 3, "positives": 1, "version": 3, "made_ms": 1000,
    ...          "recent": [[0.2, 1], [0.1, 0]]}, 3500)["observed"]
    0.5
    """
    recent = snapshot.get("recent") or []
    n = len(recent)
    return {
        "offer": snapshot["offer"],
        "examples": snapshot["examples"],
        "positives": snapshot["positives"],
        "recent": n,
        "predicted": sum(p for p, _ in recent) / n if n else None,
        "observed": sum(c for _, c in recent) / n if n else None,
        "version": snapshot["version"],
        "age_s": max(0.0, (now_ms - int(snapshot.get("made_ms", 0))) / 1000),
    }


def models_table(rows: list[dict[str, Any]]) -> list[str]:
    """The lines of the models' table that ``rtim models`` and ``rtim demo`` print, from
    :func:`summary` rows (a header first).

    >>> print("\\n".join(models_table([summary({"offer": "o", "examples": 3, "positives": 1,
    ...     "version": 3, "made_ms": 1000, "recent": [[0.2, 1], [0.1, 0]]}, 3500)])))
    offer   examples  positives  predicted   observed   over    version       age
    o              3          1     15.00%     50.00%      2          3      2.5s
    """

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    width = max(len("offer"), *(len(r["offer"]) for r in rows))
    return [
        f"{'offer':<{width}}  {'examples':>9}  {'positives':>9}  {'predicted':>9}  "
        f"{'observed':>9}  {'over':>5}  {'version':>9}  {'age':>8}",
        *(
            f"{r['offer']:<{width}}  {r['examples']:>9,}  {r['positives']:>9,}  "
            f"{rate(r['predicted']):>9}  {rate(r['observed']):>9}  {r['recent']:>5}  "
            f"{r['version']:>9,}  {r['age_s']:>7.1f}s"
            for r in rows
        ),
    ]


class ModelBoard:
    """The newest snapshot of every offer and the last cursor of every training
    partition, from the records of the models topic in any order per partition.

    A reader feeds it every record; so does ``rtim models``. On a broker that
    compacts, the topic holds about one record per key; on one that does not, all
    of them, and the board keeps the newest (highest version) all the same.
    """

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.cursors: dict[int, int] = {}

    def add(self, key: bytes | None, value: bytes | None) -> dict[str, Any] | None:
        """Take one record; returns the snapshot if it is an offer's newest so far.

        Raises ValueError for a record that is neither a snapshot nor a cursor.
        """
        name = key.decode(errors="replace") if key is not None else ""
        try:
            data = orjson.loads(value) if value is not None else None
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if name.startswith(CURSOR_PREFIX):
            partition, offset = data.get("partition"), data.get("offset")
            if (
                data.get("format") != CURSOR_FORMAT
                or not isinstance(partition, int)
                or name != cursor_key(partition)
                or not isinstance(offset, int)
                or offset < 0
            ):
                raise ValueError(f"not a cursor record: {data!r:.200}")
            # In log order (one key, one partition): the last one written is the
            # learner's newest, as compaction would keep it.
            self.cursors[partition] = offset
            return None
        OfferState.from_snapshot(data)  # validates, raises ValueError
        if data["offer"] != name:
            raise ValueError(f"snapshot of {data['offer']!r} under key {name!r}")
        current = self.snapshots.get(name)
        if current is not None and current["version"] >= data["version"]:
            return None
        self.snapshots[name] = data
        return data

    def summaries(self, now_ms: int | None = None) -> list[dict[str, Any]]:
        now = _now_ms() if now_ms is None else now_ms
        return [summary(self.snapshots[offer], now) for offer in sorted(self.snapshots)]


def cursor_record(partition: int, offset: int) -> tuple[bytes, bytes]:
    """(key, value) of a cursor record on the models topic."""
    value = {"format": CURSOR_FORMAT, "partition": partition, "offset": offset}
    return cursor_key(partition).encode(), orjson.dumps(value)


class Outcome(NamedTuple):
    """What :meth:`Learner.learn` did with one record: a :data:`LEARN_RESULTS` value
    (None: not this learner's, or learned before), the offer, and for an invalid
    record why."""

    result: str | None
    offer_id: str | None = None
    problem: str | None = None


class Flush(NamedTuple):
    """What to publish, in this order: the snapshots, then (once Kafka has them) the
    cursors."""

    snapshots: list[dict[str, Any]]
    cursors: dict[int, int]


class Learner:
    """Learns the training partitions it is given, each from where the snapshots say.

    Parameters
    ----------
    params
        The models' parameters (those of the worker's :class:`ModelSet`).
    clock_ms
        Wall-clock milliseconds (snapshots say when they were made).
    max_snapshot_bytes
        The largest snapshot the models topic takes (as JSON): a model whose snapshot
        would be larger forgets its least informative weights until it fits
        (:meth:`OfferModel.prune`), rather than never being published.

    Examples
    --------
    >>> from rtim.learn.attribution import Example, encode_example
    >>> board = ModelBoard()
    >>> learner = Learner()
    >>> learner.assign(0, board)
    0
    >>> learner.learn(0, 0, encode_example(Example("d1", "o", ["a"], True, 1, "conversion")))
    Outcome(result='learned', offer_id='o', problem=None)
    >>> learner.learn(0, 1, encode_example(Example("d1", "o", ["a"], True, 1, "conversion")))
    Outcome(result='duplicate', offer_id='o', problem=None)
    >>> flush = learner.flush()
    >>> [(s["offer"], s["examples"], s["marks"]) for s in flush.snapshots], flush.cursors
    ([('o', 1, {'0': 2})], {0: 2})
    """

    def __init__(
        self,
        params: ModelParams | None = None,
        *,
        clock_ms: Callable[[], int] = _now_ms,
        max_snapshot_bytes: int | None = None,
    ) -> None:
        self.params = params or ModelParams()
        self.clock_ms = clock_ms
        self.max_snapshot_bytes = max_snapshot_bytes
        #: Training partitions owned -> the offset of the next record to read.
        self.positions: dict[int, int] = {}
        self.offers: dict[str, OfferState] = {}
        self._board: ModelBoard | None = None
        self._dirty: set[str] = set()
        self._flushed: dict[int, int] = {}
        self.counts: dict[str, int] = dict.fromkeys(LEARN_RESULTS, 0)
        #: Training partitions whose cursor was past their end when assigned, and that
        #: end (see :meth:`assign`): read from 0, the marks past the end ignored.
        self.voided: dict[int, int] = {}

    def assign(self, partition: int, board: ModelBoard, end: int | None = None) -> int:
        """Take a training partition over; returns the offset to read it from.

        ``board`` must hold every record of the models topic written before the
        partition was assigned (its newest snapshots and cursors). ``end`` is the
        partition's end offset, if known: a cursor past it speaks of a log that is no
        longer there (the training topic made again, or a record not written by a
        learner), so the partition is read from its start, and the offers' marks on it
        that are past its end too are void (:attr:`voided`); otherwise every record of
        the new log below the old cursor, or below an offer's old mark, would be skipped
        unlearned. A mark within the log still says what its offer learned of it.

        >>> board = ModelBoard()
        >>> board.add(*cursor_record(0, 1_000_000))
        >>> Learner().assign(0, board, end=3), Learner().assign(0, board)
        (0, 1000000)
        """
        self._board = board
        offset = board.cursors.get(partition, 0)
        if end is not None and offset > end:
            self.voided[partition] = end
            offset = 0
            for state in self.offers.values():
                _void(state, partition, end)
        else:
            self.voided.pop(partition, None)
        self.positions[partition] = offset
        self._flushed[partition] = offset
        return offset

    def revoke(self, partitions: Iterable[int]) -> None:
        """Give partitions up (after :meth:`flush` was published): their offers'
        state is dropped, and taken from the snapshots again if they come back."""
        gone = set(partitions)
        for partition in gone:
            self.positions.pop(partition, None)
            self._flushed.pop(partition, None)
            self.voided.pop(partition, None)
        for offer_id in [o for o, s in self.offers.items() if gone & s.marks.keys()]:
            del self.offers[offer_id]
            self._dirty.discard(offer_id)

    def _state(self, offer_id: str) -> OfferState:
        state = self.offers.get(offer_id)
        if state is None:
            snapshot = self._board.snapshots.get(offer_id) if self._board is not None else None
            if snapshot is not None:
                state = OfferState.from_snapshot(snapshot)
                for partition, end in self.voided.items():
                    _void(state, partition, end)
            else:
                state = OfferState(
                    OfferModel(offer_id, self.params, late=self._pooled_has_evidence())
                )
            self.offers[offer_id] = state
        return state

    def _pooled_has_evidence(self) -> bool:
        """Whether the pooled model had learned enough examples (:func:`is_late`) when an
        offer's model is made (its own here, or its newest snapshot): see
        :attr:`OfferModel.late`."""
        state = self.offers.get(POOLED)
        if state is not None:
            return is_late(state.model.examples)
        snapshot = self._board.snapshots.get(POOLED) if self._board is not None else None
        return snapshot is not None and is_late(int(snapshot.get("examples", 0)))

    def learn(
        self, partition: int, offset: int, value: bytes | None, key: bytes | None = None
    ) -> Outcome:
        """Take one training record at ``offset`` of ``partition`` (keyed ``key``,
        which must be its offer's id when given: the partition of its key is what
        gives an offer one learner)."""
        position = self.positions.get(partition)
        if position is None or offset < position:
            return Outcome(None)  # not (or no longer) ours, or read before
        self.positions[partition] = offset + 1
        try:
            example = decode_example(value)  # type: ignore[arg-type]
            if not example.offer_id or not example.decision_id:
                raise ValueError("empty offer or decision id")
            if key is not None and key != example.offer_id.encode():
                raise ValueError(
                    f"an example of {example.offer_id!r} keyed {key.decode(errors='replace')!r:.80}"
                )
        except ValueError as exc:
            self.counts["invalid"] += 1
            return Outcome("invalid", None, str(exc))
        state = self._state(example.offer_id)
        if offset < state.marks.get(partition, 0):
            return Outcome(None, example.offer_id)  # in the offer's snapshot already
        state.marks[partition] = offset + 1
        digest = decision_digest(example.decision_id)
        if digest in state.seen:
            self.counts["duplicate"] += 1
            return Outcome("duplicate", example.offer_id)
        model = state.model
        state.recent.append((model.mean(example.features), 1 if example.converted else 0))
        model.learn(example.features, example.converted)
        state.remember(digest)
        self._dirty.add(example.offer_id)
        self.counts["learned"] += 1
        return Outcome("learned", example.offer_id)

    def flush(self) -> Flush:
        """The snapshots of the offers changed since the last flush, and the cursors
        that may be published once Kafka has acknowledged them (the positions that
        moved). The caller publishes both or neither; after a failure,
        :meth:`unflushed` gives the snapshots back."""
        now = self.clock_ms()
        snapshots = []
        for offer_id in sorted(self._dirty):
            state = self.offers[offer_id]
            state.made_ms = now
            snapshots.append(self._fitted(state, now))
        self._dirty.clear()
        cursors = {p: o for p, o in self.positions.items() if self._flushed.get(p) != o}
        return Flush(snapshots, cursors)

    def _fitted(self, state: OfferState, now: int) -> dict[str, Any]:
        """The offer's snapshot, its model pruned first if the snapshot would not fit."""
        snapshot = state.snapshot(now)
        limit = self.max_snapshot_bytes
        if limit is None:
            return snapshot
        size = len(orjson.dumps(snapshot))
        while size > limit:
            weights = len(snapshot["weights"])
            if weights <= 1:
                break  # the bias alone: nothing is left to forget (the topic refuses it)
            state.model.prune(max(1, int(weights * limit / size * 0.9)))
            snapshot = state.snapshot(now)
            size = len(orjson.dumps(snapshot))
        return snapshot

    def flushed(self, flush: Flush) -> None:
        """Kafka has the flush's snapshots and cursors."""
        for partition, offset in flush.cursors.items():
            if partition in self._flushed:
                self._flushed[partition] = offset

    def unflushed(self, flush: Flush) -> None:
        """The flush was not published: its offers are to be published again."""
        self._dirty.update(s["offer"] for s in flush.snapshots if s["offer"] in self.offers)

    @property
    def changed(self) -> bool:
        """Whether a flush would publish anything."""
        return bool(self._dirty) or any(
            self._flushed.get(p) != o for p, o in self.positions.items()
        )
