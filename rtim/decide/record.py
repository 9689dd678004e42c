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
from typing import Any

import orjson

from rtim.decide.arbitrate import Decision, round6_all
from rtim.decide.cloudevent import iso_ms
from rtim.learn.attribution import MAX_ID_CHARS, InvalidResponse, Pending, action_id, load_object

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


#: A handed-over decision record may be at most this long (a decision record with every
#: candidate's features is a few KB; a context, which it adds to, at most 64 KiB).
MAX_HANDOVER_BYTES = 65536


def read_handover(value: bytes | None) -> tuple[dict[str, Any], list[Pending]]:
    """A decision record handed over (docs/architecture.md, "The decision API": a request
    answered by a worker that could not store its batch), and the decisions it kept open
    in its customer's context when it was made: the first action under the decision's id,
    the others under :func:`~rtim.learn.attribution.action_id`, each with the features it
    was scored on. Raises :class:`~rtim.learn.attribution.InvalidResponse` (the record
    came on ``rtim.responses``, which channel systems write too) when it is not one.

    >>> record = {"decision_id": "d-1", "customer_id": "c", "offer_id": "a",
    ...     "channel": "web", "trigger": "request:web", "reasons": [], "decided_ms": 5,
    ...     "window_end_ms": 9, "features": ["s"], "candidates": [
    ...     {"offer_id": "a", "features": ["a:x"]}, {"offer_id": "b", "features": []}],
    ...     "actions": [{"offer_id": "a", "channel": "web", "window_end_ms": 9},
    ...                 {"offer_id": "b", "channel": "email", "window_end_ms": 7}]}
    >>> _, opened = read_handover(orjson.dumps(record))
    >>> [(p.decision_id, p.offer_id, list(p.features), p.window_end_ms) for p in opened]
    [('d-1', 'a', ['s', 'a:x'], 9), ('d-1#b', 'b', ['s'], 7)]
    """
    record = load_object(value or b"", MAX_HANDOVER_BYTES, "a handed-over decision record")
    _field(record, "decision_id", str)
    _field(record, "customer_id", str)
    _field(record, "channel", str)
    _field(record, "trigger", str)
    _field(record, "decided_ms", int)
    _strings(record, "reasons")
    offer_id = record.get("offer_id")
    if offer_id is None:
        return record, []
    _field(record, "offer_id", str)
    _field(record, "window_end_ms", int)
    shared = _strings(record, "features")
    candidates = record.get("candidates")
    if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
        raise InvalidResponse("wrong_type", "'candidates' must be a list of objects")
    own = {_field(c, "offer_id", str): _strings(c, "features") for c in candidates}
    first = {"offer_id": offer_id, "window_end_ms": record["window_end_ms"]}
    actions = record.get("actions") or [first]
    if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
        raise InvalidResponse("wrong_type", "'actions' must be a list of objects")
    decision_id, customer_id, at_ms = (
        record["decision_id"],
        record["customer_id"],
        record["decided_ms"],
    )
    opened = []
    # The first action is the decision's own (kept under its id, as it was made).
    for i, action in enumerate([first, *actions[1:]]):
        offer = _field(action, "offer_id", str)
        if offer not in own:
            raise InvalidResponse(
                "missing_field", f"action {offer!r} is not among the candidates", field="candidates"
            )
        pending_id = action_id(decision_id, offer) if i else decision_id
        end = _field(action, "window_end_ms", int)
        opened.append(Pending(pending_id, customer_id, offer, [*shared, *own[offer]], at_ms, end))
    return record, opened


def _field(data: dict[str, Any], name: str, kind: type) -> Any:
    value: Any = data.get(name)
    if value is None:
        raise InvalidResponse("missing_field", f"'{name}' is missing", field=name)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
        raise InvalidResponse("wrong_type", f"'{name}' must be a {kind.__name__}", field=name)
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        raise InvalidResponse(
            "wrong_type", f"'{name}' is over {MAX_ID_CHARS} characters", field=name
        )
    return value


def _strings(data: dict[str, Any], name: str) -> list[str]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidResponse("wrong_type", f"'{name}' must be a list of strings", field=name)
    return value
