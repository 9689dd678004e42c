"""The contact policy at decision time: what a decision may offer, on which channel,
and how the levers weigh it (the rules; :mod:`rtim.offers.policy` reads them from
the catalog, :func:`rtim.decide.arbitrate.decide` calls them).

After eligibility, for one decision moment:

1. **Suppression.** A rule whose conditions hold takes the offers it selects out
   (``suppressed:<offer>:<rule>``) and makes the offers it raises candidates, even
   if the trigger does not lead to them, when they are valid and eligible
   (``raised:<offer>:<rule>``); a decision request, which considers only its
   placement's or channel's offers, names a raised offer outside them
   (``rejected:<offer>:not-here``).
2. **Cool-down.** An offer the customer dismissed less than its cool-down ago
   (the offer's ``cooldown``, else ``policy.dismissal_cooldown``) is rejected
   (``rejected:<offer>:cooldown``).
3. **Channel.** The offer goes to the channel the customer is on if it can
   (:meth:`~rtim.offers.catalog.Offer.channel_for`), else to its first channel;
   when that channel is not allowed, its other channels are tried in catalog
   order. A channel is not allowed without consent (``no-consent:<channel>``),
   in quiet hours for outbound channels (``quiet-hours:<channel>``) or when a cap
   is reached (``capped:<cap>``). A channel passed over is named with
   ``skipped:<offer>:...``; an offer with no channel left is rejected with
   ``rejected:<offer>:...`` for each.
4. **Levers.** ``score = propensity x context weight x value x priority x group
   priority``; each weight that applies shows as ``weight:<rule>:<offer>=<factor>``,
   and the winner's levers as ``lever:<offer>:<name>=<factor>``.

Time is event time throughout: caps count contacts within ``per`` of the
event's time (a contact exactly ``per`` before it no longer counts), cool-downs
run from the dismissal's event time, quiet hours are the event's local time in
the customer's zone (``context.timezone``, else ``policy.timezone``), so a
replay decides as the live run did.
"""

from __future__ import annotations

import datetime as dt
from bisect import insort
from collections.abc import Sequence
from typing import Any

from rtim.context.model import Context
from rtim.events import Event
from rtim.learn.attribution import entry_offer
from rtim.offers.catalog import Catalog, Offer
from rtim.offers.policy import (
    MAX_CONTACTS,
    MAX_DISMISSALS,
    NO_POLICY,
    Cap,
    Policy,
    Suppression,
    known_zone,
    selects,
)
from rtim.triggers.rules import first_failed

#: Contacts and dismissals are remembered for the longest cap window or cool-down,
#: and at least this long, so that a catalog which brings caps in finds the recent ones.
MIN_MEMORY_MS = 7 * 24 * 3600 * 1000

#: Reason kinds of rejections (metric label values).
REJECTIONS = (
    "not-valid-now",
    "ineligible",
    "suppressed",
    "cooldown",
    "no-consent",
    "quiet-hours",
    "capped",
)


def withdrawn(ctx: Context) -> bool:
    """Whether the customer withdrew consent for any channel (then even a catalog without
    policy checks consent)."""
    consent = ctx.get("consent")
    return consent is not None and any(not v[0] for v in consent.values())


def consents(policy: Policy, ctx: Context, channel: str) -> bool:
    """The customer's consent for ``channel``: the latest change among the channel's own
    consent and the Segment categories that cover it (a withdrawal wins a tie), else the
    catalog's default."""
    allowed = policy.consents_by_default(channel)
    stamp = -1
    own = ctx["consent"].get(channel)
    if own is not None:
        allowed, stamp = own
    if policy.categories:
        for category, (granted, at) in ctx["consent_cat"].items():
            covered = policy.categories.get(category)
            if (
                covered is not None
                and channel in covered
                and (at > stamp or (at == stamp and not granted))
            ):
                allowed, stamp = granted, at
    return allowed


def is_quiet(policy: Policy, ctx: Context, at_ms: int) -> bool:
    """Whether ``at_ms`` is within quiet hours in the customer's local time."""
    if policy.quiet is None:
        return False
    zone = known_zone(ctx.get("tz")) or policy.zone
    local = dt.datetime.fromtimestamp(at_ms / 1000, zone)
    minute = local.hour * 60 + local.minute
    start, end = policy.quiet
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def reached(cap: Cap, offer: Offer, contacts: Sequence[list[Any]], at_ms: int) -> bool:
    """Whether ``cap`` allows no more contacts at ``at_ms``: it counts the contacts less than
    its window away (before or after: a late event is checked against what followed it)."""
    if cap.max == 0:
        return True
    per = cap.per_ms
    n = 0
    for ms, channel, offer_id, group in contacts:
        if (
            -per < ms - at_ms < per
            and cap.counts(channel, offer_id, group)
            and (not cap.each_offer or offer_id == offer.id)
        ):
            n += 1
            if n >= cap.max:
                return True
    return False


def blocked(
    policy: Policy, ctx: Context, offer: Offer, channel: str, at_ms: int, quiet: bool
) -> str | None:
    """Why ``offer`` may not go to ``channel`` now (None: it may)."""
    if not consents(policy, ctx, channel):
        return f"no-consent:{channel}"
    if quiet and channel in policy.outbound:
        return f"quiet-hours:{channel}"
    contacts = ctx["contacts"]
    if contacts:
        for cap in (*policy.caps, *offer.caps):
            if cap.counts(channel, offer.id, offer.group) and reached(cap, offer, contacts, at_ms):
                return f"capped:{cap.id}"
    elif policy.caps or offer.caps:
        for cap in (*policy.caps, *offer.caps):
            if cap.max == 0 and cap.counts(channel, offer.id, offer.group):
                return f"capped:{cap.id}"
    return None


def cooling(policy: Policy, ctx: Context, offer: Offer, at_ms: int) -> bool:
    """Whether ``offer`` was dismissed less than its cool-down ago."""
    cooldown = offer.cooldown_ms or policy.dismissal_cooldown_ms
    if cooldown is None:
        return False
    dismissed = ctx["dismissed"].get(offer.id)
    return dismissed is not None and abs(at_ms - dismissed) < cooldown


def active_suppressions(policy: Policy, event: Event, ctx: Context) -> list[Suppression]:
    return [s for s in policy.suppression if first_failed(s.when, event, ctx) is None]


def suppressed_by(rules: list[Suppression], offer: Offer) -> Suppression | None:
    for rule in rules:
        if selects(rule, offer.id, offer.group, offer.kind):
            return rule
    return None


def raised(
    catalog: Catalog, rules: list[Suppression], seen: set[str], reasons: list[str]
) -> list[tuple[Offer, str]]:
    """The offers the active rules raise that the trigger did not already consider.

    A decision request considers only the offers of its placement or channel (its
    catalog holds no others): a raised offer outside them is not offered there, and
    says so (``rejected:<offer>:not-here``).
    """
    if not any(rule.raise_ for rule in rules):
        return []
    by_id = catalog.offers_by_id
    out = []
    for rule in rules:
        for offer_id in rule.raise_:
            if offer_id not in seen:
                seen.add(offer_id)
                offer = by_id.get(offer_id)
                if offer is None:
                    reasons.append(f"rejected:{offer_id}:not-here")
                else:
                    out.append((offer, rule.id))
    return out


def place(
    policy: Policy, ctx: Context, offer: Offer, event_channel: str, at_ms: int, quiet: bool
) -> tuple[str | None, list[str]]:
    """The channel ``offer`` goes to (None: none is allowed), and why others were passed over."""
    first = offer.channel_for(event_channel)
    why = blocked(policy, ctx, offer, first, at_ms, quiet)
    if why is None:
        return first, []
    passed = [why]
    for channel in offer.channels:
        if channel != first:
            why = blocked(policy, ctx, offer, channel, at_ms, quiet)
            if why is None:
                return channel, passed
            if why not in passed:
                passed.append(why)
    return None, passed


def shown_together(
    policy: Policy | None,
    ctx: Context,
    ranked: Sequence[Any],
    channels: dict[str, str],
    event_channel: str,
    at_ms: int,
    limit: int,
) -> tuple[list[tuple[Any, str]], list[str]]:
    """The first ``limit`` ranked candidates that may be shown together, each with the
    channel it goes to, and why others were passed over.

    Every action shown counts as a contact of the customer, so an offer whose cap the
    actions before it reach is passed over (``rejected:<offer>:capped:<cap>``), or goes to
    another of its channels, as it would in a decision of its own after them.
    """
    first = [
        (c, channels.get(c.offer.id) or c.offer.channel_for(event_channel)) for c in ranked[:limit]
    ]
    if (
        policy is None
        or len(first) < 2
        or not (policy.caps or any(c.offer.caps for c, _ in first[1:]))
    ):
        return first, []
    contacts = list(ctx["contacts"])
    seen = {**ctx, "contacts": contacts}  # the context as the next action would see it
    quiet = is_quiet(policy, ctx, at_ms)
    out: list[tuple[Any, str]] = []
    reasons: list[str] = []
    for c in ranked:
        offer = c.offer
        channel = first[0][1]
        if out:
            placed, passed = place(policy, seen, offer, event_channel, at_ms, quiet)
            if placed is None:
                reasons.extend(f"rejected:{offer.id}:{why}" for why in passed)
                continue
            if placed != channels.get(offer.id):
                reasons.extend(f"skipped:{offer.id}:{w}" for w in passed if w.startswith("capped:"))
            channel = placed
        out.append((c, channel))
        if len(out) == limit:
            break
        contacts.append([at_ms, channel, offer.id, offer.group])
    return out, reasons


def weights_for(
    policy: Policy, event: Event, ctx: Context, offers: Sequence[Offer]
) -> dict[str, list[tuple[str, float]]]:
    """Per offer, the context weights that apply to it now (only offers with any)."""
    if not policy.weights:
        return {}
    holding = [w for w in policy.weights if first_failed(w.when, event, ctx) is None]
    out: dict[str, list[tuple[str, float]]] = {}
    for offer in offers:
        for weight in holding:
            if selects(weight, offer.id, offer.group, offer.kind):
                out.setdefault(offer.id, []).append((weight.id, weight.factor))
    return out


def record_contact(
    ctx: Context, policy: Policy | None, at_ms: int, channel: str, offer: Offer
) -> None:
    """Remember that ``offer`` was made on ``channel`` at ``at_ms`` (event time)."""
    contacts = ctx["contacts"]
    entry = [at_ms, channel, offer.id, offer.group]
    if not contacts or contacts[-1][0] <= at_ms:
        contacts.append(entry)
    else:
        insort(contacts, entry, key=_time)
    horizon = max(policy.contact_horizon_ms if policy else 0, MIN_MEMORY_MS)
    oldest = contacts[-1][0] - horizon
    cut = 0
    while cut < len(contacts) and contacts[cut][0] <= oldest:
        cut += 1
    cut = max(cut, len(contacts) - MAX_CONTACTS)
    if cut:
        del contacts[:cut]


def _time(contact: list[Any]) -> int:
    return int(contact[0])


def record_dismissal(ctx: Context, policy: Policy | None, offer_id: str, at_ms: int) -> None:
    """Remember that the customer dismissed ``offer_id`` at ``at_ms`` (event time)."""
    dismissed = ctx["dismissed"]
    if dismissed.get(offer_id, at_ms) > at_ms:
        return  # a newer dismissal is known
    dismissed.pop(offer_id, None)
    dismissed[offer_id] = at_ms
    horizon = max(policy.dismissal_horizon_ms if policy else 0, MIN_MEMORY_MS)
    latest = max(dismissed.values())
    for stale in [o for o, ms in dismissed.items() if ms <= latest - horizon]:
        del dismissed[stale]
    while len(dismissed) > MAX_DISMISSALS:
        del dismissed[min(dismissed, key=dismissed.__getitem__)]


def counters(catalog: Catalog, ctx: Context, at_ms: int) -> dict[str, Any]:
    """The customer's policy state at ``at_ms`` (for explaining it): per cap of the policy,
    the contacts it counts in its window (per offer for caps of each offer), and the offers
    cooling down after a dismissal with the event time their cool-down ends."""
    policy = catalog.policy or NO_POLICY
    contacts = ctx["contacts"]
    caps: dict[str, Any] = {}
    for cap in policy.caps:
        counted = [
            c for c in contacts if -cap.per_ms < c[0] - at_ms < cap.per_ms and cap.counts(*c[1:])
        ]
        if cap.each_offer:
            per_offer: dict[str, int] = {}
            for c in counted:
                per_offer[c[2]] = per_offer.get(c[2], 0) + 1
            caps[cap.id] = {"max": cap.max, "offers": per_offer}
        else:
            caps[cap.id] = {"max": cap.max, "count": len(counted)}
    cooldowns = {o.id: o.cooldown_ms or policy.dismissal_cooldown_ms for o in catalog.offers}
    cooling_until = {}
    for offer_id, at in ctx["dismissed"].items():
        cooldown = cooldowns.get(offer_id)
        if cooldown is not None and at + cooldown > at_ms:
            cooling_until[offer_id] = at + cooldown
    return {"caps": caps, "cooling_until_ms": cooling_until}


def dismissed_offer(ctx: Context | None, decision_id: str, offer: str | None) -> str | None:
    """The offer of a decision's action open or closed lately (the one a dismissal response
    is about: ``offer``, None for the first): a customer who says no after the window ended
    still said no."""
    return None if ctx is None else entry_offer(ctx, decision_id, offer)


def rejection_kind(reason: str) -> str | None:
    """The kind of a rejection reason (one of :data:`REJECTIONS`), None if it is none.

    >>> rejection_kind("rejected:x:capped:daily"), rejection_kind("suppressed:x:open-issue")
    ('capped', 'suppressed')
    """
    if reason.startswith("suppressed:"):
        return "suppressed"
    if not reason.startswith("rejected:"):
        return None
    kind = reason.split(":", 3)[2]
    return kind if kind in REJECTIONS else "ineligible"
