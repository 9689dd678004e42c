"""Arbitration: from a fired trigger to one offer on one channel, with its reasons.

Candidates are the catalog's offers linked to the trigger, valid today and
eligible for this customer. Each is scored as

    priority = propensity x value x business priority

and the best one wins. A decision carries reason codes that say which trigger
fired, which eligibility rules passed, which offers were rejected and why,
and the features that moved the winning score.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from rtim.context.model import Context
from rtim.decide.scoring import PropensityModel, context_features, offer_features
from rtim.events import Event
from rtim.offers.catalog import Catalog, Offer
from rtim.triggers.rules import TriggerRule, first_failed

# Decision ids are derived from what caused the decision, so that a replayed
# event yields the same id and channel systems can drop the repeat.
_DECISION_NS = uuid.UUID("6f1c2a9e-3c57-4b8e-9a51-2f3b8d7c4e10")
_DECISION_NS_BYTES = _DECISION_NS.bytes


@dataclass(slots=True)
class Decision:
    """The outcome of one decision moment."""

    decision_id: str
    customer_id: str
    trigger: TriggerRule
    offer: Offer
    channel: str
    score: float
    propensity: float
    reasons: list[str]
    features: dict[str, float]
    candidates: list[tuple[str, float]]
    event: Event
    decided_ms: int
    expires_ms: int
    snapshot: dict[str, Any] = field(default_factory=dict)


def decision_id(customer_id: str, message_id: str, trigger_id: str) -> str:
    """``str(uuid.uuid5(...))`` of the cause, without building UUID objects (hot path).

    >>> decision_id("u", "m", "t") == str(uuid.uuid5(_DECISION_NS, "u\x1fm\x1ft"))
    True
    """
    name = f"{customer_id}\x1f{message_id}\x1f{trigger_id}".encode()
    raw = bytearray(hashlib.sha1(_DECISION_NS_BYTES + name).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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


def decide(
    catalog: Catalog,
    model: PropensityModel,
    rule: TriggerRule,
    event: Event,
    ctx: Context,
    *,
    now_ms: int,
    ttl_ms: int,
) -> Decision | None:
    """Pick the best eligible offer for a fired trigger, or None if no offer fits."""
    reasons = [f"trigger:{rule.id}"]
    base = None
    best: tuple[float, Offer, float, dict[str, float]] | None = None
    candidates: list[tuple[str, float]] = []
    for offer in catalog.offers_for(rule.id):
        if not offer.is_valid_at(event.timestamp_ms):
            reasons.append(f"rejected:{offer.id}:not-valid-now")
            continue
        failed = first_failed(offer.eligibility, event, ctx)
        if failed is not None:
            reasons.append(f"rejected:{offer.id}:{failed.text}")
            continue
        if base is None:
            base = context_features(ctx)
        features = offer_features(base, ctx, offer.category)
        propensity = model.predict(offer.id, features)
        score = propensity * offer.value * offer.priority
        candidates.append((offer.id, round(score, 6)))
        if best is None or score > best[0]:
            best = (score, offer, propensity, features)
    if best is None:
        return None
    score, offer, propensity, features = best
    reasons.append(f"offer:{offer.id}")
    reasons.extend(f"eligible:{c.text}" for c in offer.eligibility)
    return Decision(
        decision_id=decision_id(ctx["id"], event.message_id, rule.id),
        customer_id=ctx["id"],
        trigger=rule,
        offer=offer,
        channel=offer.channel_for(event.channel),
        score=round(score, 6),
        propensity=round(propensity, 6),
        reasons=reasons,
        features=model.contributions(offer.id, features),
        candidates=sorted(candidates, key=lambda kv: kv[1], reverse=True),
        event=event,
        decided_ms=now_ms,
        expires_ms=now_ms + ttl_ms,
        snapshot=context_snapshot(ctx),
    )
