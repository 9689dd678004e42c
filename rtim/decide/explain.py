"""What a customer's context remembers of its last decisions, for ``rtim explain``.

Every decision (a trigger's or a request's) is recorded in full on
``rtim.decisions``; the context keeps only a short summary of the last
:data:`MAX_RECENT` (its id, when, what asked, the offer and channel, and the
first :data:`MAX_REASONS` of its reasons that the catalog does not already say: which
offers were rejected and why, and always the outcome), because every byte of a context is read and
written with each of the customer's events.
"""

from __future__ import annotations

from typing import Any

from rtim.context.model import Context
from rtim.decide.arbitrate import Decision

#: Decisions a context remembers.
MAX_RECENT = 3
#: Reasons remembered per decision (the record on rtim.decisions has them all).
MAX_REASONS = 6
#: Reasons not remembered: the trigger is ``by``, and the winner's eligibility
#: conditions are in the catalog (and in the decision record).
_DERIVED = ("trigger:", "eligible:")
#: The reasons that say a decision's outcome: kept whatever comes before them.
_OUTCOME = ("offer:", "no-offer:")


def note_decision(
    ctx: Context, decision: Decision, by: str, actions: list[list[Any]] | None = None
) -> None:
    """Remember a decision's summary in the context (the oldest goes first); ``actions``:
    a request's answer, as ``[offer id, channel, score, propensity, draw, levers]`` each
    (levers None: the offer's value and priority), so that the request asked again is
    answered the same (:func:`remembered`)."""
    offer = None if decision.offer is None else decision.offer.id
    reasons = decision.reasons
    _remember(
        ctx,
        decision.decision_id,
        decision.event.timestamp_ms,
        by,
        offer,
        decision.channel,
        reasons,
        actions,
    )


def note_record(ctx: Context, record: dict[str, Any]) -> None:
    """Remember a decision from its record (:mod:`rtim.decide.record`), as
    :func:`note_decision` did when it was made."""
    actions = None
    if record.get("source") == "api":  # (a record read back is checked by read_handover)
        scored = {c.get("offer_id"): c for c in record.get("candidates") or ()}
        first = {"offer_id": record["offer_id"], "channel": record["channel"]}
        actions = []
        for action in record.get("actions") or ([first] if first["offer_id"] else []):
            candidate = scored.get(action["offer_id"], {})
            levers = candidate.get("levers")
            actions.append(
                [
                    action["offer_id"],
                    str(action.get("channel") or record["channel"]),
                    _number(candidate.get("score")),
                    _number(candidate.get("propensity")),
                    _number(candidate.get("sampled")),
                    levers if isinstance(levers, dict) else None,
                ]
            )
    _remember(
        ctx,
        record["decision_id"],
        record["decided_ms"],
        record["trigger"],
        record["offer_id"],
        record["channel"],
        record["reasons"],
        actions,
    )


def _kept(reasons: list[str]) -> list[str]:
    """At most :data:`MAX_REASONS` of a decision's reasons, its outcome among them.

    >>> _kept([f"rejected:o{i}:x" for i in range(9)] + ["no-offer:none-eligible"])[-2:]
    ['rejected:o4:x', 'no-offer:none-eligible']
    """
    kept = [r for r in reasons if not r.startswith(_DERIVED)]
    if len(kept) <= MAX_REASONS:
        return kept
    head = kept[: MAX_REASONS - 1]
    outcome = next((r for r in reversed(kept) if r.startswith(_OUTCOME)), None)
    if outcome is None or outcome in head:
        return kept[:MAX_REASONS]
    return [*head, outcome]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _remember(
    ctx: Context,
    decision_id: str,
    at_ms: int,
    by: str,
    offer: str | None,
    channel: str,
    reasons: list[str],
    actions: list[list[Any]] | None,
) -> None:
    entry = {
        "id": decision_id,
        "at": at_ms,
        "by": by,
        "offer": offer,
        "channel": channel,
        "reasons": _kept(reasons),
    }
    if actions is not None:
        entry["actions"] = actions
    recent = ctx.get("recent")
    if recent is None:
        # ``src`` stays the last field (read without decoding the context).
        src = ctx.pop("src", None)
        ctx["recent"] = [entry]
        ctx["src"] = src
        return
    recent.append(entry)
    if len(recent) > MAX_RECENT:
        del recent[: len(recent) - MAX_RECENT]


def remembers(ctx: Context, decision_id: str) -> bool:
    """Whether the decision is among the context's last ones."""
    return remembered(ctx, decision_id) is not None


def remembered(ctx: Context, decision_id: str) -> dict[str, Any] | None:
    """The summary of the decision if it is among the context's last ones."""
    return next((entry for entry in ctx.get("recent") or () if entry["id"] == decision_id), None)


def recent_decisions(ctx: Context) -> list[dict[str, Any]]:
    """The summaries of the context's last decisions, newest first."""
    return list(reversed(ctx.get("recent") or []))
