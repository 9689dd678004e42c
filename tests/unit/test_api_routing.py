"""Where the decision API answers: on the owner of the customer's partition only; a
request for a partition no one owns now (a rebalance) gets 503 with Retry-After, and a
forwarded request is never forwarded again."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson

from rtim.stream.api import FORWARDED, DecisionApi, Reply


class FakeRouter:
    def __init__(self, hosts: dict[str, dict[str, list[int]]]) -> None:
        self.hosts = hosts

    def table_metadata(self, table: str) -> dict[str, dict[str, list[int]]]:
        return self.hosts


def api(*, rebalancing: bool, owned: list[int], hosts: dict[str, list[int]]) -> DecisionApi:
    assignment = [SimpleNamespace(topic="rtim.clickstream", partition=p) for p in owned]
    app = SimpleNamespace(
        conf=SimpleNamespace(canonical_url="http://me:1"),
        rebalancing=rebalancing,
        should_stop=False,
        consumer_generation_id=3,
        tables=SimpleNamespace(
            recovery=SimpleNamespace(completed=SimpleNamespace(is_set=lambda: True))
        ),
        consumer=SimpleNamespace(assignment=lambda: assignment),
        router=FakeRouter({url: {"rtim-customers-changelog": ps} for url, ps in hosts.items()}),
    )
    processor = SimpleNamespace(
        _partition_of=lambda key: 2,
        changelog_topic="rtim-customers-changelog",
        settings=SimpleNamespace(api_answer="decided"),
    )
    return DecisionApi(app, processor, live=SimpleNamespace())  # type: ignore[arg-type]


def route(the_api: DecisionApi, headers: dict[str, str] | None = None) -> Any:
    answered: list[str] = []

    async def here() -> Reply:
        answered.append("here")
        return Reply(200, b"{}")

    forwarded_by = (headers or {}).get(FORWARDED)
    reply = asyncio.run(
        the_api.route("decide", "c", forwarded_by, "POST", "/v1/decide", b"{}", here)
    )
    return SimpleNamespace(
        status=reply.status, body=orjson.loads(reply.body), headers=reply.headers
    ), answered


def test_the_owner_answers_itself() -> None:
    response, answered = route(api(rebalancing=False, owned=[2], hosts={"http://me:1": [2]}))
    assert response.status == 200 and answered == ["here"]


def test_during_a_rebalance_nobody_decides_and_the_client_is_told_to_retry() -> None:
    # Partition 2 was this worker's: during the rebalance it decides nothing on it.
    response, answered = route(api(rebalancing=True, owned=[2], hosts={"http://me:1": [2]}))
    assert (response.status, answered) == (503, [])
    assert response.headers["Retry-After"] == "1" and response.body["error"] == "unavailable"


def test_a_forwarded_request_for_a_partition_not_owned_is_not_forwarded_again() -> None:
    # The sender thought this worker owned partition 2; the assignment says the other one.
    the_api = api(rebalancing=False, owned=[0], hosts={"http://other:2": [2]})
    response, answered = route(the_api, {FORWARDED: "http://other:2"})
    assert (response.status, answered) == (503, [])


def test_an_owner_not_known_yet_is_503() -> None:
    response, answered = route(api(rebalancing=False, owned=[0], hosts={}))
    assert (response.status, answered) == (503, [])
