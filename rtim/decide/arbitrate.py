"""Arbitration: from a fired trigger to one offer on one channel, with its reasons.

Candidates are the catalog's offers linked to the trigger, valid at the event's
time and eligible for this customer. Each is scored (:func:`rtim.learn.policy.rank`)
as

    score = sampled propensity x value x business priority

(x context weight x group priority under the catalog's levers), where the
propensity is a Thompson draw from the offer's learned model
(:mod:`rtim.learn.models`), so that offers with little evidence are tried in
proportion to the chance that they are the best. The best one wins. A decision
carries reason codes that say which trigger fired, which eligibility rules
passed, which offers were rejected and why, and the features that moved the
winning offer's belief; and every candidate with its mean propensity, draw,
score and model version, for the decision record (:mod:`rtim.decide.record`).
A moment where no offer is eligible is a decision too, of no offer. Under a
contact policy (:mod:`rtim.decide.policy`) suppression, cool-downs, consent,
quiet hours and caps decide which candidates remain and on which channel.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from rtim.context.model import Context
from rtim.decide import policy as contact
from rtim.events import Event
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import ModelSet
from rtim.learn.policy import Candidate, rank
from rtim.offers.catalog import Catalog, Offer
from rtim.offers.policy import NO_POLICY
from rtim.triggers.rules import TriggerRule, event_fields, first_failed

# Decision ids are derived from what caused the decision, so that a replayed
# event yields the same id and channel systems can drop the repeat.
_DECISION_NS = uuid.UUID("6f1c2a9e-3c57-4b8e-9a51-2f3b8d7c4e10")
_DECISION_NS_BYTES = _DECISION_NS.bytes


@dataclass(slots=True)
class Decision:
    """The outcome of one decision moment (``offer`` None: nothing was eligible)."""

    decision_id: str
    customer_id: str
    trigger: TriggerRule
    offer: Offer | None
    channel: str
    score: float
    propensity: float
    reasons: list[str]
    #: The winner's features that weigh most in its model, with their weights' means.
    features: dict[str, float]
    candidates: list[tuple[str, float]]
    event: Event
    #: Wall-clock time of the decision (the trigger's time and expiry).
    decided_ms: int
    expires_ms: int
    snapshot: dict[str, Any] = field(default_factory=dict)
    #: Every eligible candidate, best first, as scored.
    ranked: list[Candidate] = field(default_factory=list)
    #: End of the winner's attribution window (event time; None without a winner).
    window_end_ms: int | None = None
    #: Per ranked offer, the channel it would go to (under a contact policy; else
    #: each goes to ``offer.channel_for(event.channel)``).
    channels: dict[str, str] = field(default_factory=dict)
    #: Per ranked offer, the factors of its score beyond the sampled propensity
    #: (``weight``, ``value``, ``priority``, ``group-priority``), under a contact policy.
    levers: dict[str, dict[str, float]] = field(default_factory=dict)


def decision_id(customer_id: str, message_id: str, trigger_id: str) -> str:
    """``str(uuid.uuid5(...))`` of the cause, without building UUID objects (hot path).

    >>> decision_id("u", "m", "t") == str(uuid.uuid5(_DECISION_NS, "u\x1fm\x1ft"))
    True
    """
    digest = _NS_SHA1.copy()  # the namespace hashed once
    digest.update(f"{customer_id}\x1f{message_id}\x1f{trigger_id}".encode())
    h = digest.hexdigest()
    # The version (5) and the RFC 4122 variant set in the hex digits themselves.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_NS_SHA1 = hashlib.sha1(_DECISION_NS_BYTES)
#: A hex digit with its two high bits set to the variant's 10.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def draw_seed(decision_id: str) -> int:
    """The seed of a decision's Thompson draws: 64 bits of its (UUID) id.

    >>> draw_seed("6f1c2a9e-3c57-4b8e-9a51-2f3b8d7c4e10") == 0x6F1C2A9E3C574B8E
    True
    """
    return int(decision_id[:8] + decision_id[9:13] + decision_id[14:18], 16)


def context_snapshot(ctx: Context) -> dict[str, Any]:
    """The part of the context a channel system may want with a trigger (no PII)."""
    affinity = ctx["affinity"]
    top = sorted(affinity, key=affinity.__getitem__, reverse=True)[:3]
    return {
        "cart_value": ctx["cart"]["value"],
        "cart_items": len(ctx["cart"]["items"]),
        "orders": ctx["orders"],
        "open_issues": ctx["issues"],
        "top_categories": {k: round(affinity[k], 3) for k in top},
        "channels": {c: v["n"] for c, v in ctx["channels"].items()},
        "recent_pages": ctx["pages"][-3:],
        "events_seen": ctx["n"],
    }


def round6(x: float) -> float:
    """``round(x, 6)``, without its decimal conversion for the usual values.

    Away from a tie, the nearest multiple of 1e-6 is ``n / 1e6`` for the integer
    ``n`` nearest to ``x * 1e6`` (that product is off by far less than the margin
    kept around ties, and the division rounds as ``round``'s conversion back does);
    ties, zero (``-0.0`` too) and large or non-finite values take ``round``; a negative
    value is rounded as its magnitude, then negated (``round`` is symmetric).

    >>> all(round6(x) == round(x, 6) for x in (0.1234565, 1 / 128, 0.5, 2.5e-7, 1e-12))
    True
    """
    return _round_by(x, 1e6, 6)


def round6_all(values: Iterable[float]) -> list[float]:
    """:func:`round6` of each value, in one comprehension (a decision rounds three
    numbers of each of its candidates: a call per number was most of the cost).

    >>> xs = [0.1234565, 1 / 128, 0.5, 2.5e-7, 1e-12, 0.0, -0.25, 3.0000005, 1e12]
    >>> round6_all(xs) == [round(x, 6) for x in xs]
    True
    """
    floor = _floor
    return [
        (n + 1 if f > 0.5 else n) / 1e6
        if 0.0 < (t := x * 1e6) < 1e9 and not 0.4999 < (f := t - (n := floor(t))) < 0.5001
        else round(x, 6)
        for x in values
    ]


_floor = math.floor
#: map's default for features a model has not seen (never exhausted).
_ZEROS = itertools.repeat(0.0)
#: The C seeding under random.Random.seed.
_seed = random.Random.__mro__[1].seed  # type: ignore[attr-defined]


#: How many of the winner's features its reasons name.
TOP_FEATURES = 5


def top_features(models: ModelSet, offer_id: str, features: list[str]) -> dict[str, float]:
    """The features whose weights' means are largest in magnitude, with those means."""
    means = models.get(offer_id).model.means
    if means.keys().isdisjoint(features):
        # None learned yet (a new offer): all weigh 0.0, and the sort would keep them
        # in their order.
        return dict.fromkeys(features[:TOP_FEATURES], 0.0)
    weights = list(map(means.get, features, _ZEROS))
    # The positions sorted by the weights' magnitudes, in C (a stable sort: ties keep
    # the features' order).
    top = sorted(range(len(features)), key=list(map(abs, weights)).__getitem__, reverse=True)
    # A feature the model has not seen weighs 0.0, its own rounding.
    return {features[i]: round4(m) if (m := weights[i]) else m for i in top[:TOP_FEATURES]}


def round4(x: float) -> float:
    """``round(x, 4)``, by :func:`round6`'s arithmetic (either sign).

    >>> xs = [0.0, -0.0, 0.12345, -0.12345, 0.000049, -3.00005, 1e-9, 2.5e9, 0.33335]
    >>> all(repr(round4(x)) == repr(round(x, 4)) for x in xs)
    True
    """
    return _round_by(x, 1e4, 4)


def _round_by(x: float, scale: float, digits: int) -> float:
    """``round(x, digits)`` for ``scale`` = 10 ** digits, by arithmetic away from ties."""
    a = -x if x < 0.0 else x
    t = a * scale
    if not 0.0 < t < 1e9:
        return round(x, digits)
    n = _floor(t)
    f = t - n
    if 0.4999 < f < 0.5001:
        return round(x, digits)
    r = (n + 1 if f > 0.5 else n) / scale
    return -r if x < 0.0 else r


def decide(
    catalog: Catalog,
    models: ModelSet,
    builder: FeatureBuilder,
    rule: TriggerRule,
    event: Event,
    ctx: Context,
    *,
    now_ms: int,
    ttl_ms: int,
    window_ms: int,
    rng: random.Random,
    the_id: str | None = None,
) -> Decision:
    """Pick the best eligible offer for a fired trigger (or none, with the reasons).

    Under a contact policy (the catalog's, or the customer's withdrawn consent) the
    candidates pass :mod:`rtim.decide.policy` too, and the levers weigh them.
    ``the_id`` is the decision's :func:`decision_id` when the caller has it already.
    """
    reasons = [f"trigger:{rule.id}"]
    at_ms = event.timestamp_ms
    policy = catalog.policy
    if policy is None and not contact.withdrawn(ctx):
        eligible = _eligible(catalog.offers_for(rule.id), event, ctx, at_ms, reasons)
        channels = None
    else:
        eligible, channels = _within_policy(
            catalog, policy or NO_POLICY, rule, event, ctx, at_ms, reasons
        )
    if the_id is None:
        the_id = decision_id(ctx["id"], event.message_id, rule.id)
    # The draws are seeded by the decision: the same moment scored by the same
    # models is decided the same way (a replayed event gives the same trigger).
    if type(rng) is random.Random:
        # Random.seed of an int without its Python-level checks: the same state.
        _seed(rng, draw_seed(the_id))
        rng.gauss_next = None  # type: ignore[attr-defined]
    else:
        rng.seed(draw_seed(the_id))
    ranked = rank(
        builder,
        models,
        ctx,
        eligible,
        channel=event.channel,
        trigger=rule.id,
        now_ms=at_ms,
        rng=rng,
    )
    levers: dict[str, dict[str, float]] = {}
    if channels is not None and ranked:
        ranked = _weigh(policy or NO_POLICY, event, ctx, ranked, reasons, levers)
    if not ranked:
        reasons.append("no-offer:none-eligible")
        return Decision(
            decision_id=the_id,
            customer_id=ctx["id"],
            trigger=rule,
            offer=None,
            channel=event.channel,
            score=0.0,
            propensity=0.0,
            reasons=reasons,
            features={},
            candidates=[],
            event=event,
            decided_ms=now_ms,
            expires_ms=now_ms + ttl_ms,
        )
    best = ranked[0]
    offer = best.offer
    reasons.append(f"offer:{offer.id}")
    reasons.extend(f"eligible:{c.text}" for c in offer.eligibility)
    if channels is not None:
        reasons.extend(f"lever:{offer.id}:{k}={v:g}" for k, v in levers[offer.id].items())
    candidates = list(zip(map(_offer_id, ranked), round6_all(map(_score, ranked)), strict=True))
    return Decision(
        decision_id=the_id,
        customer_id=ctx["id"],
        trigger=rule,
        offer=offer,
        channel=offer.channel_for(event.channel) if channels is None else channels[offer.id],
        score=candidates[0][1],
        propensity=round6(best.mean),
        reasons=reasons,
        features=top_features(models, offer.id, best.features),
        candidates=candidates,
        event=event,
        decided_ms=now_ms,
        expires_ms=now_ms + ttl_ms,
        snapshot=context_snapshot(ctx),
        ranked=ranked,
        window_end_ms=window_end(offer, at_ms, window_ms),
        channels={} if channels is None else {c.offer.id: channels[c.offer.id] for c in ranked},
        levers=levers,
    )


def window_end(offer: Offer, at_ms: int, window_ms: int) -> int:
    """When the attribution window of ``offer`` made at ``at_ms`` ends (``window_ms``: the
    default window, for an offer without its own)."""
    return at_ms + (offer.attribution_window_ms or window_ms)


_offer_id = attrgetter("offer.id")
_score = attrgetter("score")


def _admitted(offer: Offer, event: Event, ctx: Context, at_ms: int, reasons: list[str]) -> bool:
    """Whether the offer is valid at the event's time and eligible (else why not, in
    the reasons)."""
    if not offer.is_valid_at(at_ms):
        reasons.append(f"rejected:{offer.id}:not-valid-now")
        return False
    failed = first_failed(offer.eligibility, event, ctx)
    if failed is not None:
        reasons.append(f"rejected:{offer.id}:{failed.text}")
        return False
    return True


def _eligible(
    offers: tuple[Offer, ...], event: Event, ctx: Context, at_ms: int, reasons: list[str]
) -> list[Offer]:
    """:func:`_admitted` of each offer, with each condition text evaluated once: offers
    of a catalog share their eligibility rules, and the context does not change
    meanwhile."""
    held: dict[str, bool] = {}
    out = []

    def fields() -> dict[str, Any]:
        return event_fields(event)

    for offer in offers:
        if not offer.is_valid_at(at_ms):
            reasons.append(f"rejected:{offer.id}:not-valid-now")
            continue
        for cond in offer.eligibility:
            ok = held.get(cond.text)
            if ok is None:
                ok = held[cond.text] = cond.test(ctx, fields)
            if not ok:
                reasons.append(f"rejected:{offer.id}:{cond.text}")
                break
        else:
            out.append(offer)
    return out


def _within_policy(
    catalog: Catalog,
    policy: Any,
    rule: TriggerRule,
    event: Event,
    ctx: Context,
    at_ms: int,
    reasons: list[str],
) -> tuple[list[Offer], dict[str, str]]:
    """The candidates the contact policy allows, and the channel each would go to."""
    suppressions = contact.active_suppressions(policy, event, ctx) if policy.suppression else []
    offers = [(o, "") for o in catalog.offers_for(rule.id)]
    if suppressions:
        offers += contact.raised(catalog, suppressions, {o.id for o, _ in offers}, reasons)
    quiet = contact.is_quiet(policy, ctx, at_ms)
    eligible: list[Offer] = []
    channels: dict[str, str] = {}
    for offer, raised_by in offers:
        if not _admitted(offer, event, ctx, at_ms, reasons):
            continue
        if suppressions:
            by = contact.suppressed_by(suppressions, offer)
            if by is not None:
                reasons.append(f"suppressed:{offer.id}:{by.id}")
                continue
        if contact.cooling(policy, ctx, offer, at_ms):
            reasons.append(f"rejected:{offer.id}:cooldown")
            continue
        channel, passed = contact.place(policy, ctx, offer, event.channel, at_ms, quiet)
        if channel is None:
            reasons.extend(f"rejected:{offer.id}:{why}" for why in passed)
            continue
        if raised_by:
            reasons.append(f"raised:{offer.id}:{raised_by}")
        reasons.extend(f"skipped:{offer.id}:{why}" for why in passed)
        channels[offer.id] = channel
        eligible.append(offer)
    return eligible, channels


def _weigh(
    policy: Any,
    event: Event,
    ctx: Context,
    ranked: list[Candidate],
    reasons: list[str],
    levers: dict[str, dict[str, float]],
) -> list[Candidate]:
    """Multiply the scores by the context weights and group priorities; best first again."""
    weights = contact.weights_for(policy, event, ctx, [c.offer for c in ranked])
    groups = policy.groups
    out = []
    moved = False
    for c in ranked:
        offer = c.offer
        factor = 1.0
        for weight_id, w in weights.get(offer.id, ()):
            reasons.append(f"weight:{weight_id}:{offer.id}={w:g}")
            factor *= w
        group = groups.get(offer.group, 1.0) if offer.group is not None else 1.0
        levers[offer.id] = {
            "weight": factor,
            "value": offer.value,
            "priority": offer.priority,
            "group-priority": group,
        }
        factor *= group
        if factor != 1.0:
            c = c._replace(score=c.score * factor)
            moved = True
        out.append(c)
    if moved:
        out.sort(key=_by_score, reverse=True)
    return out


def _by_score(candidate: Candidate) -> float:
    return candidate.score
