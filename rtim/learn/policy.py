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
from operator import attrgetter
from typing import NamedTuple

from rtim.context.model import Context
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import ModelSet
from rtim.offers.catalog import Offer


class Candidate(NamedTuple):
    """One scored candidate; ``features`` are the keys it was scored on."""

    offer: Offer
    shared: list[str]
    own: tuple[str, ...]
    sampled: float
    mean: float
    score: float
    version: int

    @property
    def features(self) -> list[str]:
        return [*self.shared, *self.own]


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
    owns = builder.owns(ctx, [o.category for o in offers])
    scores = models.score(shared, zip([o.id for o in offers], owns, strict=True), rng)
    # tuple.__new__ builds the same Candidate without the named tuple's Python-level
    # __new__ (half the cost, and there is one per candidate of every decision).
    out = [
        _new(Candidate, (o, shared, own, s[1], s[2], s[1] * o.value * o.priority, s[3]))
        for o, own, s in zip(offers, owns, scores, strict=True)
    ]
    out.sort(key=_by_score, reverse=True)
    return out


_new = tuple.__new__
#: The sort key (an attrgetter: no Python-level call per candidate).
_by_score = attrgetter("score")
