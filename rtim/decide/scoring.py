"""Online propensity scoring with river: one logistic regression per offer.

Each offer has its own :class:`river.linear_model.LogisticRegression`, which
learns online from responses (``learn``) and answers the probability that the
customer accepts the offer now (``predict``). Features are built once per
decision from the context and shared by all candidate offers; the one
offer-specific feature is the customer's affinity for the offer's category.
"""

from __future__ import annotations

import math
from typing import Any

from river import linear_model, optim

from rtim.context.model import Context


def context_features(ctx: Context) -> dict[str, float]:
    """Numeric features of a context, on comparable scales (log counts, 0/1 flags)."""
    channels = ctx["channels"]
    n = ctx["n"] or 1
    span_ms = (ctx["last_ms"] or 0) - (ctx["first_ms"] or 0)
    return {
        "events_log": math.log1p(ctx["n"]),
        "cart_value_log": math.log1p(ctx["cart"]["value"]),
        "cart_items": float(len(ctx["cart"]["items"])),
        "orders_log": math.log1p(ctx["orders"]),
        "open_issues": float(ctx["issues"]),
        "app_share": channels.get("app", {}).get("n", 0) / n,
        "web_share": channels.get("web", {}).get("n", 0) / n,
        "tenure_days_log": math.log1p(max(span_ms, 0) / 86_400_000),
        "known": 1.0 if ctx["types"].get("identify") else 0.0,
    }


def offer_features(base: dict[str, float], ctx: Context, category: str | None) -> dict[str, float]:
    """Add the offer-specific features to the shared ones."""
    if category is None:
        return base
    features = dict(base)
    features["category_affinity_log"] = math.log1p(ctx["affinity"].get(category, 0.0))
    return features


class PropensityModel:
    """Per-offer online logistic regressions.

    Examples
    --------
    >>> model = PropensityModel()
    >>> x = {"cart_value_log": 4.0}
    >>> model.predict("free-shipping", x)
    0.5
    >>> for _ in range(50):
    ...     model.learn("free-shipping", x, True)
    >>> model.predict("free-shipping", x) > 0.9
    True
    """

    def __init__(self, *, learning_rate: float = 0.05, l2: float = 0.0) -> None:
        self.learning_rate = learning_rate
        self.l2 = l2
        self._models: dict[str, linear_model.LogisticRegression] = {}
        self.updates = 0

    def _model(self, offer_id: str) -> linear_model.LogisticRegression:
        model = self._models.get(offer_id)
        if model is None:
            model = self._models[offer_id] = linear_model.LogisticRegression(
                optimizer=optim.SGD(self.learning_rate), l2=self.l2
            )
        return model

    def predict(self, offer_id: str, features: dict[str, float]) -> float:
        """Probability that the customer responds to the offer."""
        proba = self._model(offer_id).predict_proba_one(features)  # type: ignore[no-untyped-call]
        return float(proba[True])

    def learn(self, offer_id: str, features: dict[str, float], accepted: bool) -> None:
        """Learn from one response (or from its absence, as a negative)."""
        self._model(offer_id).learn_one(features, accepted)
        self.updates += 1

    def contributions(
        self, offer_id: str, features: dict[str, float], top: int = 3
    ) -> dict[str, float]:
        """The features that moved this score most (weight x value), for reason codes.

        Features with no learned weight moved nothing and are left out, so a
        model that has not learned yet explains nothing rather than noise.
        """
        weights = self._model(offer_id).weights
        if not weights:
            return {}
        scored = [
            (name, weights[name] * value) for name, value in features.items() if name in weights
        ]
        scored.sort(key=lambda kv: abs(kv[1]), reverse=True)
        return {name: round(value, 4) for name, value in scored[:top]}

    def inspect(self) -> dict[str, Any]:
        """Weights and intercept per offer, for people and dashboards."""
        return {
            offer: {"weights": dict(m.weights), "intercept": m.intercept}
            for offer, m in self._models.items()
        }
