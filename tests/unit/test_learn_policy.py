import random

from rtim.context.model import new_context
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import ModelSet
from rtim.learn.policy import rank
from rtim.offers.catalog import Offer

NOW = 1_780_000_000_000


def offer(id_, value, category=None):
    return Offer(id=id_, name=id_, channels=("web",), value=value, category=category)


def test_the_offer_that_converts_here_wins_and_the_candidates_say_what_they_were_scored_on():
    builder = FeatureBuilder()
    models = ModelSet()
    ctx = new_context("c")
    ctx["affinity"] = {"shoes": 10.0}
    offers = [offer("shoes-picks", 8.0, "shoes"), offer("bundle", 8.0), offer("tv", 8.0, "tv")]
    shared = builder.shared(ctx, channel="web", trigger="t", now_ms=NOW)
    for _ in range(300):
        models.learn("shoes-picks", builder.for_offer(shared, ctx, "shoes"), True)
        models.learn("bundle", shared, False)
        models.learn("tv", builder.for_offer(shared, ctx, "tv"), False)
    ranked = rank(
        builder, models, ctx, offers, channel="web", trigger="t", now_ms=NOW, rng=random.Random(1)
    )
    assert ranked[0].offer.id == "shoes-picks"
    assert ranked[0].mean > 0.9 and ranked[-1].mean < 0.1
    assert ranked[0].features == [*shared, "affinity~4"]
    assert ranked[0].score == ranked[0].sampled * 8.0
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    assert next(c for c in ranked if c.offer.id == "tv").features == [*shared, "affinity~0"]
    assert ranked[0].version == 300


def test_no_candidates_no_ranking():
    ranked = rank(
        FeatureBuilder(), ModelSet(), new_context("c"), [], channel="web", trigger="t",
        now_ms=NOW, rng=random.Random(1),
    )  # fmt: skip
    assert ranked == []
