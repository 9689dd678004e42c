"""The decision API and the live catalog on the embedded broker, with two workers: a
request asked of either worker is answered from the owner's context and recorded; a
catalog applied with ``rtim offers apply`` is in force on both within seconds; a bad one
never reaches the topic."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from click.testing import CliRunner

from rtim.cli import main
from rtim.names import DECISIONS_TOPIC, OFFERS_TOPIC, trigger_topic
from rtim.stream.process import WorkerProcess

from .support import TEST_CATALOG, produce, read_topic, segment

NOW_MS = int(time.time() * 1000)


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def event(user: str, kind: str, name: str | None, ms: int, **props: object) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": kind,
        "messageId": str(uuid.uuid4()),
        "userId": user,
        "properties": props,
        "context": {"page": {"path": "/p"}},
        "timestamp": iso(ms),
    }
    body["event" if kind == "track" else "name"] = name
    return body


def call(
    url: str, body: dict[str, Any] | bytes | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def poll(what: str, check: Any, timeout: float = 30.0, *workers: WorkerProcess) -> Any:
    """Call ``check()`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            logs = "\n".join(w.log_tail(20) for w in workers)
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{logs}")
        time.sleep(0.1)


def serving(*workers: WorkerProcess) -> None:
    """Wait until each worker answers for a customer it does not own (both are in the
    group with their partitions)."""
    for worker in workers:
        poll(
            f"{worker.url} routes requests",
            lambda w=worker: all(
                call(f"{w.url}/v1/customers/probe-{i}")[0] == 200 for i in range(8)
            ),
            60,
            *workers,
        )


def test_a_request_to_either_worker_is_decided_on_the_owners_context(kafka, workers) -> None:
    w1 = workers("w1").wait_ready()
    w2 = workers("w2").wait_ready()
    serving(w1, w2)
    # The customer's cart is worth 80: free-shipping (cart.value >= 50) is eligible on the
    # web; no trigger fires (cart-builder wants 100).
    added = event("shopper", "track", "Product Added", NOW_MS - 60_000, product_id="p1", price=80)
    asyncio.run(produce(kafka.bootstrap, [segment(added)]))
    seen = poll(
        "the customer's event applied",
        lambda: (r := call(f"{w1.url}/v1/customers/shopper"))[1].get("known") and r,
        30,
        w1,
        w2,
    )
    owner_url = seen[1]["worker"]
    owner, other = (w1, w2) if owner_url == w1.url else (w2, w1)
    assert other.url != owner_url

    status, answer, headers = call(
        f"{other.url}/v1/decide", {"customer_id": "shopper", "channel": "web", "limit": 3}
    )
    assert status == 200, answer
    assert [a["offer_id"] for a in answer["actions"]] == ["free-shipping"]
    assert answer["worker"] == owner.url and headers["X-RTIM-Worker"] == owner.url
    assert answer["actions"][0]["creative"]["title"] == "Shipping is on us"
    assert owner.metric("rtim_api_requests_total", endpoint="decide", result="decided") == 1
    assert other.metric("rtim_api_requests_total", endpoint="decide", result="forwarded") == 1

    # A new visitor is decided on an empty context: nothing in the cart, no offer.
    status, stranger, _ = call(f"{other.url}/v1/decide", {"customer_id": "new", "channel": "web"})
    assert status == 200 and stranger["actions"] == [] and stranger["new_customer"]
    assert stranger["reason"] == "no-offer:none-eligible"

    # Recorded like a trigger's decision: on rtim.decisions, open in the context (with the
    # owner's next batch: the answer does not wait for it).
    def recorded() -> list[Any]:
        records = asyncio.run(read_topic(kafka.bootstrap, DECISIONS_TOPIC))
        return [r for r in records if orjson.loads(r.value)["decision_id"] == answer["decision_id"]]

    mine = poll("the decision recorded", recorded, 10, w1, w2)
    assert [
        (body["source"], body["offer_id"], body["customer_id"])
        for body in (orjson.loads(r.value) for r in mine)
    ] == [("api", "free-shipping", "shopper")]
    assert dict(mine[0].headers)["rtim.worker"] == owner.url.encode(), "decided by the owner"
    status, explained, _ = poll(
        "the decision stored",
        lambda: (r := call(f"{other.url}/v1/customers/shopper"))[1].get("open_decisions") and r,
        10,
        w1,
        w2,
    )
    assert status == 200 and explained["worker"] == owner.url
    assert [d["decision_id"] for d in explained["open_decisions"]] == [answer["decision_id"]]
    assert explained["decisions"][0]["id"] == answer["decision_id"]
    assert "offer:free-shipping" in explained["decisions"][0]["reasons"]
    shown = CliRunner().invoke(main, ["explain", "shopper", "--url", other.url])
    assert shown.exit_code == 0, shown.output
    assert f"{answer['decision_id']}" in shown.output and "offer:free-shipping" in shown.output
    assert "cart 80.00 (1 items)" in shown.output

    # A malformed request names its field, whichever worker gets it.
    status, error, _ = call(f"{other.url}/v1/decide", {"customer_id": "shopper", "channel": "fax"})
    assert (status, error["field"]) == (400, "channel")
    body = {"customer_id": "shopper", "channel": "web", "placement": "nowhere"}
    status, error, _ = call(f"{other.url}/v1/decide", body)
    assert (status, error["field"]) == (400, "placement") and "nowhere" in error["message"]

    # The same request as a GET with query parameters (a link, a page rendered on a
    # server): forwarded, decided by the owner and recorded the same way, never cached.
    query = "customer_id=shopper&channel=web&limit=3&context.page=%2Fcart&request_id=get-1"
    decided = owner.metric("rtim_api_requests_total", endpoint="decide", result="decided")
    status, got, headers = call(f"{other.url}/v1/decide?{query}")
    assert status == 200, got
    assert [a["offer_id"] for a in got["actions"]] == ["free-shipping"]
    assert got["worker"] == owner.url and got["decision_id"] != answer["decision_id"]
    assert headers["Cache-Control"] == "no-store"
    assert (
        owner.metric("rtim_api_requests_total", endpoint="decide", result="decided") == decided + 1
    )

    # The client retries (same request_id): the answer it got, recorded once.
    status, retried, _ = call(f"{owner.url}/v1/decide?{query}")
    assert status == 200 and retried["repeated"] is True
    assert (retried["decision_id"], retried["actions"]) == (got["decision_id"], got["actions"])
    assert owner.metric("rtim_api_requests_total", endpoint="decide", result="repeated") == 1

    def records_of_get() -> list[Any]:
        records = asyncio.run(read_topic(kafka.bootstrap, DECISIONS_TOPIC))
        return [r for r in records if orjson.loads(r.value)["decision_id"] == got["decision_id"]]

    poll("the GET's decision recorded", records_of_get, 10, w1, w2)
    time.sleep(1.0)  # the retry's batch (had it recorded anything) is out by now
    assert len(records_of_get()) == 1
    status, error, _ = call(f"{other.url}/v1/decide?customer_id=shopper&channel=web&limit=x")
    assert (status, error["field"]) == (400, "limit")
    # A HEAD (a link checker, a prefetch) decides nothing.
    decided = owner.metric("rtim_api_requests_total", endpoint="decide", result="decided")
    head = urllib.request.Request(f"{owner.url}/v1/decide?{query}", method="HEAD")
    try:
        urllib.request.urlopen(head, timeout=10)
        raise AssertionError("HEAD /v1/decide answered 2xx")
    except urllib.error.HTTPError as exc:
        assert (exc.code, exc.headers["Allow"]) == (405, "GET, POST")
    assert owner.metric("rtim_api_requests_total", endpoint="decide", result="decided") == decided
    # Explain takes the ids decide takes; a request line too long for any is a JSON 414.
    status, error, _ = call(f"{other.url}/v1/customers/{'c' * 257}")
    assert (status, error["field"]) == (400, "customer_id")
    status, error, headers = call(f"{other.url}/v1/customers/{'c' * 10_000}")
    assert (status, error["error"], headers["Connection"]) == (414, "uri_too_long", "close")
    assert "Traceback" not in owner.log_tail(50) + other.log_tail(50)
    # Ids with reserved characters reach the owner as sent, whichever worker is asked:
    # never another customer's context or decision, nor another path.
    for worker in (owner, other):
        status, seen, _ = call(f"{worker.url}/v1/customers/shopper%3Fx")
        assert (status, seen["customer_id"], seen["known"]) == (200, "shopper?x", False)
        status, seen, _ = call(f"{worker.url}/v1/customers/..%2F..%2Fmetrics")
        assert (status, seen["customer_id"]) == (200, "../../metrics")
        status, got, _ = call(f"{worker.url}/v1/decide?customer_id=shopper%23a&channel=web")
        assert (status, got["customer_id"], got["new_customer"]) == (200, "shopper#a", True)

    # `rtim decide` asks the same of any worker, and says what it got.
    ask = ["decide", "shopper", "--channel", "web", "--url", other.url, "--request-id", "cli-1"]
    shown = CliRunner().invoke(main, [*ask, "--context", "page=/cart"])
    assert shown.exit_code == 0, shown.output
    assert f"by {owner.url}\n" in shown.output
    assert "1. free-shipping on web  score " in shown.output
    assert "      eligible:cart.value >= 50" in shown.output
    again = CliRunner().invoke(main, ask)
    assert again.exit_code == 0 and "(asked before: the same answer)" in again.output

    def actions(output: str) -> list[str]:
        lines = output.splitlines()
        return lines[1 : lines.index("reasons:")]

    assert actions(again.output) == actions(shown.output)
    assert again.output.splitlines()[-1] == "  repeated:cli-1"
    refused = CliRunner().invoke(main, [*ask[:-2], "--placement", "nowhere"])
    assert refused.exit_code == 1 and "answered 400" in refused.output


NEW_OFFER = """
  - id: sale-banner
    name: Winter sale
    channels: [web]
    triggers: [sale-page]
    creative: {title: "Winter sale"}
"""
NEW_TRIGGER = """
  - id: sale-page
    when: {type: page, name: Sale}
    cooldown: 0
"""


def new_catalog(tmp_path: Path) -> Path:
    text = TEST_CATALOG.read_text()
    text = text.replace("triggers:\n", "triggers:\n" + NEW_TRIGGER, 1)
    text = text.replace("offers:\n", "offers:\n" + NEW_OFFER, 1)
    text += "\nplacements:\n  - {id: home-hero, channels: [web], offers: [sale-banner]}\n"
    path = tmp_path / "new.yaml"
    path.write_text(text)
    return path


def test_an_applied_catalog_is_in_force_on_every_worker_and_a_bad_one_never_published(
    kafka, workers, tmp_path
) -> None:
    w1 = workers("w1").wait_ready()
    w2 = workers("w2").wait_ready()
    for worker in (w1, w2):
        assert call(f"{worker.url}/v1/catalog")[1]["version"] == 0
    # Events flow before, while and after the catalog is applied.
    early = [event(f"c{i}", "page", "Sale", NOW_MS - 30_000 + i) for i in range(20)]
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in early]))

    runner = CliRunner()
    done = runner.invoke(
        main, ["offers", "apply", str(new_catalog(tmp_path)), "--broker", kafka.bootstrap]
    )
    assert done.exit_code == 0, done.output
    assert "catalog version 1 published" in done.output
    for worker in (w1, w2):
        poll(
            f"{worker.url} has catalog version 1",
            lambda w=worker: call(f"{w.url}/v1/catalog")[1]["version"] == 1,
            15,
            w1,
            w2,
        )
        body = call(f"{worker.url}/v1/catalog")[1]
        assert (
            body["source"] == "rtim.offers"
            and body["catalog"]["placements"][0]["id"] == "home-hero"
        )
        assert worker.metric("rtim_catalog_version") == 1

    # The new trigger fires for customers on both workers' partitions.
    late = [event(f"c{i}", "page", "Sale", NOW_MS - 10_000 + i) for i in range(20)]
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in late]))
    fired = poll(
        "sale-banner triggers",
        lambda: (
            {
                r.key
                for r in asyncio.run(read_topic(kafka.bootstrap, trigger_topic("web")))
                if orjson.loads(r.value)["data"]["offer"]["id"] == "sale-banner"
            }
            >= {f"c{i}".encode() for i in range(20)}
        ),
        30,
        w1,
        w2,
    )
    assert fired
    # And the new placement answers on either worker.
    for worker in (w1, w2):
        status, answer, _ = call(
            f"{worker.url}/v1/decide",
            {"customer_id": "c3", "channel": "web", "placement": "home-hero"},
        )
        assert status == 200 and [a["offer_id"] for a in answer["actions"]] == ["sale-banner"]

    # A bad catalog: refused with its line, exit 2, nothing published.
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        new_catalog(tmp_path).read_text().replace("channels: [web]\n", "channels: [fax]\n", 1)
    )
    refused = runner.invoke(main, ["offers", "apply", str(bad), "--broker", kafka.bootstrap])
    assert refused.exit_code == 2
    assert f"{bad}:" in refused.output and "unknown channel" in refused.output
    assert len(asyncio.run(read_topic(kafka.bootstrap, OFFERS_TOPIC))) == 1
    for worker in (w1, w2):
        assert call(f"{worker.url}/v1/catalog")[1]["version"] == 1


def test_through_a_rebalance_every_answer_is_recorded_and_kept_in_its_customers_context(
    kafka, workers
) -> None:
    """Requests keep coming to the first worker while a second one joins and takes half
    of its partitions: each is answered 200 (decided by the partition's owner of the
    moment, directly or forwarded) or 503 with Retry-After; every decision answered is on
    rtim.decisions, and every one that offered something is in its customer's context
    afterwards (open or closed), where caps count it and responses join it. Those whose
    batch the first worker could not store (its membership ended with the rebalance) are
    handed over to the customer's owner, which adopts them: none is lost."""
    w1 = workers("w1").wait_ready()
    serving(w1)
    customers = [f"r{i}" for i in range(400)]
    # A cart worth 80: free shipping is offered on the web (no cap in the catalog).
    seen = [
        event(c, "track", "Product Added", NOW_MS - 60_000, product_id="p1", price=80)
        for c in customers
    ]
    asyncio.run(produce(kafka.bootstrap, [segment(e) for e in seen]))

    answered: list[str] = []
    offered: dict[str, set[str]] = {c: set() for c in customers}
    statuses: Counter[int] = Counter()
    retry_after: set[str | None] = set()
    stop = threading.Event()

    def ask() -> None:
        i = 0
        while not stop.is_set():
            customer = customers[i % len(customers)]
            status, answer, headers = call(
                f"{w1.url}/v1/decide", {"customer_id": customer, "channel": "web"}
            )
            statuses[status] += 1
            if status == 200:
                answered.append(answer["decision_id"])
                if answer["actions"]:
                    offered[customer].add(answer["decision_id"])
            elif status == 503:
                retry_after.add(headers.get("Retry-After"))
            i += 1

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        poll("requests answered", lambda: len(answered) >= 20, 30, w1)
        w2 = workers("w2").wait_ready()
        serving(w1, w2)
        settled = len(answered)
        poll("requests answered after", lambda: len(answered) >= settled + 20, 30, w1, w2)
    finally:
        stop.set()
        asker.join(30)
    assert set(statuses) <= {200, 503}, statuses
    assert retry_after <= {"1"}, retry_after
    assert sum(len(ids) for ids in offered.values()) > len(answered) / 2

    def recorded() -> set[str]:
        records = asyncio.run(read_topic(kafka.bootstrap, DECISIONS_TOPIC))
        return {orjson.loads(r.value)["decision_id"] for r in records}

    def taken(result: str) -> float:
        return sum(w.metric("rtim_api_decisions_adopted_total", result=result) for w in (w1, w2))

    # A handed-over record is read at least once: again by the next owner of its
    # partition if its reader's commit did not come before a rebalance (a duplicate then,
    # as its adoption is in the changelog the next owner recovered), so there may be more
    # takings than handovers, but never more adoptions.
    handed = sum(w.metric("rtim_api_decisions_handed_over_total") for w in (w1, w2))
    poll(
        f"every one of the {handed:.0f} handed-over decisions taken by its owner",
        lambda: taken("adopted") + taken("duplicate") >= handed,
        20,
        w1,
        w2,
    )
    assert taken("adopted") <= handed
    assert sum(w.metric("rtim_api_decisions_lost_total") for w in (w1, w2)) == 0
    poll("every answered decision recorded", lambda: set(answered) <= recorded(), 20, w1, w2)
    # Every decision that offered something is in its customer's context.
    for customer, ids in offered.items():
        status, body, _ = call(f"{w1.url}/v1/customers/{customer}")
        assert status == 200, body
        held = {d["decision_id"] for d in body["open_decisions"]}
        held |= {c[0] for c in body["context"]["closed"]}
        assert ids <= held, f"{customer}: {sorted(ids - held)} answered but not in the context"
    # Both workers decided some: the second took partitions over.
    deciders = {
        dict(r.headers)["rtim.worker"]
        for r in asyncio.run(read_topic(kafka.bootstrap, DECISIONS_TOPIC))
        if orjson.loads(r.value)["decision_id"] in set(answered)
    }
    assert deciders == {w1.url.encode(), w2.url.encode()}
