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


def api(
    *,
    rebalancing: bool,
    owned: list[int],
    hosts: dict[str, list[int]],
    lease: bool = True,
    confirms: bool | None = True,
) -> DecisionApi:
    """The API of a worker; ``lease``: its membership was confirmed lately; ``confirms``:
    what the coordinator says when asked (None: no answer)."""
    assignment = [SimpleNamespace(topic="rtim.clickstream", partition=p) for p in owned]

    async def confirm_membership(generation: int) -> bool | None:
        asked.append(generation)
        return confirms

    asked: list[int] = []
    app = SimpleNamespace(
        conf=SimpleNamespace(canonical_url="http://me:1"),
        rebalancing=rebalancing,
        should_stop=False,
        consumer_generation_id=3,
        tables=SimpleNamespace(
            recovery=SimpleNamespace(completed=SimpleNamespace(is_set=lambda: True))
        ),
        consumer=SimpleNamespace(
            assignment=lambda: assignment,
            membership_lease=lambda generation: lease,
            confirm_membership=confirm_membership,
            asked=asked,
        ),
        router=FakeRouter({url: {"rtim-customers-changelog": ps} for url, ps in hosts.items()}),
    )
    processor = SimpleNamespace(
        _partition_of=lambda key: 2,
        changelog_topic="rtim-customers-changelog",
        settings=SimpleNamespace(api_answer="decided", max_future_skew_s=3600.0),
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


def test_an_owner_whose_membership_may_have_lapsed_asks_the_coordinator_first() -> None:
    """A worker paused past its session timeout still believes it owns its partitions:
    once its lease has run out it decides only if the coordinator confirms it."""
    idle = api(rebalancing=False, owned=[2], hosts={"http://me:1": [2]}, lease=False)
    response, answered = route(idle)
    assert (response.status, answered) == (200, ["here"])
    assert idle.app.consumer.asked == [3]  # type: ignore[attr-defined]
    for verdict in (False, None):  # dropped from the group, or no answer
        zombie = api(
            rebalancing=False, owned=[2], hosts={"http://me:1": [2]}, lease=False, confirms=verdict
        )
        response, answered = route(zombie)
        assert (response.status, answered) == (503, [])
        assert response.headers["Retry-After"] == "1"
    # Nor is a request answered at once without the lease (it goes the way above).
    assert zombie.decide_at_once(b'{"customer_id": "c", "channel": "web"}') is None
    leased = api(rebalancing=False, owned=[2], hosts={"http://me:1": [2]})
    route(leased)
    assert leased.app.consumer.asked == []  # type: ignore[attr-defined]


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
