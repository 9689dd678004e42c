"""Choosing among a decision's candidate offers with the learned models.

This is what the engine calls once per decision moment, after eligibility:
the shared features are built once, each candidate adds its own, every
candidate is Thompson-sampled in one pass, and the score is

    score = sampled propensity x value x business priority

The winner is the highest score; the mean propensity (not the draw) is what
reasons and decision records report as the model's belief.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from rtim.context.model import Context
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import ModelSet
from rtim.offers.catalog import Offer


@dataclass(frozen=True, slots=True)
class Candidate:
    offer: Offer
    features: list[str]
    sampled: float
    mean: float
    score: float
    version: int


def rank(
    builder: FeatureBuilder,
    models: ModelSet,
    ctx: Context,
    offers: Sequence[Offer],
    *,
    channel: str,
    trigger: str,
    now_ms: int,
    rng: random.Random,
) -> list[Candidate]:
    """Score every candidate offer of one decision; best first (empty if none)."""
    if not offers:
        return []
    shared = builder.shared(ctx, channel=channel, trigger=trigger, now_ms=now_ms)
    per_offer = [builder.for_offer(shared, ctx, offer.category) for offer in offers]
    scores = models.score(zip([o.id for o in offers], per_offer, strict=True), rng)
    out = [
        Candidate(o, f, s.sampled, s.mean, s.sampled * o.value * o.priority, s.version)
        for o, f, s in zip(offers, per_offer, scores, strict=True)
    ]
    out.sort(key=lambda c: c.score, reverse=True)
    return out
