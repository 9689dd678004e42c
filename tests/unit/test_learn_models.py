import json
import math
import random
import statistics
import subprocess
import sys

import pytest

from rtim.learn.models import POOLED, ModelParams, ModelSet, OfferModel

FEATURES = ["moment.channel=web", "cart.value~7", "traits.plan=gold"]


def trained(positives: int, negatives: int) -> OfferModel:
    """A model that saw these examples, the positives spread evenly among them."""
    model = OfferModel("o", ModelParams(beta=1.0, prior_probability=0.1, epsilon=0.0))
    n = positives + negatives
    for i in range(n):
        model.learn(FEATURES, (i * positives) // n != ((i + 1) * positives) // n)
    return model


def draws(models: ModelSet, offer: str, n: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [models.score(FEATURES, [(offer, ())], rng)[0].sampled for _ in range(n)]


@pytest.mark.parametrize(("positives", "negatives"), [(0, 0), (3, 27), (30, 300)])
def test_draws_average_to_adpredictors_own_prediction(positives, negatives):
    models = ModelSet(ModelParams(beta=1.0, prior_probability=0.1, epsilon=0.0))
    models.models["o"] = trained(positives, negatives)
    samples = draws(models, "o", 20_000)
    mean = models.models["o"].mean(FEATURES)
    assert statistics.fmean(samples) == pytest.approx(mean, abs=0.01)
    assert models.score(FEATURES, [("o", ())], random.Random(1))[0].mean == pytest.approx(mean)


def test_a_model_with_evidence_samples_near_its_mean():
    models = ModelSet()
    models.models["o"] = trained(200, 1800)
    mean = models.models["o"].mean(FEATURES)
    samples = draws(models, "o", 2000)
    assert 0.07 < mean < 0.13
    assert statistics.pstdev(samples) < 0.03
    assert sum(abs(s - mean) < 0.05 for s in samples) > 0.95 * len(samples)


def test_a_new_offer_is_explored_against_a_known_one():
    # The known offer converts 10%; a new one, with its prior of 5%, still
    # wins a fair share of draws because nothing is known about it.
    models = ModelSet(
        ModelParams(beta=1.0, prior_probability=0.05, epsilon=0.0, prior_active=len(FEATURES))
    )
    models.models["known"] = trained(200, 1800)
    rng = random.Random(7)
    wins = 0
    for _ in range(2000):
        known, new = models.score(FEATURES, [("known", ()), ("new", ())], rng)
        wins += new.sampled > known.sampled
    assert 0.1 * 2000 < wins < 0.6 * 2000


def test_the_same_seed_gives_the_same_draws():
    models = ModelSet()
    models.models["o"] = trained(10, 90)
    assert draws(models, "o", 50, seed=3) == draws(models, "o", 50, seed=3)
    assert draws(models, "o", 50, seed=3) != draws(models, "o", 50, seed=4)


def test_snapshot_round_trip_through_json_is_exact():
    model = trained(17, 230)
    back = OfferModel.from_snapshot(json.loads(json.dumps(model.snapshot())))
    assert back.model.means == model.model.means
    assert back.model.variances == model.model.variances
    assert (back.examples, back.positives, back.version) == (247, 17, 247)
    assert back.params == model.params
    assert back.mean(FEATURES) == model.mean(FEATURES)
    # and it goes on learning the same way
    model.learn(FEATURES, True)
    back.learn(FEATURES, True)
    assert back.snapshot() == model.snapshot()


def test_a_set_takes_only_newer_snapshots():
    models = ModelSet()
    newer = trained(5, 5)
    assert models.swap(newer.snapshot())
    assert not models.swap(trained(1, 1).snapshot())
    assert models.models["o"].version == 10


@pytest.mark.parametrize(
    "broken",
    [{}, {"format": 99}, {"format": 1, "offer": "o"}],
)
def test_a_broken_snapshot_is_refused(broken):
    with pytest.raises(ValueError):
        OfferModel.from_snapshot(broken)


def test_a_weight_that_is_not_a_belief_is_refused():
    snap = trained(1, 1).snapshot()
    snap["weights"]["cart.value~7"] = [0.0, -1.0]
    with pytest.raises(ValueError, match="not a belief a model learns"):
        OfferModel.from_snapshot(snap)


def test_a_new_model_is_the_same_whichever_decision_meets_it_first():
    # River sets a new model's bias from the first feature set it sees; RTIM fixes the
    # size, so the same moments are decided alike in any order (a replay, or another
    # worker's interleaving of partitions).
    params = ModelParams(prior_active=12)
    few, many = ModelSet(params), ModelSet(params)
    rng = random.Random(3)
    few.score(FEATURES[:1], [("o", ())], rng)
    many.score([f"f{i}" for i in range(30)], [("o", ())], rng)
    assert few.models["o"].snapshot() == many.models["o"].snapshot()
    # and it predicts the prior for a decision of the expected size
    twelve = [f"f{i}" for i in range(params.prior_active - 1)]
    assert few.models["o"].mean(twelve) == pytest.approx(params.prior_probability)


def test_the_draw_narrows_as_evidence_grows_and_not_before():
    plain = ModelParams(beta=1.0, prior_probability=0.1, epsilon=0.0, narrow_after=10**9)
    narrowed = ModelParams(beta=1.0, prior_probability=0.1, epsilon=0.0, narrow_after=50)
    assert narrowed.narrowing(50) == 1.0  # little evidence: the whole belief
    assert narrowed.narrowing(200) == pytest.approx(0.5)
    assert ModelParams().narrowing(ModelParams().narrow_after) == 1.0
    assert narrowed.narrowing(10**6) == narrowed.narrow_floor
    spreads = {}
    for name, params in (("plain", plain), ("narrowed", narrowed)):
        models = ModelSet(params)
        model = trained(200, 1800)
        model.params = params
        models.models["o"] = model
        spreads[name] = statistics.pstdev(draws(models, "o", 4000))
    assert spreads["narrowed"] < 0.5 * spreads["plain"]
    # a new offer is drawn as widely either way
    fresh = {n: statistics.pstdev(draws(ModelSet(p), "new", 4000)) for n, p in
             (("plain", plain), ("narrowed", narrowed))}  # fmt: skip
    assert fresh["narrowed"] == pytest.approx(fresh["plain"], rel=0.05)


def pooled_set(positives: int, negatives: int, **params: float) -> ModelSet:
    """A set whose pooled model saw these examples (on FEATURES)."""
    models = ModelSet(ModelParams(beta=1.0, prior_probability=0.5, epsilon=0.0, **params))
    n = positives + negatives
    for i in range(n):
        models.learn(POOLED, FEATURES, (i * positives) // n != ((i + 1) * positives) // n)
    return models


def test_a_cold_offer_starts_from_what_every_offer_taught():
    # Every offer converts about 5% on these features; a new offer's own prior says 50%.
    models = pooled_set(50, 950, prior_active=len(FEATURES))
    pooled_mean = models.models[POOLED].mean(FEATURES)
    (new,) = models.score(FEATURES, [("new", ())], random.Random(1))
    assert pooled_mean < 0.1
    assert new.mean < 0.2
    # without a pooled model, the same new offer is scored on its prior alone
    alone = ModelSet(models.params).score(FEATURES, [("new", ())], random.Random(1))
    assert alone[0].mean == pytest.approx(0.5, abs=0.05)


def test_an_offer_with_much_evidence_is_scored_on_its_own():
    models = pooled_set(50, 950)
    models.models["o"] = trained(600, 1400)  # 30%, where the pool says 5%
    own = models.models["o"].mean(FEATURES)
    (score,) = models.score(FEATURES, [("o", ())], random.Random(1))
    assert own == pytest.approx(0.3, abs=0.03)
    assert score.mean == pytest.approx(own, abs=0.03)


def test_draws_with_a_pooled_prior_average_to_the_mean_reported():
    models = pooled_set(50, 950)
    models.models["o"] = trained(3, 27)
    samples = draws(models, "o", 20_000)
    (score,) = models.score(FEATURES, [("o", ())], random.Random(1))
    assert statistics.fmean(samples) == pytest.approx(score.mean, abs=0.01)


def test_the_pooled_model_is_not_used_when_its_spread_is_zero():
    models = pooled_set(50, 950, pooled_spread=0.0)
    models.models["o"] = trained(3, 27)
    (score,) = models.score(FEATURES, [("o", ())], random.Random(1))
    assert score.mean == pytest.approx(models.models["o"].mean(FEATURES))


def test_a_set_rebuilt_from_its_snapshots_decides_the_same_with_a_pooled_prior():
    models = pooled_set(50, 950)
    models.models["o"] = trained(40, 160)
    models.models["p"] = trained(3, 7)
    models.models["p"].offer_id = "p"
    rebuilt = ModelSet(models.params)
    for model in models.models.values():
        assert rebuilt.swap(json.loads(json.dumps(model.snapshot())))
    candidates = [("o", ()), ("p", ("affinity~2",)), ("new", ())]
    for seed in range(20):
        assert rebuilt.score(FEATURES, candidates, random.Random(seed)) == models.score(
            FEATURES, candidates, random.Random(seed)
        )


def test_the_draws_are_random_gauss_draws_and_the_spare_normal_is_handed_back():
    # A replayed decision must draw what the live one drew: the sampler takes its
    # normals as Random.gauss does, so the seed alone fixes them, and what follows
    # on the same generator is unchanged.
    models = ModelSet()
    models.models["o"] = trained(3, 27)  # few examples: drawn over its whole belief
    offers = [("o", ()), ("new", ("affinity~2",)), ("o", ("affinity~1",))]
    scores = models.score(FEATURES, offers, random.Random(5))
    reference = random.Random(5)
    for (offer, own), score in zip(offers, scores, strict=True):
        ad = models.get(offer).model
        keys = ["__bias__", *FEATURES, *own]
        total_mean = sum(ad.means.get(k, 0.0) for k in keys)
        total_var = sum(ad.variances.get(k, 1.0) for k in keys)
        s = reference.gauss(total_mean, math.sqrt(total_var))
        assert score.sampled == 0.5 * math.erfc(-s / (ad.beta * math.sqrt(2.0)))
    rng = random.Random(5)
    models.score(FEATURES, offers, rng)
    assert rng.gauss(0.0, 1.0) == reference.gauss(0.0, 1.0)


def learned(model: OfferModel, features: list[str], positives: int, n: int) -> OfferModel:
    for i in range(n):
        model.learn(features, (i * positives) // n != ((i + 1) * positives) // n)
    return model


def test_an_offer_leans_on_the_pool_for_a_key_it_has_never_seen():
    # Everyone converts half the time on "a", hardly ever once "y" is there too; the
    # offer has only ever been shown without "y". Scored on the pool's belief of the
    # sum, its own evidence on the other keys outweighed what the pool knows of "y".
    params = ModelParams(beta=1.0, prior_probability=0.5, epsilon=0.0)
    models = ModelSet(params)
    models.models["o"] = OfferModel("o", params)
    for _ in range(20):
        learned(models.get(POOLED), ["a", "y"], 1, 50)
        learned(models.get(POOLED), ["a"], 10, 20)
    learned(models.models["o"], ["a"], 100, 200)
    assert not models.models["o"].late
    (with_y,) = models.score(["a", "y"], [("o", ())], random.Random(1))
    (without,) = models.score(["a"], [("o", ())], random.Random(1))
    assert without.mean == pytest.approx(0.5, abs=0.1)
    assert with_y.mean < 0.15


def test_an_offer_met_after_the_pool_learned_is_believed_at_its_own_rate():
    # The pool has long moved the level from its bias into the keys of every moment; an
    # offer launched now starts with its bias at the prior. Weight by weight the two
    # would count the level twice and believe the new offer far below its own rate.
    r = random.Random(5)

    def moment() -> list[str]:
        return [f"g{g}={r.randrange(3)}" for g in range(12)]

    models = ModelSet()
    for _ in range(5000):
        models.learn(POOLED, moment(), r.random() < 0.25)
    launched = models.get("new")
    assert launched.late
    for _ in range(300):
        launched.learn(moment(), r.random() < 0.15)
    moments = [moment() for _ in range(200)]
    believed = statistics.fmean(
        models.score(m, [("new", ())], random.Random(1))[0].mean for m in moments
    )
    assert believed == pytest.approx(0.15, abs=0.03)
    # and it stays late through its snapshots
    rebuilt = OfferModel.from_snapshot(json.loads(json.dumps(launched.snapshot())))
    assert rebuilt.late


def test_a_key_the_offers_disagree_on_may_differ_more_from_the_pool():
    params = ModelParams(beta=1.0, prior_probability=0.5, epsilon=0.0, pooled_weight_floor=0.3)
    models = ModelSet(params)
    models.models["o"] = OfferModel("o", params)
    models.models["p"] = OfferModel("p", params)
    for offer, rate in (("o", 18), ("p", 2)):  # "x": 90% on one offer, 10% on the other
        learned(models.models[offer], ["x", "b"], rate, 20)
        learned(models.models[offer], ["b"], 10, 20)
        learned(models.get(POOLED), ["x", "b"], rate, 20)
        learned(models.get(POOLED), ["b"], 10, 20)
    spreads = models.spreads(models.models[POOLED])
    assert spreads["x"] > 4 * 0.3**2
    assert spreads.get("z", 0.3**2) == pytest.approx(0.3**2)


def test_the_weights_combined_with_the_pool_follow_the_models_as_they_learn():
    # Scoring keeps each weight's belief combined with the pool's until the offer, the
    # pool or the spreads change: a set that has scored all along scores as one rebuilt
    # from the same models' snapshots, whatever was learned in between.
    r = random.Random(7)

    def moment() -> list[str]:
        return [f"g{g}={r.randrange(3)}" for g in range(6)]

    models = ModelSet()
    moments = [moment() for _ in range(20)]
    for step in range(6):
        for _ in range(150):
            m = moment()
            converted = r.random() < 0.2
            models.learn(POOLED, m, converted)
            models.learn("o", m, converted)
        if step == 3:
            models.learn("o", moments[0], True)  # the offer alone moves
        scored = [models.score(m, [("o", ())], random.Random(1))[0] for m in moments]
        rebuilt = ModelSet()
        for model in models.models.values():
            assert rebuilt.swap(json.loads(json.dumps(model.snapshot())))
        again = [rebuilt.score(m, [("o", ())], random.Random(1))[0] for m in moments]
        assert [(s.mean, s.sampled) for s in scored] == [(s.mean, s.sampled) for s in again]
    assert not models.models["o"].late


def test_a_set_that_has_scored_many_keys_and_offers_scores_as_a_fresh_one():
    # Scoring keeps each offer's weights' combined beliefs, worked out as keys are met: a
    # moment scored after hundreds of others, over hundreds of keys and 40 offers, gets
    # the draws and means a set scoring it first gives.
    r = random.Random(3)
    offers = [f"o{n}" for n in range(40)]

    def moment() -> list[str]:
        return [f"g{g}={r.randrange(60)}" for g in range(8)]

    models = ModelSet()
    for _ in range(3000):
        m = moment()
        offer = r.choice(offers)
        converted = r.random() < 0.2
        models.learn(POOLED, m, converted)
        models.learn(offer, m, converted)
    snapshots = [json.loads(json.dumps(model.snapshot())) for model in models.models.values()]
    moments = [(moment(), (f"a~{r.randrange(4)}",)) for _ in range(300)]
    for m, own in moments:
        models.score(m, [(o, own) for o in offers], random.Random(1))
    for m, own in moments[-20:]:
        fresh = ModelSet()
        for snapshot in snapshots:
            fresh.swap(snapshot)
        candidates = [(o, own) for o in reversed(offers)]
        again = fresh.score(m, candidates, random.Random(1))
        assert again == models.score(m, candidates, random.Random(1))


def test_a_worker_does_not_wait_for_rivers_import_to_start():
    """river.linear_model imports scipy.stats, about a second: the worker's modules and
    the CLI leave it out, a worker imports it in a thread while it joins its group, and
    the first model made gets it either way."""
    code = "\n".join(
        (
            "import sys, rtim.cli, rtim.stream.worker",
            "assert not {'river', 'scipy'} & set(sys.modules), 'river imported with the worker'",
            "from rtim.learn.models import OfferModel, import_in_background",
            "import_in_background().join(120)",
            "assert 'scipy.stats' in sys.modules, 'river not imported by the thread'",
            "print(OfferModel('o').mean(['moment.channel=web']))",
        )
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    assert 0.0 < float(done.stdout) < 1.0
