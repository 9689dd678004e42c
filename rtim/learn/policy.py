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

from rtim.context.model import Context
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import Candidate, ModelSet
from rtim.offers.catalog import Offer

__all__ = ["Candidate", "rank"]


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
    # The scored candidates straight from the draws (no Score per candidate between).
    return models.rank(shared, offers, owns, rng)
