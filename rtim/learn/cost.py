"""What one decision's learning part costs: ``python -m rtim.learn.cost``.

Features (shared and per offer), Thompson sampling and ranking of 12 candidate
offers, with models that have learned from the simulated market first (so
their weight tables are as full as a worker's), on varied contexts.
"""

from __future__ import annotations

import random
import statistics
import time

from rtim.learn.evaluate import OFFERS, Market, rank_moment
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import ModelSet


def measure(candidates: int = 12, decisions: int = 20_000, repeats: int = 5) -> list[float]:
    """Microseconds per decision, one figure per repeat."""
    models = ModelSet()
    market = Market(2)
    rng = random.Random(3)
    builder = FeatureBuilder()
    # Learn from a few thousand examples so the weight tables are realistic.
    for _ in range(4000):
        m = market.moment()
        for c in rank_moment(builder, models, m, OFFERS, rng)[:1]:
            models.learn(c.offer.id, c.features, rng.random() < 0.2)
    offers = list(OFFERS)
    while len(offers) < candidates:
        offers.append(offers[len(offers) % len(OFFERS)])
    offers = offers[:candidates]
    moments = [market.moment() for _ in range(1000)]
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(decisions):
            rank_moment(builder, models, moments[i % 1000], offers, rng)
        out.append((time.perf_counter() - start) / decisions * 1e6)
    return out


def main() -> None:
    figures = measure()
    print(
        f"one decision, 12 candidates (features, sampling, ranking): "
        f"median {statistics.median(figures):.1f} us, min {min(figures):.1f} us "
        f"over {len(figures)} runs of 20,000"
    )


if __name__ == "__main__":
    main()
