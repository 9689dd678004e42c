"""Per-offer propensity models that explore: river's AdPredictor, Thompson sampling.

Each offer has one :class:`river.linear_model.AdPredictor`: a Bayesian probit
regression that keeps a Gaussian belief N(mean, variance) per feature weight
(and an always-active bias) and learns P(conversion | features) online.

Thompson sampling
-----------------
AdPredictor's mean prediction for an active set of features is
``Phi(M / sqrt(V + beta**2))`` with ``M`` the sum of the active weights'
means and ``V`` the sum of their variances. That is the average over the
weights' belief of the probit likelihood ``Phi(s / beta)``, where
``s ~ N(M, V)`` is the weights' sum. A Thompson draw samples the weights
from the belief and answers with the likelihood under them: one normal draw
``s ~ N(M, V)`` per candidate and the sampled propensity ``Phi(s / beta)``.
Its expectation is exactly ``predict_proba_one``; an offer with little
evidence (large ``V``) is drawn over a wide range and so wins in proportion to
the chance that it is the best, one with much evidence is drawn near its mean.
Past ``ModelParams.narrow_after`` examples the draw's spread is narrowed (see
there: the belief has no covariances, so ``V`` overstates the uncertainty of
the sum); the draws then average to ``Phi(M / sqrt(k**2 V + beta**2))`` for the
narrowing factor ``k``, while the mean reported stays AdPredictor's.

The pooled prior
----------------
One more model, :data:`POOLED` (``__shared__``), learns from every offer's
examples: what makes customers convert whichever offer it is (the offer's
own category affinity, a service issue, the channel). It is learned and
snapshotted like an offer (its training records are every example again,
keyed ``__shared__``), so learners stay partitioned by key. When it is there,
an offer is scored on the pooled belief of the sum of its weights, widened
by ``ModelParams.pooled_spread`` (how much offers differ), as its prior, and
its own evidence on top: the offer's belief divided by its own prior, as
Gaussians over the sum (precisions add). A cold offer is drawn around what
every offer taught; as its own evidence grows it takes over, and an offer
with much evidence is scored on it alone. Its own evidence is counted with
the same narrowing as its draws (the diagonal belief overstates the sum's
variance, so it understates the evidence). The mean reported is then the
combined belief's.

With ``ModelParams.pooled_weight_floor`` (the default) the same is done weight
by weight rather than on the sum: each of the offer's weights is drawn around
the pooled belief of the same weight, widened by that key's spread (estimated
from how the offers disagree with the pool, :meth:`ModelSet.spreads`), with the
offer's own evidence on the weight on top, and the sum of those is drawn. A key
the offer has never seen is then what the pool believes of it, not a zero that
the offer's evidence on its other keys outweighs. An offer first met once the
pool had learned :data:`LATE_AFTER` examples (:attr:`OfferModel.late`) keeps the
prior on the sum. Each weight's combined belief is worked out when first needed and
kept until the offer, the pool or the spreads change.

Snapshots
---------
:meth:`OfferModel.snapshot` is a JSON-able dict (weights as means and
variances, evidence counts, version); :meth:`OfferModel.from_snapshot` rebuilds
the same model exactly (floats survive JSON's shortest round-trip repr).
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from river.linear_model import AdPredictor

    from rtim.offers.catalog import Offer

#: Snapshot format version (not the model's version, which counts its updates).
SNAPSHOT_FORMAT = 1
#: AdPredictor's own key for its always-active bias weight.
BIAS = "__bias__"
#: The key of the pooled model (training records and snapshots): every offer's
#: examples, learned as one offer's.
POOLED = "__shared__"
_SQRT2 = math.sqrt(2.0)
_TWOPI = 2.0 * math.pi  # as random.py has it
#: Defaults of unseen features, for map(dict.get, keys, ...): never exhausted.
_ZEROS = itertools.repeat(0.0)
_ONES = itertools.repeat(1.0)
_LOW = 1e-12
_HIGH = 1.0 - 1e-12
#: The pooled prior's spreads per key are estimated again each this many pooled
#: examples (see :meth:`ModelSet.spreads`); each 50, seeds 1-5 of ``rtim evaluate`` gave
#: 87.7% of the oracle and 87.2% for the new offer against 86.9% and 90.5%.
SPREAD_EVERY = 200
#: The largest variance by which an offer's weight may differ from the pool's.
MAX_SPREAD2 = 1e6
#: An offer whose model is first made once the pooled model has learned this many
#: examples is a late one (:attr:`OfferModel.late`: an offer brought in after the others
#: have been learning, such as ``rtim evaluate``'s new offer, met after 10,000). Not on
#: the first example: on a worker, an offer's model is made when its first example
#: reaches the learner, by which time the pool, which learns every offer's, has some.
LATE_AFTER = 1000


#: The beliefs a learned weight can hold: every weight starts at N(0, 1) (the bias at a
#: mean set by ``prior_probability``) and learning only narrows it; a hundred thousand
#: examples of one outcome take a mean to about +-10 and a variance to about 0.06. A
#: snapshot with a weight outside these is not a learner's, and would break the pooled
#: prior's arithmetic (an infinite spread, a zero precision) for every decision.
MAX_WEIGHT_MEAN = 1_000.0
MIN_WEIGHT_VARIANCE = 1e-9
MAX_WEIGHT_VARIANCE = 1.0 + 1e-9
#: Most weights an offer's model keeps, its bias included. Every distinct feature key a
#: model learns is a weight of it, and keys from open-ended values (pages, trait values)
#: would grow a model, its snapshot on the models topic and every worker's memory without
#: bound. Past this, the weights whose belief is closest to the prior are forgotten
#: (:meth:`OfferModel.prune`), down to :data:`PRUNED_TO` of them.
MAX_WEIGHTS = 10_000
PRUNED_TO = 9_000


def is_late(pooled_examples: int) -> bool:
    """Whether an offer whose model is made when the pooled model has learned
    ``pooled_examples`` is a late one (:attr:`OfferModel.late`)."""
    return pooled_examples >= LATE_AFTER


def ad_predictor() -> type[AdPredictor]:
    """river's AdPredictor, imported when the first model is made rather than with this
    module: ``river.linear_model`` imports scipy.stats, about a second of CPU that a
    process which never scores (the CLI, a worker that fails its checks) is spared and
    that a worker spends while it joins its group (:func:`import_in_background`)."""
    from river.linear_model import AdPredictor

    return AdPredictor


def import_in_background() -> threading.Thread:
    """Import river's models in a thread of their own, while the caller waits on the
    network (a worker joining its group takes seconds): the first model made then finds
    them imported. A model made before the thread is done waits for its import."""
    thread = threading.Thread(target=ad_predictor, name="rtim-import-models", daemon=True)
    thread.start()
    return thread


#: The range of each real-valued :class:`ModelParams` field: (low, high, (low
#: included, high included)).
_PARAM_RANGES: dict[str, tuple[float, float, tuple[bool, bool]]] = {
    "beta": (0.0, math.inf, (False, False)),
    "prior_probability": (0.0, 1.0, (False, False)),
    "epsilon": (0.0, 1.0, (True, False)),
    "exploration": (0.0, math.inf, (True, False)),
    "narrow_floor": (0.0, 1.0, (False, True)),
    "pooled_spread": (0.0, math.inf, (True, False)),
    "pooled_weight_floor": (0.0, math.inf, (True, False)),
}


@dataclass(frozen=True, slots=True)
class ModelParams:
    """AdPredictor's parameters, the same for every offer.

    ``beta`` is the label noise (probit scale). River keeps every unseen
    weight at N(0, 1), so with a dozen active features a small ``beta`` makes
    each example move the belief a lot and the draws of a new offer all but
    0 or 1; 5 learned fastest on the simulated market (``rtim evaluate``;
    0.1, 0.3, 1, 3, 8 and 12 were tried). ``prior_probability`` is the
    conversion rate a new offer is believed to have before any evidence (on
    the optimistic side, which makes new offers tried sooner);
    ``epsilon`` how far each update pulls the weights it touches back to the
    prior, which keeps some exploration alive and lets the model follow drift
    (AdPredictor's default 0.05 forgets within some twenty examples per weight,
    too fast for conversions that are rare).
    """

    beta: float = 5.0
    prior_probability: float = 0.2
    epsilon: float = 0.001
    #: Scales the spread of the Thompson draw (1 is plain Thompson sampling;
    #: less explores less, 0 always takes the mean).
    exploration: float = 1.0
    #: How many features a decision has, about (the default spec gives 10-14). River
    #: sets a new model's bias so that its prediction is ``prior_probability`` for the
    #: size of the first feature set it meets; a fixed size makes a new model the same
    #: whichever decision meets it first (the same moments, in any order, are
    #: decided the same way).
    prior_active: int = 12
    #: The Thompson draw of an offer with more than ``narrow_after`` examples is
    #: narrowed by sqrt(narrow_after / examples), down to ``narrow_floor`` of its width.
    #: AdPredictor keeps one variance per weight and no covariances, so the spread of
    #: a sum of weights that are always active together (the bias and the common
    #: features) is overstated more and more as evidence grows, and plain draws keep
    #: exploring offers long known to be worse. An offer with little evidence is drawn
    #: over its whole belief. On ``rtim evaluate`` (seeds 1-5) narrowing took RTIM
    #: from 77.9% to 80.6% of the oracle and the new offer from 75.6% to 85.6% of its
    #: moments in the last quarter (30-400 and floors 0.1-0.3 were tried). With
    #: dismissals as early negatives and the pooled prior, 100 beat 200 (85.8% against
    #: 85.1%, new offer 87.2% against 83.2%) and 60 (84.6%); alone, without them,
    #: 100 did no better than 200 (80.0% against 80.6%).
    narrow_after: int = 100
    narrow_floor: float = 0.15
    #: The sd (on AdPredictor's scale of the sum of weights) by which an offer may
    #: differ from the pooled model's belief, its prior when a pooled model is
    #: there; 0 scores every offer on its own model alone. On ``rtim evaluate``
    #: (seeds 1-5) 1.0 did better than 0.7 and 2 (85.8% of the oracle against 85.2%
    #: and 84.5%): smaller makes offers unlike the average (free shipping) wait
    #: longer to be tried, larger gives up what the pool teaches the cold ones.
    pooled_spread: float = 1.0
    #: The least sd (on AdPredictor's scale) by which an offer's weight may differ from
    #: the pooled model's belief of the same weight; 0 puts the pooled prior on the sum
    #: instead (``pooled_spread``). Each key's spread is estimated from how much the
    #: offers' own evidence on it disagrees with the pool (see :meth:`ModelSet.spreads`)
    #: and floored here, so that an offer can leave the pool where its evidence says
    #: so. On ``rtim evaluate`` 0.3 did best of 0.1-0.5 (86.9% of the oracle and 90.5%
    #: for the new offer on seeds 1-5, 88.1% and 90.0% on 6-10, against 85.8%, 87.2%
    #: and 86.1%, 85.7% on the sum).
    pooled_weight_floor: float = 0.3

    def __post_init__(self) -> None:
        """Refuse parameters no model can be learned or scored with (a snapshot carries
        its model's parameters: one written by anything but a learner must not make
        every decision divide by zero)."""
        for name, (low, high, closed) in _PARAM_RANGES.items():
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value):
                raise ValueError(f"model parameter {name} must be a finite number, got {value!r}")
            if not (low <= value if closed[0] else low < value) or not (
                value <= high if closed[1] else value < high
            ):
                shown = f"{'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"
                raise ValueError(f"model parameter {name} must be in {shown}, got {value!r}")
        for name in ("prior_active", "narrow_after"):
            count = getattr(self, name)
            if type(count) is not int or count < 1:
                raise ValueError(f"model parameter {name} must be an integer >= 1, got {count!r}")

    def narrowing(self, examples: int) -> float:
        """The factor on the draw's spread of an offer with this many examples."""
        if examples <= self.narrow_after:
            return 1.0
        return max(self.narrow_floor, math.sqrt(self.narrow_after / examples))


#: (version, its weights' means.get and variances.get, the bias's mean and variance,
#: narrowing, 1/narrowing**2, exploration, beta, beta**2, the prior of the sum's mean).
DrawTerms = tuple[
    int,
    Callable[[str, float], float],
    Callable[[str, float], float],
    float,
    float,
    float,
    float,
    float,
    float,
    float,
    float,
]


class OfferModel:
    """One offer's model and its evidence counts."""

    __slots__ = (
        "_draw",
        "examples",
        "late",
        "model",
        "offer_id",
        "params",
        "positives",
        "prior_mean",
        "version",
    )

    def __init__(
        self, offer_id: str, params: ModelParams = ModelParams(), *, late: bool = False
    ) -> None:
        self.offer_id = offer_id
        self.params = params
        #: First met once the pooled model had learned :data:`LATE_AFTER` examples
        #: (kept in snapshots). Its
        #: evidence is on its bias first (active in every example), from the prior,
        #: while the pool has long moved its level between its bias and the keys of
        #: every moment (channel, trigger, issues...): weight by weight its own bias
        #: and the pool's keys would count the level twice, so such an offer takes
        #: the pooled prior on the sum. Offers that start with the pool grow with it.
        self.late = late
        self.model = ad_predictor()(
            beta=params.beta, prior_probability=params.prior_probability, epsilon=params.epsilon
        )
        self.examples = 0
        self.positives = 0
        self.version = 0
        self._ensure_bias(params.prior_active)
        #: The bias's mean before any evidence (the prior of the sum's mean).
        self.prior_mean: float = self.model.means[BIAS]
        #: What scoring reads of the model, with the version it was read at (see
        #: :meth:`draw_terms`).
        self._draw: DrawTerms | None = None

    def draw_terms(self) -> DrawTerms:
        """What scoring reads of the model for every candidate: the same for every
        decision until the model learns again (its version moves), so read once per
        version rather than per candidate."""
        draw = self._draw
        if draw is None or draw[0] != self.version:
            params = self.params
            narrow = params.narrowing(self.examples)
            beta = self.model.beta
            means = self.model.means
            variances = self.model.variances
            draw = self._draw = (
                self.version,
                means.get,
                variances.get,
                means[BIAS],
                variances[BIAS],
                narrow,
                1.0 / (narrow * narrow),
                params.exploration,
                beta,
                beta * beta,
                self.prior_mean,
            )
        return draw

    def _ensure_bias(self, n_active: int) -> None:
        if BIAS not in self.model.means:
            # AdPredictor sets its bias lazily from the size of the first active
            # set it sees (predict or learn); do the same through its public API.
            self.model.predict_proba_one(dict.fromkeys(range(n_active), 1))  # type: ignore[no-untyped-call]

    def learn(self, features: Sequence[str], converted: bool) -> None:
        """Learn one example: these features led (or did not lead) to a conversion."""
        self.model.learn_one(dict.fromkeys(features, 1), bool(converted))  # type: ignore[no-untyped-call]
        self.examples += 1
        self.positives += 1 if converted else 0
        self.version += 1
        if len(self.model.means) > MAX_WEIGHTS:
            self.prune(PRUNED_TO)

    def prune(self, keep: int) -> int:
        """Forget all but the ``keep`` most informative weights; returns how many went.

        A weight's information is how far its belief N(m, v) is from the prior N(0, 1)
        every unseen key has (the Kullback-Leibler divergence, ``(v + m**2 - 1 - ln v)
        / 2``): the least informative go back to the prior, as if their keys had never
        been met. The bias always stays. Deterministic (ties go by key), so a learner
        and a snapshot of it agree.

        >>> m = OfferModel("o")
        >>> for i in range(5):
        ...     m.learn(["common", f"rare-{i}"], i % 2 == 0)
        >>> m.prune(2), sorted(m.model.means)
        (5, ['__bias__', 'common'])
        """
        means, variances = self.model.means, self.model.variances
        if len(means) <= keep:
            return 0
        log = math.log
        ranked = sorted(
            (k for k in means if k != BIAS),
            key=lambda k: (variances[k] + means[k] ** 2 - 1.0 - log(variances[k]), k),
            reverse=True,
        )
        gone = ranked[max(0, keep - 1) :]
        for key in gone:
            del means[key], variances[key]
        return len(gone)

    def mean(self, features: Sequence[str]) -> float:
        """The mean propensity (AdPredictor's prediction)."""
        proba = self.model.predict_proba_one(dict.fromkeys(features, 1))  # type: ignore[no-untyped-call]
        return float(proba[True])

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able dict of everything needed to rebuild this model exactly."""
        means = self.model.means
        variances = self.model.variances
        return {
            "format": SNAPSHOT_FORMAT,
            "offer": self.offer_id,
            "version": self.version,
            "examples": self.examples,
            "positives": self.positives,
            "late": self.late,
            "params": {
                "beta": self.params.beta,
                "prior_probability": self.params.prior_probability,
                "epsilon": self.params.epsilon,
                "exploration": self.params.exploration,
                "prior_active": self.params.prior_active,
                "narrow_after": self.params.narrow_after,
                "narrow_floor": self.params.narrow_floor,
                "pooled_spread": self.params.pooled_spread,
                "pooled_weight_floor": self.params.pooled_weight_floor,
            },
            "weights": {k: [means[k], variances[k]] for k in means},
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> OfferModel:
        """Rebuild a model from :meth:`snapshot`; raises ValueError, naming the field, for
        anything that is not one (the models topic is read by every worker: a record
        of the wrong shape must be refused there, not fail later in scoring).

        >>> OfferModel.from_snapshot({**OfferModel("o").snapshot(), "version": "9"})
        Traceback (most recent call last):
        ...
        ValueError: not a model snapshot: version must be an integer >= 0, got '9'
        """
        try:
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"unknown snapshot format {data.get('format')!r}")
            offer = data.get("offer")
            if type(offer) is not str or not offer:
                raise ValueError(f"offer must be a non-empty string, got {offer!r}")
            version, examples, positives = (
                count(data, "version"),
                count(data, "examples"),
                count(data, "positives"),
            )
            if positives > examples:
                raise ValueError(f"{positives} positives of {examples} examples")
            if version != examples:
                # One update per example learned (OfferModel.learn).
                raise ValueError(f"version {version} is not its examples' count {examples}")
            late = data.get("late", False)
            if type(late) is not bool:
                raise ValueError(f"late must be true or false, got {late!r}")
            params = data.get("params")
            if not isinstance(params, dict):
                raise ValueError(f"params must be an object, got {params!r:.80}")
            weights = data.get("weights")
            if not isinstance(weights, dict) or BIAS not in weights:
                raise ValueError("weights must be an object of [mean, variance] with the bias")
            model = cls(offer, ModelParams(**params), late=late)
            model.version, model.examples, model.positives = version, examples, positives
            means = model.model.means
            variances = model.model.variances
            for key, belief in weights.items():
                if type(belief) is not list or len(belief) != 2:
                    raise ValueError(f"weight {key!r} is not a [mean, variance] pair")
                mean, variance = belief
                if not (
                    type(mean) in (int, float)
                    and type(variance) in (int, float)
                    and -MAX_WEIGHT_MEAN <= mean <= MAX_WEIGHT_MEAN
                    and MIN_WEIGHT_VARIANCE <= variance <= MAX_WEIGHT_VARIANCE
                ):
                    raise ValueError(
                        f"weight {key!r} is not a belief a model learns: mean {mean!r:.24} "
                        f"(within +-{MAX_WEIGHT_MEAN:g}), variance {variance!r:.24} (within "
                        f"[{MIN_WEIGHT_VARIANCE:g}, {MAX_WEIGHT_VARIANCE:g}])"
                    )
                means[key] = float(mean)
                variances[key] = float(variance)
        except TypeError as exc:  # e.g. an unknown parameter
            raise ValueError(f"not a model snapshot: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"not a model snapshot: {exc}") from None
        return model


def count(data: dict[str, Any], field: str) -> int:
    """``data[field]`` if it is an integer >= 0 (not a bool, a float or a string);
    raises ValueError naming the field otherwise."""
    value = data.get(field)
    if type(value) is not int or value < 0:
        raise ValueError(f"{field} must be an integer >= 0, got {value!r:.40}")
    return value


class Score(NamedTuple):
    """One candidate's propensities: the Thompson draw and the mean (for reasons)."""

    offer_id: str
    sampled: float
    mean: float
    version: int


class Candidate(NamedTuple):
    """One scored candidate of a decision; ``features`` are the keys it was scored on."""

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


#: The ranking's sort key (C-level: no Python call per candidate).
_by_score = attrgetter("score")


class _Means(dict[str, float]):
    """One offer's weights' combined means by key, each worked out when first looked up
    (by ``work``: mean and variance), its variance kept in ``variances`` at the same time:
    scoring sums a candidate's weights with ``map`` and ``sum`` (the loop in C), looking
    up the means first."""

    __slots__ = ("variances", "work")

    def __init__(self, work: Callable[[str], tuple[float, float]]) -> None:
        super().__init__()
        self.work = work
        self.variances: dict[str, float] = {}

    def __missing__(self, key: str) -> float:
        mean, self.variances[key] = self.work(key)
        self[key] = mean
        return mean


class ModelSet:
    """The models of every offer, created on first use."""

    __slots__ = ("_combined", "_spreads", "_spreads_made", "models", "params")

    def __init__(self, params: ModelParams = ModelParams()) -> None:
        self.params = params
        self.models: dict[str, OfferModel] = {}
        self._spreads: tuple[int, dict[str, float]] = (-1, {})
        #: How many times the spreads were worked out (the weights' combined beliefs
        #: kept by scoring are for one of them).
        self._spreads_made = 0
        #: Per offer, its weights' combined beliefs with the pooled prior, as scoring
        #: works them out: (offer version, pooled version, spreads made), the look-ups of
        #: the means and the variances by key (:class:`_Means`), and the bias's mean and
        #: variance.
        self._combined: dict[str, tuple[tuple[int, int, int], Any, Any, float, float]] = {}

    def get(self, offer_id: str) -> OfferModel:
        model = self.models.get(offer_id)
        if model is None:
            pooled = self.models.get(POOLED)
            model = self.models[offer_id] = OfferModel(
                offer_id, self.params, late=pooled is not None and is_late(pooled.examples)
            )
        return model

    def spreads(self, pooled: OfferModel) -> dict[str, float]:
        """Per key, the variance by which an offer's weight may differ from the pool's.

        Empirical Bayes, a moment estimate per key: each offer's own evidence on the
        weight (its belief over its own prior, precisions subtract) has a mean ``mu``
        and precision ``e``; ``sum(e * (mu - pooled)**2) - n`` over ``sum(e)`` is what
        the offers' spread around the pool adds to their evidence's own noise. Floored
        at ``pooled_weight_floor**2`` (unseen keys too). A late offer's evidence counts
        too: without it, the new offer of ``rtim evaluate`` took 81.2% of its moments
        instead of 90.5% (seeds 1-5) and 86.0% instead of 90.0% (6-10), as what it
        shows of how offers differ (on the plan, an empty cart) frees the weights of
        the offers it competes with. Worked out again each
        :data:`SPREAD_EVERY` pooled examples, the same in every process that holds the
        same models.
        """
        bucket = pooled.examples // SPREAD_EVERY
        if self._spreads[0] == bucket:
            return self._spreads[1]
        floor2 = self.params.pooled_weight_floor**2
        pooled_means = pooled.model.means
        sums: dict[str, list[float]] = {}
        for offer_id, model in self.models.items():
            if offer_id == POOLED:
                continue
            variances = model.model.variances
            for key, mean in model.model.means.items():
                variance = variances[key]
                evidence = 1.0 / variance - 1.0
                if evidence <= 1e-9:
                    continue
                prior = model.prior_mean if key == BIAS else 0.0
                mu = (mean / variance - prior) / evidence
                acc = sums.setdefault(key, [0.0, 0.0, 0.0])
                acc[0] += evidence * (mu - pooled_means.get(key, 0.0)) ** 2
                acc[1] += 1.0
                acc[2] += evidence
        # Floored, and bounded (a spread that large is no prior at all) so that no
        # precision worked out from it is ever zero.
        out = {key: min(MAX_SPREAD2, max(floor2, (q - n) / e)) for key, (q, n, e) in sums.items()}
        self._spreads = (bucket, out)
        self._spreads_made += 1
        return out

    def swap(self, snapshot: dict[str, Any]) -> bool:
        """Take a newer snapshot of an offer's model; False if it is not newer."""
        current = self.models.get(snapshot.get("offer", ""))
        if current is not None and current.version >= snapshot.get("version", -1):
            return False
        model = OfferModel.from_snapshot(snapshot)
        self.models[model.offer_id] = model
        # The spreads follow the models a set holds, not the order they came in.
        self._spreads = (-1, {})
        return True

    def learn(self, offer_id: str, features: Sequence[str], converted: bool) -> None:
        self.get(offer_id).learn(features, converted)

    def score(
        self,
        shared: Sequence[str],
        candidates: Iterable[tuple[str, Sequence[str]]],
        rng: random.Random,
    ) -> list[Score]:
        """Thompson-sample every candidate of one decision in one pass.

        Each candidate is ``(offer id, its own feature keys)``, scored on the
        ``shared`` keys and its own. Draws one normal per candidate, in candidate
        order, from ``rng``: the same seed and candidates give the same draws.
        """
        return self._sample(shared, candidates, rng, None)  # type: ignore[return-value]

    def rank(
        self,
        shared: list[str],
        offers: Sequence[Offer],
        owns: Sequence[tuple[str, ...]],
        rng: random.Random,
    ) -> list[Candidate]:
        """The offers of one decision, sampled as :meth:`score` samples them (the same
        draws), scored ``sampled propensity x value x business priority``; best first
        (a tie keeps the offers' order)."""
        out = self._sample(shared, zip([o.id for o in offers], owns, strict=True), rng, offers)
        out.sort(key=_by_score, reverse=True)
        return out  # type: ignore[return-value]

    def _sample(
        self,
        shared: Sequence[str],
        candidates: Iterable[tuple[str, Sequence[str]]],
        rng: random.Random,
        offers: Sequence[Offer] | None,
    ) -> list[Score] | list[Candidate]:
        """:meth:`score`'s draws, as a :class:`Score` per candidate or, given the
        offers, as a :class:`Candidate` per offer (scored; no Score in between)."""
        out: list[Any] = []
        i = -1
        # Random.gauss written out (the same arithmetic on the same uniforms, in the
        # same order, with its spare normal kept and handed back): a Python call per
        # candidate was a tenth of the scoring.
        uniform = rng.random
        spare: float | None = rng.gauss_next  # type: ignore[attr-defined]
        erfc = math.erfc
        sqrt = math.sqrt
        log = math.log
        cos = math.cos
        sin = math.sin
        models = self.models
        n_shared = len(shared)
        pooled = models.get(POOLED) if self.params.pooled_spread > 0 else None
        if pooled is not None:
            pooled_means = pooled.model.means
            pooled_vars = pooled.model.variances
            pooled_mean = pooled_means.get
            pooled_var = pooled_vars.get
            # The pooled sums over the shared keys, once per decision (when an offer
            # takes the prior on the sum).
            shared_sums: tuple[float, float] | None = None
            spread2 = self.params.pooled_spread**2
            floor2 = self.params.pooled_weight_floor**2
            per_weight = floor2 > 0.0
            if per_weight:
                get_spread = self.spreads(pooled).get
                spreads_made = self._spreads_made
                combined = self._combined
                bias_prior = 1.0 / (pooled_vars[BIAS] + get_spread(BIAS, floor2))
                bias_base = pooled_means[BIAS] * bias_prior

                def weight_term(
                    get_mean: Any, get_var: Any, weight: float, key: str
                ) -> tuple[float, float]:
                    """One weight's combined belief: the pool's, widened by the key's
                    spread, with the offer's own evidence on top (mean, variance)."""
                    precision = 1.0 / (pooled_var(key, 1.0) + get_spread(key, floor2))
                    base_sum = pooled_mean(key, 0.0) * precision
                    variance = get_var(key, 1.0)
                    if variance < 1.0:
                        precision += (1.0 / variance - 1.0) * weight
                        base_sum += get_mean(key, 0.0) / variance * weight
                    return base_sum / precision, 1.0 / precision

            bases: dict[Any, tuple[float, float, float]] = {}  # by own keys (a tuple)
        for offer_id, own in candidates:
            i += 1
            model = models.get(offer_id)
            if model is None:
                model = self.get(offer_id)
            draw = model._draw
            if draw is None or draw[0] != model.version:
                draw = model.draw_terms()
            (
                version,
                get_mean,
                get_var,
                bias,
                bias_var,
                narrow,
                weight,
                exploration,
                beta,
                beta2,
                prior_mean,
            ) = draw
            if pooled is not None and per_weight and not model.late:
                # The prior weight by weight: each of the offer's weights at the pooled
                # belief of the same weight, widened by the key's spread, and the
                # offer's own evidence on it on top (its belief over its own prior,
                # N(0, 1) but for the bias), counted 1/narrow**2 times as on the sum.
                # Each weight's combined belief is the same until the offer, the pool or
                # the spreads change: worked out once, when first needed, and kept.
                stamp = (version, pooled.version, spreads_made)
                memo = combined.get(offer_id)
                if memo is None or memo[0] != stamp:
                    bias_total_var = 1.0 / (bias_prior + (1.0 / bias_var - 1.0) * weight)
                    # The closure is this decision's, but the stamp pins what it reads.
                    means = _Means(partial(weight_term, get_mean, get_var, weight))
                    memo = combined[offer_id] = (
                        stamp,
                        means.__getitem__,
                        means.variances.__getitem__,
                        (bias_base + (bias / bias_var - prior_mean) * weight) * bias_total_var,
                        bias_total_var,
                    )
                # The bias, the shared keys, then the offer's own, added in order (on
                # Python 3.11 sum adds floats one by one as a loop does).
                _, mean_of, var_of, total_mean, total_var = memo
                total_mean = sum(map(mean_of, shared), total_mean)
                total_var = sum(map(var_of, shared), total_var)
                for key in own:
                    total_mean += mean_of(key)
                    total_var += var_of(key)
                spread = sqrt(total_var) * exploration
            else:
                # Sums over the active weights, the bias first (an unseen feature's
                # weight is at its prior, N(0, 1)); map and sum run the loop in C. A
                # candidate has one or two keys of its own: added one by one, in order.
                total_mean = sum(map(get_mean, shared, _ZEROS), bias)
                total_var = sum(map(get_var, shared, _ONES), bias_var)
                for key in own:
                    total_mean += get_mean(key, 0.0)
                    total_var += get_var(key, 1.0)
            if pooled is None:
                spread = sqrt(total_var) * exploration * narrow
            elif not per_weight or model.late:
                # The prior: the pooled belief, widened (once per decision and own keys).
                base = bases.get(own)
                if base is None:
                    if shared_sums is None:
                        shared_sums = (
                            sum(map(pooled_mean, shared, _ZEROS), pooled_means[BIAS]),
                            sum(map(pooled_var, shared, _ONES), pooled_vars[BIAS]),
                        )
                    shared_mean, shared_var = shared_sums
                    base_var = sum(map(pooled_var, own, _ONES), shared_var) + spread2
                    base = bases[own] = (
                        sum(map(pooled_mean, own, _ZEROS), shared_mean) / base_var,
                        1.0 / base_var,
                        1.0 / (1.0 + n_shared + len(own)),  # over the offer's own prior
                    )
                base_sum, precision, prior_precision = base
                # The offer's evidence: its belief over its own prior (precisions
                # subtract), counted 1/narrow**2 times as its draws are narrowed.
                evidence = 1.0 / total_var - prior_precision
                if evidence > 0.0:
                    base_sum += (total_mean / total_var - prior_mean * prior_precision) * weight
                    precision += evidence * weight
                total_var = 1.0 / precision
                total_mean = base_sum * total_var
                spread = sqrt(total_var) * exploration
            if spare is None:
                x2pi = uniform() * _TWOPI
                g2rad = sqrt(-2.0 * log(1.0 - uniform()))
                z = cos(x2pi) * g2rad
                spare = sin(x2pi) * g2rad
            else:
                z = spare
                spare = None
            s = total_mean + z * spread
            # Phi(x) = erfc(-x / sqrt 2) / 2, clipped as AdPredictor clips.
            sampled = 0.5 * erfc(-s / (beta * _SQRT2))
            mean = 0.5 * erfc(-total_mean / (sqrt(total_var + beta2) * _SQRT2))
            sampled = _LOW if sampled < _LOW else _HIGH if sampled > _HIGH else sampled
            mean = _LOW if mean < _LOW else _HIGH if mean > _HIGH else mean
            if offers is None:
                out.append(_new(Score, (offer_id, sampled, mean, version)))
            else:
                o = offers[i]
                out.append(
                    _new(
                        Candidate,
                        (o, shared, own, sampled, mean, sampled * o.value * o.priority, version),
                    )
                )
        rng.gauss_next = spare  # type: ignore[attr-defined]
        return out


#: Builds a named tuple without its Python-level ``__new__`` (one per candidate).
_new = tuple.__new__
