"""When the decision API answers (``RTIM_API_ANSWER``): with ``decided``, at once, on the
customer's latest context even while the batch that made it is being published, the
decision then going out and being stored with the next batch (and counted as lost if that
cannot be); with ``stored``, only once its batch is stored.

On the processor with the stand-in transactional producer of test_transactions.py: the
tests hold a batch in its publish, which a real broker does only for milliseconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiokafka.errors import KafkaConnectionError
from faust.types import TP

from rtim import metrics
from rtim.decide.explain import recent_decisions
from rtim.decide.request import parse_request
from rtim.engine import Answer, BatchRun, Record
from rtim.names import (
    CLICKSTREAM_TOPIC,
    DECISIONS_TOPIC,
    HANDOVER_HEADER,
    RESPONSES_TOPIC,
    TRAINING_TOPIC,
)
from rtim.stream.api import DECIDED_BY
from rtim.stream.app import ClickstreamProcessor
from rtim.stream.consumer import FetchedBatch
from rtim.stream.publish import OutRecord
from rtim.stream.turns import PEEK_CHUNK

from .test_engine import T0, page, track
from .test_transactions import TxnBroker, eos_processor, fetched


class HeldPublish:
    """Holds the processor's next publishes until released."""

    def __init__(self, processor: ClickstreamProcessor) -> None:
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        real = processor.publisher.publish

        async def held(out: list[OutRecord]) -> Any:
            self.entered.set()
            await self.gate.wait()
            return await real(out)

        processor.publisher.publish = held  # type: ignore[method-assign]


def request(customer: str) -> Any:
    at = dt.datetime.fromtimestamp((T0 + 10) / 1000, dt.UTC).isoformat()
    body = {"customer_id": customer, "channel": "web", "limit": 5, "timestamp": at}
    # Asked when it says (a request's time is within RTIM_MAX_FUTURE_SKEW_S of the clock).
    return parse_request(orjson.dumps(body), now_ms=T0 + 10)


async def until(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)
    return got


def decision_ids(broker: TxnBroker) -> list[str]:
    return [orjson.loads(e.value)["decision_id"] for e in broker.committed(DECISIONS_TOPIC)]


def stored_recent(processor: ClickstreamProcessor, customer: str) -> list[str]:
    ctx = processor.engine.stored(0, customer.encode())
    return [] if ctx is None else [d["id"] for d in recent_decisions(ctx)]


def on_a_batch_being_published(
    tmp_path: Path,
    answer: str,
    then: Callable[[ClickstreamProcessor, TxnBroker, HeldPublish, str], Awaitable[Any]],
) -> tuple[ClickstreamProcessor, TxnBroker, Any]:
    """A customer's page view is stored; their cart (60, so free shipping is eligible) is
    being published when ``then`` runs."""
    broker = TxnBroker()
    processor, _ = eos_processor(tmp_path, broker, api_answer=answer)
    # (Which worker owns the customer is the routing's: tests/unit/test_api_routing.py.)
    processor.app.rtim_api.owns = lambda partition: True  # type: ignore[method-assign]
    processor.app.rtim_api.leased = lambda: True  # type: ignore[method-assign]
    customer = next(
        f"c-{i}"
        for i in range(1000)
        if processor.publisher.partition_for(f"c-{i}".encode(), [0, 1, 2, 3]) == 0
    )
    viewed = fetched({0: [page("/kitchen", user=customer, ts=T0)]})
    cart = [track("Product Added", user=customer, ts=T0 + 1, product_id="k1", price=60)]

    async def run() -> Any:
        await processor._assigned({TP(CLICKSTREAM_TOPIC, 0)})
        await processor.handle(viewed)
        held = HeldPublish(processor)
        batch = asyncio.create_task(processor.handle(fetched({0: cart}, offset=1)))
        await held.entered.wait()
        try:
            return await then(processor, broker, held, customer)
        finally:
            held.gate.set()
            await batch
            await processor.stop_handing_over(timeout=5)

    return processor, broker, asyncio.run(run())


def test_decided_answers_at_once_from_the_batch_being_published_and_stores_it_next(
    tmp_path: Path,
) -> None:
    async def then(
        processor: ClickstreamProcessor, broker: TxnBroker, held: HeldPublish, customer: str
    ) -> Answer:
        answer = await asyncio.wait_for(processor.app.rtim_api.decide(request(customer)), 1)
        # The cart not stored yet is what the decision saw.
        assert [a.offer.id for a in answer.actions][:1] == ["free-shipping"]
        assert answer.decision_id not in decision_ids(broker)
        assert answer.decision_id not in stored_recent(processor, customer)
        held.gate.set()
        # Out and stored with the next batch: here one of its own, as no event comes.
        await until("the decision stored", lambda: answer.decision_id in decision_ids(broker))
        await until(
            "the context stored",
            lambda: answer.decision_id in stored_recent(processor, customer),
        )
        return answer

    processor, _, answer = on_a_batch_being_published(tmp_path, "decided", then)
    ctx = processor.engine.stored(0, answer.customer_id.encode())
    assert ctx is not None and ctx["cart"]["value"] == 60
    assert [p[0] for p in ctx["pending"]] == [answer.decision_id]


def test_stored_answers_only_once_the_decision_is_stored(tmp_path: Path) -> None:
    async def then(
        processor: ClickstreamProcessor, broker: TxnBroker, held: HeldPublish, customer: str
    ) -> Answer:
        asked = asyncio.ensure_future(processor.app.rtim_api.decide(request(customer)))
        await asyncio.sleep(0.2)
        assert not asked.done(), "answered before the batch in progress was stored"
        held.gate.set()
        answer = await asyncio.wait_for(asked, 5)
        assert answer.decision_id in decision_ids(broker)
        assert answer.decision_id in stored_recent(processor, customer)
        return answer

    on_a_batch_being_published(tmp_path, "stored", then)


def test_an_answer_whose_batch_cannot_be_stored_is_handed_over_and_adopted(
    tmp_path: Path,
) -> None:
    """The batch a decision was answered in fails as the worker stops: the decision is
    handed over on rtim.responses, and the customer's next owner adopts it once: its
    actions open (a conversion to it is learned), counted as contacts, remembered and
    recorded on rtim.decisions."""
    handed = metrics.API_DECISIONS_HANDED_OVER._value.get()
    lost = metrics.API_DECISIONS_LOST._value.get()
    adopted = metrics.API_DECISIONS_ADOPTED.labels("adopted")._value.get()
    duplicate = metrics.API_DECISIONS_ADOPTED.labels("duplicate")._value.get()

    async def then(
        processor: ClickstreamProcessor, broker: TxnBroker, held: HeldPublish, customer: str
    ) -> Answer:
        answer = await asyncio.wait_for(processor.app.rtim_api.decide(request(customer)), 1)
        # The batch it was decided on fails: the worker is stopping (its partitions go).
        broker.faults["send"].append(KafkaConnectionError())
        broker.on_fault = processor.app._stopped.set
        return answer

    processor, broker, answer = on_a_batch_being_published(tmp_path, "decided", then)
    assert processor._open is None
    assert answer.decision_id not in decision_ids(broker)
    assert answer.decision_id not in stored_recent(processor, answer.customer_id)
    assert metrics.API_DECISIONS_HANDED_OVER._value.get() == handed + 1
    assert metrics.API_DECISIONS_LOST._value.get() == lost
    [handover] = broker.committed(RESPONSES_TOPIC)
    assert dict(handover.headers)[HANDOVER_HEADER] == b"1"
    assert dict(handover.headers)[DECIDED_BY] == processor.app.rtim_api.url.encode()
    assert (handover.key, handover.partition) == (answer.customer_id.encode(), 0)
    assert orjson.loads(handover.value or b"")["decision_id"] == answer.decision_id

    successor, _ = eos_processor(tmp_path / "next", broker)
    key = answer.customer_id.encode()
    record = Record(0, handover.offset, handover.key, handover.value, handover.headers, T0)
    converted = {
        "decision_id": answer.decision_id,
        "customer_id": answer.customer_id,
        "outcome": "conversion",
        "timestamp": dt.datetime.fromtimestamp((T0 + 60_000) / 1000, dt.UTC).isoformat(),
    }

    async def take_over() -> None:
        await successor._assigned({TP(CLICKSTREAM_TOPIC, 0)})
        await successor.handle(fetched({0: [page("/kitchen", user=answer.customer_id, ts=T0)]}))
        await successor.handle(FetchedBatch(0, {TP(RESPONSES_TOPIC, 0): [record]}))
        # Handed over again (or its batch reached the changelog after all): once is enough.
        await successor.handle(FetchedBatch(0, {TP(RESPONSES_TOPIC, 0): [record]}))

    asyncio.run(take_over())
    ctx = successor.engine.stored(0, key)
    assert ctx is not None
    opened = [p[0] for p in ctx["pending"]]
    assert opened == [
        answer.decision_id,
        *(f"{answer.decision_id}#{a.offer.id}" for a in answer.actions[1:]),
    ]
    assert [(c[1], c[2]) for c in ctx["contacts"]] == [
        (a.channel, a.offer.id) for a in answer.actions
    ]
    assert answer.decision_id in stored_recent(successor, answer.customer_id)
    assert decision_ids(broker).count(answer.decision_id) == 1
    assert metrics.API_DECISIONS_ADOPTED.labels("adopted")._value.get() == adopted + 1
    assert metrics.API_DECISIONS_ADOPTED.labels("duplicate")._value.get() == duplicate + 1

    # A conversion to it is learned: a positive example of its first action's offer.
    answered = Record(0, handover.offset + 2, key, orjson.dumps(converted), (), T0)

    async def respond() -> None:
        await successor.handle(FetchedBatch(0, {TP(RESPONSES_TOPIC, 0): [answered]}))

    asyncio.run(respond())
    examples = [orjson.loads(e.value or b"") for e in broker.committed(TRAINING_TOPIC)]
    assert [
        (e["decision_id"], e["converted"]) for e in examples if e["offer_id"] != "__shared__"
    ] == [(answer.decision_id, True)]


def test_a_graceful_stop_stores_the_answered_decisions_first(tmp_path: Path) -> None:
    """The worker stops right after answering (a rolling restart): Faust waits for the
    processor before its last commit, and the decision is stored then, not forgotten."""
    broker = TxnBroker()
    processor, _ = eos_processor(tmp_path, broker)
    customer = "c-1"

    async def run() -> Answer:
        await processor._assigned({TP(CLICKSTREAM_TOPIC, p) for p in range(4)})
        await processor.handle(fetched({}))  # (the generation is known)
        answer = await processor.app.rtim_api.decide(request(customer))
        processor.app._stopped.set()  # (should_stop)
        await processor.wait_idle()
        return answer

    answer = asyncio.run(run())
    assert decision_ids(broker) == [answer.decision_id]
    assert processor._open is None


def test_a_request_waiting_on_the_socket_is_decided_within_a_few_records_of_a_big_batch(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A request that arrives while a batch of 640 events starts is decided after at most
    PEEK_CHUNK of them (the processor looks for waiting input between parts), not after
    a whole part of the core or the whole batch, and is stored with that batch."""
    broker = TxnBroker()
    processor, _ = eos_processor(tmp_path, broker)
    processor.app.rtim_api.owns = lambda partition: True  # type: ignore[method-assign]
    processor.app.rtim_api.leased = lambda: True  # type: ignore[method-assign]
    added = [0]
    real_add = BatchRun.add

    def counting_add(self: BatchRun, records: Any) -> None:
        added[0] += len(records)
        real_add(self, records)

    monkeypatch.setattr(BatchRun, "add", counting_add)
    ours = [
        f"c-{i}"
        for i in range(5000)
        if processor.publisher.partition_for(f"c-{i}".encode(), [0, 1, 2, 3]) == 0
    ]
    events = [page("/kitchen", user=ours[i % 100], ts=T0 + i) for i in range(640)]
    decided_after: list[int] = []
    answers: list[Answer] = []

    async def run() -> None:
        await processor._assigned({TP(CLICKSTREAM_TOPIC, 0)})
        await processor.handle(fetched({}))  # (the generation is known)
        loop = asyncio.get_running_loop()
        client, server = socket.socketpair()

        async def handler() -> None:  # what the HTTP server runs for a request it read
            answers.append(await processor.app.rtim_api.decide(request(ours[0])))
            decided_after.append(added[0])

        tasks: list[asyncio.Task[None]] = []

        def readable() -> None:
            server.recv(64)
            tasks.append(loop.create_task(handler()))

        loop.add_reader(server, readable)
        try:
            client.send(b"POST /v1/decide")
            await processor.handle(fetched({0: events}))
            await asyncio.gather(*tasks)
            await processor.wait_idle()
        finally:
            loop.remove_reader(server)
            client.close()
            server.close()

    asyncio.run(run())
    assert added[0] == len(events)
    assert decided_after and decided_after[0] <= PEEK_CHUNK, decided_after
    # Decided in that batch, and stored with it.
    assert [a.decision_id for a in answers] == decision_ids(broker)
