"""Scoring, arbitration and the CloudEvent a decision becomes."""

from __future__ import annotations

import calendar
import random
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from rtim.context.model import apply_event, new_context
from rtim.decide.arbitrate import Decision, context_snapshot, decide, decision_id, round6
from rtim.decide.cloudevent import CONTENT_TYPE, TRIGGER_TYPE, encode_trigger, iso_ms, trigger_event
from rtim.decide.record import encode_record
from rtim.events import Event
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import Candidate, ModelSet, Score
from rtim.offers.catalog import Catalog, parse_catalog

from .segment_calls import parsed, segment_call


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1000


T0 = ms(2026, 11, 2, 9)
NOW = T0 + 250  # decided a quarter of a second after the event
TTL = 900_000
RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def event(
    name: str,
    *,
    ts: int = T0,
    kind: str = "track",
    user: str = "u-42",
    channel: str = "web",
    message_id: str | None = None,
    traits: dict[str, Any] | None = None,
    **props: Any,
) -> Event:
    return parsed(
        segment_call(
            kind,
            name if kind == "track" else None,
            ts=ts,
            user=user,
            message_id=message_id,
            channel=channel,
            properties=props,
            traits=traits,
        )
    )


def build(*events: Event, user: str = "u-42") -> dict[str, Any]:
    ctx = new_context(user)
    for offset, e in enumerate(events):
        apply_event(ctx, e, 0, offset)
    return ctx


def catalog(*offers: dict[str, Any], cooldown: int = 0) -> Catalog:
    return parse_catalog(
        {
            "triggers": [
                {"id": "cart", "when": {"event": "Product Added"}, "cooldown": cooldown},
                {"id": "other", "when": {"event": "Other"}},
            ],
            "offers": [{"channels": ["web", "app"], "triggers": ["cart"], **o} for o in offers],
        }
    )


WINDOW = 86_400_000


def run_decide(
    cat: Catalog, ctx: dict[str, Any], e: Event, models: Any = None, trigger: str = "cart"
) -> Decision | None:
    """The decision, or None when no offer was eligible."""
    rule = next(t for t in cat.triggers if t.id == trigger)
    decision = decide(
        cat,
        models if models is not None else ModelSet(),
        FeatureBuilder(),
        rule,
        e,
        ctx,
        now_ms=NOW,
        ttl_ms=TTL,
        window_ms=WINDOW,
        rng=random.Random(0),
    )
    return None if decision.offer is None else decision


class FixedModel(ModelSet):
    """Models with known propensities (draw = mean), to check the arbitration arithmetic."""

    def __init__(self, propensities: dict[str, float]) -> None:
        super().__init__()
        self.propensities = propensities

    def score(self, shared: Any, candidates: Any, rng: random.Random) -> list[Score]:
        return [Score(o, self.propensities[o], self.propensities[o], 7) for o, _ in candidates]

    def _sample(self, shared: Any, candidates: Any, rng: random.Random, offers: Any) -> Any:
        # ModelSet.rank's draws: the propensities, scored as its loop scores them
        # (test_learn_policy checks that arithmetic on real models).
        if offers is None:
            return self.score(shared, candidates, rng)
        return [
            Candidate(o, shared, own, p, p, p * o.value * o.priority, 7)
            for o, (_, own) in zip(offers, candidates, strict=True)
            for p in (self.propensities[o.id],)
        ]


ADD = event("Product Added", product_id="p1", price=120, category="Shoes")
CTX = build(ADD)


# --------------------------------------------------------------------------
# Arbitration
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offers", "propensities", "winner", "score"),
    [
        # equal propensities: value x priority decides
        ([("a", 10, 1), ("b", 6, 2)], {"a": 0.5, "b": 0.5}, "b", 6.0),
        ([("a", 10, 1), ("b", 6, 1)], {"a": 0.5, "b": 0.5}, "a", 5.0),
        # propensity can beat value
        ([("a", 100, 1), ("b", 10, 1)], {"a": 0.05, "b": 0.6}, "b", 6.0),
        # and priority can beat both
        ([("a", 100, 1), ("b", 10, 1), ("c", 20, 2)], {"a": 0.1, "b": 0.5, "c": 0.3}, "c", 12.0),
        # a tie goes to the offer listed first in the catalog
        ([("a", 10, 1), ("b", 5, 2), ("c", 20, 0.5)], {"a": 0.5, "b": 0.5, "c": 0.5}, "a", 5.0),
        # a zero priority switches an offer off
        ([("a", 100, 0), ("b", 1, 1)], {"a": 0.9, "b": 0.1}, "b", 0.1),
    ],
)
def test_highest_propensity_times_value_times_priority_wins(
    offers: list[tuple[str, float, float]],
    propensities: dict[str, float],
    winner: str,
    score: float,
) -> None:
    cat = catalog(*({"id": i, "value": v, "priority": p} for i, v, p in offers))
    decision = run_decide(cat, CTX, ADD, FixedModel(propensities))
    assert decision is not None
    assert decision.offer.id == winner
    assert decision.score == pytest.approx(score)
    assert decision.propensity == pytest.approx(propensities[winner])
    expected = sorted(
        ((i, round(propensities[i] * v * p, 6)) for i, v, p in offers),
        key=lambda kv: kv[1],
        reverse=True,
    )
    assert decision.candidates == expected


def test_offers_without_evidence_are_all_tried() -> None:
    # Thompson sampling: with nothing learned, each offer wins in proportion to the
    # chance that it is the best; the higher value wins most often.
    cat = catalog(
        {"id": "small", "value": 5}, {"id": "big", "value": 15}, {"id": "mid", "value": 8}
    )
    wins: dict[str, int] = {}
    models = ModelSet()
    for i in range(300):
        e = event("Product Added", product_id="p1", price=120, message_id=f"m-{i}")
        decision = run_decide(cat, CTX, e, models)
        assert decision is not None and len(decision.candidates) == 3
        assert decision.propensity == pytest.approx(models.params.prior_probability, abs=0.05)
        wins[decision.offer.id] = wins.get(decision.offer.id, 0) + 1
    assert set(wins) == {"small", "big", "mid"}
    assert wins["big"] == max(wins.values())


def test_ineligible_offers_are_rejected_with_the_failed_condition() -> None:
    cat = catalog(
        {"id": "bundle", "value": 50, "eligibility": ["cart.value >= 150", "issues == 0"]},
        {"id": "ship", "value": 6, "eligibility": ["cart.value >= 50", "issues == 0"]},
        {"id": "vip", "value": 90, "eligibility": ["cart.value >= 50", 'traits.plan == "gold"']},
        {"id": "expired", "value": 99, "valid_to": "2026-01-01"},
        {"id": "future", "value": 99, "valid_from": "2027-01-01"},
        {"id": "elsewhere", "value": 99, "triggers": ["other"]},
    )
    decision = run_decide(cat, CTX, ADD)
    assert decision is not None
    assert decision.offer.id == "ship"
    assert decision.reasons == [
        "trigger:cart",
        "rejected:bundle:cart.value >= 150",
        'rejected:vip:traits.plan == "gold"',
        "rejected:expired:not-valid-now",
        "rejected:future:not-valid-now",
        "offer:ship",
        "eligible:cart.value >= 50",
        "eligible:issues == 0",
    ]
    assert [c for c, _ in decision.candidates] == ["ship"]


def test_eligibility_sees_the_event_too() -> None:
    cat = catalog({"id": "shoes-only", "eligibility": ["event.properties.category == Shoes"]})
    assert run_decide(cat, CTX, ADD) is not None
    other = event("Product Added", product_id="p2", price=1, category="Hats")
    assert run_decide(cat, CTX, other) is None


def test_no_eligible_offer_means_no_decision() -> None:
    cat = catalog(
        {"id": "bundle", "eligibility": ["cart.value >= 1000"]},
        {"id": "gone", "valid_to": "2020-01-01"},
    )
    assert run_decide(cat, CTX, ADD) is None
    assert run_decide(catalog(), CTX, ADD) is None
    # still a decision, of no offer, with the reasons (and recorded)
    rule = cat.triggers[0]
    none = decide(
        cat, ModelSet(), FeatureBuilder(), rule, ADD, CTX,
        now_ms=NOW, ttl_ms=TTL, window_ms=WINDOW, rng=random.Random(0),
    )  # fmt: skip
    assert none.offer is None and none.window_end_ms is None
    assert none.reasons[-1] == "no-offer:none-eligible"
    assert "rejected:gone:not-valid-now" in none.reasons
    record = orjson.loads(encode_record(none))
    assert (record["offer_id"], record["candidates"]) == (None, [])


def test_the_decision_carries_channel_times_and_features() -> None:
    cat = catalog({"id": "ship", "channels": ["app", "web"]})
    ctx = build(event("Product Added", product_id="p1", price=120, channel="email"))
    on_email = run_decide(
        cat, ctx, event("Product Added", product_id="p2", price=1, channel="email")
    )
    on_web = run_decide(cat, ctx, ADD)
    assert on_email is not None and on_web is not None
    assert on_email.channel == "app"  # the offer cannot use e-mail: its first channel
    assert on_web.channel == "web"
    assert (on_web.decided_ms, on_web.expires_ms) == (NOW, NOW + TTL)
    assert on_web.customer_id == "u-42"
    assert on_web.trigger.id == "cart"
    assert on_web.event is ADD
    assert isinstance(on_web.features, dict) and len(on_web.features) <= 5
    # the attribution window runs on event time, from the event's timestamp
    assert on_web.window_end_ms == ADD.timestamp_ms + WINDOW
    own = catalog({"id": "ship", "attribution_window": 3600})
    assert run_decide(own, ctx, ADD).window_end_ms == ADD.timestamp_ms + 3_600_000


# --------------------------------------------------------------------------
# Decision ids
# --------------------------------------------------------------------------


def test_decision_ids_are_stable_for_the_same_cause() -> None:
    first = decision_id("u-42", "m-1", "cart")
    assert first == decision_id("u-42", "m-1", "cart")
    assert uuid.UUID(first).version == 5
    others = {
        decision_id("u-43", "m-1", "cart"),
        decision_id("u-42", "m-2", "cart"),
        decision_id("u-42", "m-1", "other"),
        decision_id("u-42m", "-1", "cart"),  # no ambiguity when fields are glued
        decision_id("u-42", "m-1cart", ""),
    }
    assert first not in others
    assert len(others) == 5


def test_decision_ids_are_the_uuid5_of_their_cause() -> None:
    # Channel systems may check or rebuild the id: it must be the standard UUID 5.
    namespace = uuid.UUID("6f1c2a9e-3c57-4b8e-9a51-2f3b8d7c4e10")
    rng = random.Random(3)
    for i in range(2000):
        cause = (
            f"u-{rng.getrandbits(40):x}",
            str(uuid.UUID(int=rng.getrandbits(128))),
            "é" * (i % 3),
        )
        assert decision_id(*cause) == str(uuid.uuid5(namespace, "\x1f".join(cause)))


def test_a_replayed_event_gets_the_same_decision_id() -> None:
    cat = catalog({"id": "ship"})
    e = event("Product Added", message_id="m-replayed", product_id="p", price=200)
    one = run_decide(cat, build(e), e)
    two = run_decide(cat, build(e), e)
    assert one is not None and two is not None
    assert one.decision_id == two.decision_id == decision_id("u-42", "m-replayed", "cart")
    other = event("Product Added", message_id="m-other", product_id="p", price=200)
    three = run_decide(cat, build(other), other)
    assert three is not None and three.decision_id != one.decision_id


# --------------------------------------------------------------------------
# Scoring and learning
# --------------------------------------------------------------------------


def test_learning_positive_responses_makes_an_offer_win_over_a_higher_value_one() -> None:
    cat = catalog({"id": "pricey", "value": 12}, {"id": "liked", "value": 6, "category": "shoes"})
    models = ModelSet()
    builder = FeatureBuilder()
    winners = []
    for step in range(300):
        e = event(
            "Product Added",
            ts=T0 + step * 60_000,
            product_id=f"p{step}",
            price=30,
            category="shoes",
        )
        ctx = build(e)
        decision = run_decide(cat, ctx, e, models)
        assert decision is not None
        winners.append(decision.offer.id)
        shared = builder.shared(ctx, channel="web", trigger="cart", now_ms=e.timestamp_ms)
        # Customers take the lower-value offer and ignore the other.
        models.learn("liked", builder.for_offer(shared, ctx, "shoes"), True)
        models.learn("pricey", shared, False)
        if winners[-10:] == ["liked"] * 10:
            break
    assert winners[-10:] == ["liked"] * 10, winners
    assert len(winners) < 300
    assert decision.propensity > 0.5
    assert decision.features  # the reason codes name what moved the score
    assert all(v != 0 for v in decision.features.values())


# --------------------------------------------------------------------------
# The CloudEvent
# --------------------------------------------------------------------------

PII = {"email": "jane.doe@example.com", "name": "Jane Doe", "phone": "+44 20 7946 0958"}


def rich_decision() -> Decision:
    ctx = build(
        event("identify", kind="identify", traits={**PII, "plan": "gold"}),
        event("Product Viewed", category="Shoes", email=PII["email"]),
        event("Product Viewed", category="Electronics"),
        event("Product List Viewed", category="Garden"),
        event("Product Added", product_id="b1", price=0, category="Books"),
        event("Product Added", product_id="p1", price=120, category="Shoes"),
    )
    e = event("Product Added", product_id="p2", price=30, category="shoes", message_id="m-ce")
    apply_event(ctx, e, 0, 99)
    cat = catalog(
        {
            "id": "ship",
            "name": "Free shipping",
            "value": 6,
            "creative": {"title": "Shipping is on us", "text": "Order today."},
            "eligibility": ["cart.value >= 50"],
        }
    )
    decision = run_decide(cat, ctx, e)
    assert decision is not None
    return decision


def test_cloudevent_required_and_extension_attributes() -> None:
    decision = rich_decision()
    ce = trigger_event(decision, source="/rtim/test")
    assert ce["specversion"] == "1.0"
    assert ce["id"] == decision.decision_id == decision_id("u-42", "m-ce", "cart")
    assert ce["source"] == "/rtim/test"
    assert ce["type"] == TRIGGER_TYPE
    assert ce["subject"] == "u-42"
    assert ce["datacontenttype"] == "application/json"
    for attr in ("time", "expiry"):
        assert RFC3339_MS.match(ce[attr]), ce[attr]
    time = datetime.fromisoformat(ce["time"])
    expiry = datetime.fromisoformat(ce["expiry"])
    assert time == datetime.fromtimestamp(NOW / 1000, tz=UTC)
    assert (expiry - time).total_seconds() == TTL / 1000
    # extension attribute names: lower-case letters and digits only (CloudEvents 1.0)
    for name in ce:
        assert re.fullmatch(r"[a-z0-9]{1,20}", name), name


def test_cloudevent_data() -> None:
    decision = rich_decision()
    data = trigger_event(decision, source="/rtim")["data"]
    assert data["offer"] == {
        "id": "ship",
        "name": "Free shipping",
        "value": 6.0,
        "creative": {"title": "Shipping is on us", "text": "Order today."},
    }
    assert data["channel"] == "web"
    # the score is the Thompson draw x value x priority; the propensity is the mean belief
    assert data["score"] == decision.score == pytest.approx(decision.ranked[0].sampled * 6.0)
    assert data["propensity"] == decision.propensity == round(decision.ranked[0].mean, 6)
    assert data["trigger"] == "cart"
    assert data["reasons"] == ["trigger:cart", "offer:ship", "eligible:cart.value >= 50"]
    assert data["event"] == {
        "message_id": "m-ce",
        "type": "track",
        "name": "Product Added",
        "channel": "web",
        "timestamp": iso_ms(T0),
    }
    ctx = data["context"]
    assert ctx["cart_value"] == 150.0
    assert ctx["cart_items"] == 3
    assert ctx["events_seen"] == 7
    assert ctx["orders"] == ctx["open_issues"] == 0
    # top three interests, strongest first (garden, the weakest, is left out)
    assert ctx["top_categories"] == {"shoes": 7.0, "books": 3.0, "electronics": 1.0}
    assert ctx["channels"] == {"web": 7}


def test_cloudevent_has_no_pii() -> None:
    decision = rich_decision()
    blob = encode_trigger(decision, source="/rtim")
    assert orjson.loads(blob) == orjson.loads(orjson.dumps(trigger_event(decision, source="/rtim")))
    for value in (b"jane", b"Jane", b"Doe", b"@example.com", b"7946"):
        assert value not in blob
    assert set(orjson.loads(blob)["data"]["context"]) == {
        "cart_value",
        "cart_items",
        "orders",
        "open_issues",
        "top_categories",
        "channels",
        "recent_pages",
        "events_seen",
    }


def test_context_snapshot_is_small() -> None:
    ctx = build(*(event(f"P{i}", kind="page", category=f"c{i}") for i in range(12)))
    ctx["pages"] = [f"/p{i}" for i in range(10)]
    snap = context_snapshot(ctx)
    assert snap["recent_pages"] == ["/p7", "/p8", "/p9"]
    assert len(snap["top_categories"]) == 3


@pytest.mark.parametrize(
    ("epoch_ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (T0, "2026-11-02T09:00:00.000Z"),
        (T0 + 1, "2026-11-02T09:00:00.001Z"),
        (T0 + 999, "2026-11-02T09:00:00.999Z"),
    ],
)
def test_iso_ms(epoch_ms: int, text: str) -> None:
    assert iso_ms(epoch_ms) == text


def test_iso_ms_writes_every_time_of_day_as_the_c_library_does() -> None:
    # Times of day are formatted by arithmetic on the day's seconds: the last second
    # of a day, midnight, an hour's edges and days before 1970 read as gmtime has them.
    day = (T0 // 86_400_000) * 86_400_000
    moments = [day + k * 7_919_123 % 86_400_000 for k in range(500)]
    moments += [day - 1, day, day + 3_599_999, day + 3_600_000, -1, -86_400_001, 951_782_400_000]
    for ms in moments:
        seconds, millis = divmod(ms, 1000)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
        assert iso_ms(ms) == expected


def test_content_type_is_structured_cloudevents_json() -> None:
    assert CONTENT_TYPE.startswith(b"application/cloudevents+json")


def test_round6_rounds_as_round_does() -> None:
    # Records and triggers carry propensities, draws and scores to 6 digits: the
    # fast rounding must write the same numbers, ties (half to even) included.
    rng = random.Random(11)
    values = [rng.random() for _ in range(20_000)]
    values += [rng.random() * 1000 for _ in range(2_000)]
    values += [(2 * k + 1) / 2_000_000 for k in range(2_000)]  # nearest the ties
    values += [1 / 128, 0.0, -0.0, -1e-9, -0.25, 1e-12, 1.0 - 1e-12, 2e9, float("inf")]
    for x in values:
        assert repr(round6(x)) == repr(round(x, 6)), x
    assert repr(round6(float("nan"))) == "nan"
