import random
from random import Random

from rtim.context.model import new_context
from rtim.learn.features import FeatureBuilder
from rtim.learn.models import ModelSet
from rtim.learn.policy import rank
from rtim.offers.catalog import Offer

NOW = 1_780_000_000_000


def offer(id_, value, category=None, priority=1.0):
    return Offer(
        id=id_, name=id_, channels=("web",), value=value, category=category, priority=priority
    )


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


def test_the_ranking_draws_what_scoring_draws_and_weighs_it_by_value_and_priority():
    builder = FeatureBuilder()
    models = ModelSet()
    ctx = new_context("c")
    ctx["affinity"] = {"shoes": 10.0}
    offers = [
        offer("shoes-picks", 8.0, "shoes", priority=2.0),
        offer("bundle", 3.0),
        offer("tv", 5.0, "tv", priority=0.5),
    ]
    shared = builder.shared(ctx, channel="web", trigger="t", now_ms=NOW)
    for i in range(40):
        models.learn("shoes-picks", builder.for_offer(shared, ctx, "shoes"), i % 3 == 0)
        models.learn("tv", builder.for_offer(shared, ctx, "tv"), i % 5 == 0)
    owns = builder.owns(ctx, [o.category for o in offers])
    for seed in range(20):
        scores = models.score(
            shared, [(o.id, own) for o, own in zip(offers, owns, strict=True)], Random(seed)
        )
        ranked = rank(
            builder, models, ctx, offers, channel="web", trigger="t", now_ms=NOW, rng=Random(seed)
        )
        by_offer = {c.offer.id: c for c in ranked}
        for o, s in zip(offers, scores, strict=True):
            c = by_offer[o.id]
            assert (c.sampled, c.mean, c.version) == (s.sampled, s.mean, s.version)
            assert c.score == s.sampled * o.value * o.priority
        assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
