"""Decision records: every decision, as written to ``rtim.decisions``.

One JSON object per decision (schema: ``topics/schemas/decision.schema.json``),
keyed by customer id, written in the same step as the decision's trigger: the
decision id, the trigger, the channel, the offer chosen (or none), every
candidate with its mean propensity, Thompson draw, score and model version,
the features it was scored on, the event time it was made at and the end of
its attribution window. It is what reporting, audits and offline learning
read; the worker's own join keeps what it needs in the customer's context.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import attrgetter

import orjson

from rtim.decide.arbitrate import Decision, round6_all
from rtim.decide.cloudevent import iso_ms

RECORD_FORMAT = 1
_mean = attrgetter("mean")
_sampled = attrgetter("sampled")


def encode_record(
    decision: Decision, *, source: str = "trigger", actions: Sequence[tuple[str, str, int]] = ()
) -> bytes:
    """The value of a decision record; ``actions``: a request's answer, as (offer id,
    channel, window end) best first (recorded when there are several)."""
    ranked = decision.ranked
    event = decision.event
    # The means and the draws rounded in one pass: the means first, then the draws.
    n = len(ranked)
    rounded = round6_all(chain(map(_mean, ranked), map(_sampled, ranked)))
    candidates = [
        {
            "offer_id": offer_id,
            "propensity": propensity,
            "sampled": sampled,
            "score": score,
            "model_version": c.version,
            "features": c.own,  # a tuple: orjson writes it as the same array
        }
        for c, (offer_id, score), propensity, sampled in zip(
            ranked, decision.candidates, rounded[:n], rounded[n:], strict=True
        )
    ]
    # Under a contact policy, where each candidate would have gone and what weighed it.
    # The scores were rounded once already, for the decision's candidates.
    if decision.channels:
        channels, levers = decision.channels, decision.levers
        for entry, (offer_id, _) in zip(candidates, decision.candidates, strict=True):
            entry["channel"] = channels[offer_id]
            entry["levers"] = levers[offer_id]
    record = {
        "format": RECORD_FORMAT,
        "decision_id": decision.decision_id,
        "customer_id": decision.customer_id,
        "source": source,
        "trigger": decision.trigger.id,
        "channel": decision.channel,
        "offer_id": None if decision.offer is None else decision.offer.id,
        "candidates": candidates,
        "features": ranked[0].shared if ranked else [],
        "decided_ms": event.timestamp_ms,
        "decided_at": iso_ms(event.timestamp_ms),
        "window_end_ms": decision.window_end_ms,
        "reasons": decision.reasons,
        "message_id": event.message_id,
    }
    if len(actions) > 1:
        record["actions"] = [
            {"offer_id": offer_id, "channel": channel, "window_end_ms": end}
            for offer_id, channel, end in actions
        ]
    return orjson.dumps(record)
