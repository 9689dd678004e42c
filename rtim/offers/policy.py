"""The contact policy of a catalog, as loaded: consent, quiet hours, caps, cool-downs,
suppression and levers (the catalog's ``policy``, ``groups``, ``weights`` and
``suppression`` sections; their shape is documented in :mod:`rtim.offers.catalog`).

This module only reads and checks the sections; :mod:`rtim.decide.policy`
applies them to a decision. A :class:`PolicyError` carries the YAML mapping it
is about, so that the catalog names its line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rtim.conditions import Condition, ConditionError, compile_all
from rtim.errors import unknown_fields
from rtim.names import OFFER_CHANNELS

#: Kinds of offers and actions.
KINDS = ("sales", "service", "information")
#: Channels quiet hours apply to unless ``policy.outbound`` says otherwise.
OUTBOUND = ("email", "push", "sms", "call_centre")
#: Longest offer id and group name (contexts keep them in contacts and dismissals).
MAX_NAME_CHARS = 64
#: Contacts kept per customer (newest); a cap may allow at most this many.
MAX_CONTACTS = 64
#: Dismissed offers remembered per customer (newest).
MAX_DISMISSALS = 32
#: Consent categories remembered per customer; names longer than this are ignored.
MAX_CONSENT_CATEGORIES = 16
MAX_CATEGORY_CHARS = 64
#: The default suppression rule (see :func:`parse_suppression`).
DEFAULT_SUPPRESSION = "open-issue"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_UNIT_MS = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000}
#: Longest duration a catalog may give (windows, cool-downs): 100 years. Event times plus
#: it stay well within the 64-bit integers records are written with.
MAX_DURATION_MS = 36_500 * _UNIT_MS["d"]
#: The same, for the durations a catalog gives in seconds.
MAX_DURATION_S = MAX_DURATION_MS // 1000
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


class PolicyError(ValueError):
    """A policy section that cannot be used; ``where`` is the YAML mapping at fault."""

    def __init__(self, message: str, where: Any = None) -> None:
        super().__init__(message)
        self.where = where


def is_number(value: Any) -> bool:
    """Whether a value read from a catalog is a finite number (not YAML's ``.nan``,
    ``.inf``, ``true``, nor an integer beyond any float).

    >>> [is_number(v) for v in (0, 2.5, float("nan"), float("-inf"), True, "3", 10**400)]
    [True, True, False, False, False, False, False]
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def duration_ms(value: Any, where: str, raw: Any = None) -> int:
    """A duration written ``1d``, ``12h``, ``30m``, ``45s``, ``2w`` or ``1d12h``, in ms.

    >>> duration_ms("1d12h", "x"), duration_ms("30m", "x")
    (129600000, 1800000)
    """
    text = value.strip() if isinstance(value, str) else None
    parts = _DURATION_PART.findall(text) if text else []
    if not parts or "".join(n + u for n, u in parts) != text:
        raise PolicyError(
            f"{where}: {value!r} is not a duration (write it like 1d, 12h, 30m, 45s, 2w, 1d12h)",
            raw,
        )
    ms = sum(float(n) * _UNIT_MS[u] for n, u in parts)  # inf if hundreds of digits long
    if not ms <= MAX_DURATION_MS:
        days = MAX_DURATION_MS // _UNIT_MS["d"]
        raise PolicyError(f"{where}: a duration is at most {days}d, got {value!r}", raw)
    if int(ms) <= 0:
        raise PolicyError(f"{where}: a duration must be more than 0, got {value!r}", raw)
    return int(ms)


def _names(value: Any, where: str, raw: Any, known: Any = None, what: str = "") -> frozenset[str]:
    """One name or a list of names (checked against ``known`` if given)."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise PolicyError(f"{where}: must be a name or a non-empty list of names", raw)
    if known is not None:
        bad = sorted(n for n in names if n not in known)
        if bad:
            raise PolicyError(f"{where}: unknown {what} {bad}; known: {sorted(known)}", raw)
    return frozenset(names)


def _check_keys(raw: Any, allowed: set[str], where: str, required: tuple[str, ...] = ()) -> None:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: must be a mapping", raw)
    unknown = unknown_fields(raw, allowed)
    if unknown:
        raise PolicyError(f"{where}: {unknown}", raw)
    for key in required:
        if raw.get(key) is None:
            raise PolicyError(f"{where}: '{key}' is required", raw)


def _factor(raw: Mapping[str, Any], key: str, where: str) -> float:
    value = raw.get(key, 1.0)
    if not is_number(value) or not value > 0:
        raise PolicyError(f"{where}: '{key}' must be a finite number > 0, got {value!r}", raw)
    return float(value)


@dataclass(frozen=True, slots=True)
class Cap:
    """At most ``max`` contacts within ``per_ms`` (event time, rolling) of the contacts
    it counts: those on ``channels``, of ``offer``, of ``group`` (None: any); with
    ``each_offer``, every offer is counted on its own."""

    id: str
    max: int
    per_ms: int
    channels: frozenset[str] | None = None
    offer: str | None = None
    group: str | None = None
    each_offer: bool = False

    def counts(self, channel: str, offer: str, group: str | None) -> bool:
        """Whether a contact on ``channel`` of ``offer`` (in ``group``) is one it counts."""
        return (
            (self.channels is None or channel in self.channels)
            and (self.offer is None or offer == self.offer)
            and (self.group is None or group == self.group)
        )


_CAP_KEYS = {"id", "max", "per", "channel", "channels", "offer", "group", "scope"}


def parse_cap(raw: Any, where: str, offer: str | None = None) -> Cap:
    """One cap; within an offer's own ``caps`` (``offer`` given) it counts that offer."""
    _check_keys(raw, _CAP_KEYS - ({"offer", "scope"} if offer else set()), where, ("max", "per"))
    cap_id = raw.get("id")
    if offer is None and (not isinstance(cap_id, str) or not cap_id):
        raise PolicyError(f"{where}: each cap needs a string 'id'", raw)
    where = f"{where} {cap_id!r}" if cap_id else where
    most = raw["max"]
    if isinstance(most, bool) or not isinstance(most, int) or not 0 <= most <= MAX_CONTACTS:
        raise PolicyError(
            f"{where}: 'max' must be a whole number from 0 to {MAX_CONTACTS} "
            f"(the contacts kept per customer), got {most!r}",
            raw,
        )
    if "channel" in raw and "channels" in raw:
        raise PolicyError(f"{where}: give 'channel' or 'channels', not both", raw)
    channels = raw.get("channel", raw.get("channels"))
    scope = raw.get("scope", "customer")
    if scope not in ("customer", "offer"):
        raise PolicyError(
            f"{where}: 'scope' is customer (all offers) or offer (each on its own)", raw
        )
    group = raw.get("group")
    if group is not None and not isinstance(group, str):
        raise PolicyError(f"{where}: 'group' must be a group name", raw)
    target = raw.get("offer", offer)
    if target is not None and not isinstance(target, str):
        raise PolicyError(f"{where}: 'offer' must be an offer id", raw)
    return Cap(
        id=cap_id if isinstance(cap_id, str) and cap_id else f"{offer}:{most}/{raw['per']}",
        max=most,
        per_ms=duration_ms(raw["per"], f"{where}.per", raw),
        channels=None
        if channels is None
        else _names(channels, f"{where}.channel", raw, OFFER_CHANNELS, "channel(s)"),
        offer=target,
        group=group,
        each_offer=scope == "offer",
    )


@dataclass(frozen=True, slots=True)
class Weight:
    """A context weight: ``factor`` multiplies the score of the offers it selects
    (all when no selector is given) when every condition of ``when`` holds."""

    id: str
    when: tuple[Condition, ...]
    factor: float
    offers: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    kinds: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Suppression:
    """When every condition of ``when`` holds, the offers it selects are not offered;
    the offers of ``raise_`` become candidates (if valid and eligible)."""

    id: str
    when: tuple[Condition, ...]
    offers: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    raise_: tuple[str, ...] = ()


def selects(rule: Weight | Suppression, offer_id: str, group: str | None, kind: str) -> bool:
    """Whether a weight or a suppression rule is about this offer (any selector matches)."""
    if rule.offers is None and rule.groups is None and rule.kinds is None:
        return True
    return (
        (rule.offers is not None and offer_id in rule.offers)
        or (rule.groups is not None and group in rule.groups)
        or (rule.kinds is not None and kind in rule.kinds)
    )


def _selectors(raw: Mapping[str, Any], where: str, known: Mapping[str, Any]) -> dict[str, Any]:
    def pick(key: str, plural: str, names: Any, what: str) -> frozenset[str] | None:
        if key in raw and plural in raw:
            raise PolicyError(f"{where}: give '{key}' or '{plural}', not both", raw)
        value = raw.get(key, raw.get(plural))
        return None if value is None else _names(value, f"{where}.{key}", raw, names, what)

    return {
        "offers": pick("offer", "offers", known["offers"], "offer(s)"),
        "groups": pick("group", "groups", known["groups"], "group(s)"),
        "kinds": pick("kind", "kinds", KINDS, "kind(s)"),
    }


def _when(raw: Mapping[str, Any], where: str) -> tuple[Condition, ...]:
    try:
        return compile_all(raw.get("when"), f"{where}.when")
    except ConditionError as exc:
        raise PolicyError(str(exc), raw) from None


def parse_weights(raw: Any, known: Mapping[str, Any]) -> tuple[Weight, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PolicyError("'weights' must be a list", raw)
    out = []
    for i, item in enumerate(raw):
        where = f"weights[{i}]"
        allowed = {"id", "when", "factor", "offer", "offers", "group", "groups", "kind", "kinds"}
        _check_keys(item, allowed, where, ("id", "when", "factor"))
        where = f"weight {item['id']!r}"
        out.append(
            Weight(
                id=str(item["id"]),
                when=_when(item, where),
                factor=_factor(item, "factor", where),
                **_selectors(item, where, known),
            )
        )
    _unique([w.id for w in out], "weight", raw)
    return tuple(out)


def parse_suppression(raw: Any, known: Mapping[str, Any]) -> tuple[Suppression, ...]:
    """The ``suppression`` rules. Absent, the default is one rule, ``open-issue``: while
    the customer has an open service issue (``issues > 0``) no sales offer is made and
    the service offers are raised instead; it is in force only in catalogs with an offer
    of kind service (else sales would stop with nothing to offer in their place).
    ``suppression: []`` turns it off."""
    if raw is None:
        service = tuple(i for i, kind in known["kinds"].items() if kind == "service")
        if not service:
            return ()
        return (
            Suppression(
                id=DEFAULT_SUPPRESSION,
                when=compile_all(["issues > 0"], "suppression"),
                kinds=frozenset({"sales"}),
                raise_=service,
            ),
        )
    if not isinstance(raw, list):
        raise PolicyError("'suppression' must be a list of rules", raw)
    out = []
    for i, item in enumerate(raw):
        where = f"suppression[{i}]"
        _check_keys(item, {"id", "when", "suppress", "raise"}, where, ("id", "when", "suppress"))
        where = f"suppression {item['id']!r}"
        suppress = item["suppress"]
        _check_keys(
            suppress,
            {"offer", "offers", "group", "groups", "kind", "kinds"},
            f"{where}.suppress",
        )
        selectors = _selectors(suppress, f"{where}.suppress", known)
        if not any(v is not None for v in selectors.values()):
            raise PolicyError(f"{where}.suppress: name offer(s), group(s) or kind(s)", item)
        raised = item.get("raise")
        raised_ids = (
            ()
            if raised is None
            else tuple(sorted(_names(raised, f"{where}.raise", item, known["offers"], "offer(s)")))
        )
        rule = Suppression(
            id=str(item["id"]), when=_when(item, where), raise_=raised_ids, **selectors
        )
        self_suppressed = [
            o for o in raised_ids if selects(rule, o, known["groups_of"].get(o), known["kinds"][o])
        ]
        if self_suppressed:
            raise PolicyError(f"{where}: raises {self_suppressed}, which it suppresses", item)
        out.append(rule)
    _unique([s.id for s in out], "suppression rule", raw)
    return tuple(out)


def _unique(ids: list[str], what: str, raws: list[Any]) -> None:
    """Refuse an id used twice, naming the place of its second use."""
    seen: set[str] = set()
    for id_, raw in zip(ids, raws, strict=True):
        if id_ in seen:
            raise PolicyError(f"duplicate {what} id(s) {sorted({id_})}", raw)
        seen.add(id_)


def parse_groups(raw: Any) -> dict[str, float]:
    """``groups: {name: {priority: 1.2}}``: each group's priority (a lever)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PolicyError("'groups' must be a mapping of group name to {priority: ...}", raw)
    out = {}
    for name, item in raw.items():
        where = f"groups.{name}"
        if len(str(name)) > MAX_NAME_CHARS:
            raise PolicyError(f"groups: a group name is at most {MAX_NAME_CHARS} characters", raw)
        _check_keys(item or {}, {"priority"}, where)
        out[str(name)] = _factor(item or {}, "priority", where)
    return out


#: Longest time zone name read from events.
MAX_ZONE_CHARS = 64


@lru_cache(maxsize=512)
def _lookup_zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # "Europe" is a directory
        return None


def known_zone(name: Any) -> ZoneInfo | None:
    """The IANA time zone of that name, or None (not a name, or unknown)."""
    if type(name) is not str or not name or len(name) > MAX_ZONE_CHARS:
        return None
    return _lookup_zone(name)


def _zone(name: Any, where: str, raw: Any) -> ZoneInfo:
    zone = known_zone(name)
    if zone is None:
        raise PolicyError(
            f"{where}: unknown time zone {name!r} (an IANA name, like Europe/London)", raw
        )
    return zone


def _clock(value: Any, where: str, raw: Any) -> int:
    match = _CLOCK.match(value) if isinstance(value, str) else None
    if match is None:
        raise PolicyError(f"{where}: {value!r} is not a time of day HH:MM (quote it)", raw)
    return int(match[1]) * 60 + int(match[2])


@dataclass(frozen=True, slots=True)
class Policy:
    """A catalog's contact policy and levers, ready for :mod:`rtim.decide.policy`."""

    #: The time zone of customers whose own is unknown.
    timezone: str = "UTC"
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    #: Channels quiet hours apply to.
    outbound: frozenset[str] = frozenset(OUTBOUND)
    #: Quiet hours in the customer's local time, minutes after midnight [from, to).
    quiet: tuple[int, int] | None = None
    #: Consent of a customer who said nothing about a channel.
    consent_default: Mapping[str, bool] = field(default_factory=dict)
    #: Segment consent category -> channels it covers.
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    caps: tuple[Cap, ...] = ()
    #: How long a dismissed offer is not offered again (None: no cool-down).
    dismissal_cooldown_ms: int | None = None
    #: Priority per offer group (a lever).
    groups: Mapping[str, float] = field(default_factory=dict)
    weights: tuple[Weight, ...] = ()
    suppression: tuple[Suppression, ...] = ()
    #: Contacts older than this (the longest cap window) are forgotten.
    contact_horizon_ms: int = 0
    #: Dismissals older than this (the longest cool-down) are forgotten.
    dismissal_horizon_ms: int = 0

    def consents_by_default(self, channel: str) -> bool:
        return self.consent_default.get(channel, True)


#: A catalog without policy sections: every channel allowed unless the customer said no.
NO_POLICY = Policy()


def _parse_consent(raw: Any) -> tuple[dict[str, bool], dict[str, tuple[str, ...]]]:
    if raw is None:
        return {}, {}
    _check_keys(raw, {"default", "categories"}, "policy.consent")
    default = raw.get("default") or {}
    if not isinstance(default, dict):
        raise PolicyError("policy.consent.default: must map channels to true or false", raw)
    bad = sorted(str(c) for c in default if c not in OFFER_CHANNELS)
    if bad:
        raise PolicyError(f"policy.consent.default: unknown channel(s) {bad}", default)
    if not all(isinstance(v, bool) for v in default.values()):
        raise PolicyError("policy.consent.default: each channel is true or false", default)
    categories = raw.get("categories") or {}
    if not isinstance(categories, dict):
        raise PolicyError("policy.consent.categories: must map categories to channels", raw)
    mapped = {}
    for name, channels in categories.items():
        where = f"policy.consent.categories.{name}"
        mapped[str(name)] = tuple(
            sorted(_names(channels, where, categories, OFFER_CHANNELS, "channel(s)"))
        )
    return dict(default), mapped


_POLICY_KEYS = {"timezone", "outbound", "quiet_hours", "consent", "caps", "dismissal_cooldown"}


def parse_policy(
    raw: Any, groups: dict[str, float], weights: tuple[Weight, ...], known: Mapping[str, Any]
) -> Policy:
    """The ``policy`` section (``raw``, None when absent) with the levers parsed before."""
    raw = {} if raw is None else raw
    _check_keys(raw, _POLICY_KEYS, "policy")
    timezone = raw.get("timezone", "UTC")
    zone = _zone(timezone, "policy.timezone", raw)
    outbound = frozenset(OUTBOUND)
    if "outbound" in raw:
        value = raw["outbound"]
        outbound = (
            frozenset()
            if value == []
            else _names(value, "policy.outbound", raw, OFFER_CHANNELS, "channel(s)")
        )
    quiet = None
    hours = raw.get("quiet_hours")
    if hours is not None:
        _check_keys(hours, {"from", "to"}, "policy.quiet_hours", ("from", "to"))
        quiet = (
            _clock(hours["from"], "policy.quiet_hours.from", hours),
            _clock(hours["to"], "policy.quiet_hours.to", hours),
        )
        if quiet[0] == quiet[1]:
            raise PolicyError("policy.quiet_hours: 'from' and 'to' are the same time", hours)
    default, categories = _parse_consent(raw.get("consent"))
    caps_raw = raw.get("caps") or []
    if not isinstance(caps_raw, list):
        raise PolicyError("policy.caps: must be a list", raw)
    caps = tuple(parse_cap(c, f"policy.caps[{i}]") for i, c in enumerate(caps_raw))
    _unique([c.id for c in caps], "cap", caps_raw)
    for cap, item in zip(caps, caps_raw, strict=True):
        if cap.offer is not None and cap.offer not in known["offers"]:
            raise PolicyError(f"cap {cap.id!r}: unknown offer {cap.offer!r}", item)
        if cap.group is not None and cap.group not in known["groups"]:
            raise PolicyError(f"cap {cap.id!r}: unknown group {cap.group!r}", item)
    cooldown = None
    if raw.get("dismissal_cooldown") is not None:
        cooldown = duration_ms(raw["dismissal_cooldown"], "policy.dismissal_cooldown", raw)
    return Policy(
        timezone=timezone,
        zone=zone,
        outbound=outbound,
        quiet=quiet,
        consent_default=default,
        categories=categories,
        caps=caps,
        dismissal_cooldown_ms=cooldown,
        groups=groups,
        weights=weights,
    )
