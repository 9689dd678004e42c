"""The demo's channel systems: valid responses to its triggers, in time, at each moment's rate."""

from __future__ import annotations

import random
from collections import Counter

import orjson

from rtim.demo import CONVERSION_BY_MOMENT, ChannelSystems
from rtim.learn.attribution import parse_response


def trigger(decision_id: str, moment: str) -> bytes:
    return orjson.dumps(
        {
            "id": decision_id,
            "data": {"decision_id": decision_id, "customer_id": "c1", "trigger": moment},
        }
    )


def test_answers_are_valid_responses_due_seconds_after_their_trigger() -> None:
    systems = ChannelSystems(random.Random(3))
    for i in range(300):
        systems.answer(trigger(f"d{i}", "checkout-started"), now=100.0)
    assert systems.due(100.1) == []  # nothing answers at once
    answered = [parse_response(value) for _, value in systems.due(113.0)]
    assert answered and systems.due(10_000.0) == []  # all within 12 s
    by_decision: dict[str, list[str]] = {}
    for response in answered:
        assert response.customer_id == "c1"
        by_decision.setdefault(response.decision_id, []).append(response.outcome)
    for outcomes in by_decision.values():
        # A conversion comes after a click; a dismissed offer does not convert.
        if "conversion" in outcomes:
            assert outcomes.index("click") < outcomes.index("conversion")
            assert "dismissal" not in outcomes


def test_offers_convert_at_their_moments_rate() -> None:
    systems = ChannelSystems(random.Random(5))
    rates = {}
    for moment in ("checkout-started", "browse-intent"):
        for i in range(4_000):
            systems.answer(trigger(f"{moment}-{i}", moment), now=0.0)
        outcomes = Counter(orjson.loads(v)["outcome"] for _, v in systems.due(60.0))
        rates[moment] = outcomes["conversion"] / 4_000
        assert abs(rates[moment] - CONVERSION_BY_MOMENT[moment]) < 0.03, outcomes
    assert rates["checkout-started"] > 2 * rates["browse-intent"]


def test_a_trigger_it_cannot_read_gets_no_answer() -> None:
    systems = ChannelSystems(random.Random(1))
    systems.answer(b"not json", now=0.0)
    systems.answer(orjson.dumps({"data": {"customer_id": "c1"}}), now=0.0)
    assert systems.due(60.0) == []
