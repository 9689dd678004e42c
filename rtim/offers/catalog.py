"""The offers catalog: offers and actions, their channels, eligibility and value.

The catalog file is YAML with two lists, ``triggers`` (the decision moments,
see :mod:`rtim.triggers.rules`) and ``offers``::

    offers:
      - id: free-shipping
        name: Free shipping on this cart
        channels: [web, app]        # first is the fallback channel
        value: 6.0                  # business value of an acceptance
        priority: 1.0               # business lever, multiplies the score
        category: null              # links the offer to a category affinity
        triggers: [cart-builder]    # moments it is considered for (all if absent)
        eligibility: ["cart.value >= 50", "issues == 0"]
        valid_from: 2026-01-01      # optional dates (UTC)
        valid_to: 2027-01-01
        creative: {title: "Shipping is on us", text: "..."}

Contact policy and levers
-------------------------
Four optional sections say what a decision may offer and how it is weighed
(:mod:`rtim.decide.policy` applies them; ``docs/catalog.example.yaml`` has them
all). Offers get four fields more::

      - id: double-points
        kind: sales                 # sales (default) | service | information
        group: loyalty              # optional; selected by caps, weights, suppression
        cooldown: 7d                # after a dismissal (default: policy.dismissal_cooldown)
        caps: [{max: 2, per: 30d}]  # the offer's own caps (channel: optional)

    policy:
      timezone: Europe/London       # customers whose context.timezone is unknown (IANA)
      outbound: [email, push, sms, call_centre]   # what quiet hours hold back (default)
      quiet_hours: {from: "21:00", to: "08:00"}   # customer's local time (default: none)
      consent:
        default: {email: false, sms: false}       # unnamed channels: allowed
        categories: {Advertising: [email, sms, push]}   # Segment category -> channels
      caps:                         # rolling windows of event time
        - {id: daily-total, max: 3, per: 1d}
        - {id: email-daily, channel: email, max: 1, per: 1d}     # or channels: [...]
        - {id: offer-weekly, scope: offer, max: 1, per: 7d}      # each offer on its own
        - {id: loyalty-weekly, group: loyalty, max: 2, per: 7d}  # or offer: <id>
      dismissal_cooldown: 3d
    groups: {loyalty: {priority: 1.2}}            # a lever on the group's scores
    weights:                        # factor on the score while every condition holds
      - {id: big-cart, when: "cart.value >= 100", factor: 1.5, offers: [bundle-discount]}
    suppression:                    # while `when` holds, `suppress` is not offered
      - {id: open-issue, when: "issues > 0", suppress: {kind: sales}, raise: service-recovery}

Durations are ``<n><unit>`` with units w, d, h, m, s (``1d12h``), at most
``36500d``; every number is finite (``.nan`` and ``.inf`` are refused). Weights and
suppression select offers by ``offer(s)``, ``group(s)`` and ``kind(s)`` (any
of them matches; a weight with none applies to every offer). ``raise`` names
offers made candidates while the rule holds, whatever the trigger. A cap's
``max`` is at most :data:`~rtim.offers.policy.MAX_CONTACTS`, the contacts a
context keeps.

Defaults change nothing for a catalog without these sections, but one: with
no ``suppression`` section, a catalog that has an offer of kind ``service``
gets the rule ``open-issue`` (``issues > 0`` suppresses kind sales and raises
every service offer); ``suppression: []`` turns it off. A catalog without any
of this has ``policy`` None, and its decisions skip the policy steps, except
that a channel the customer withdrew consent for is never used.

The optional ``placements`` list names the places the decision API answers for
(``POST /v1/decide``)::

    placements:
      - id: home-hero
        channels: [web, app]        # the channels a request for it may come on
        offers: [free-shipping]     # which offers may appear there (all of the channel's if absent)

Loading checks everything (unknown fields, types, conditions, references from
offers to triggers, time zones, durations, and references to offers and
groups) and raises :class:`CatalogError` naming the place: the file and line
of the offending trigger, offer, rule or field, and what is wrong. A key given
twice in a mapping is an error (YAML readers keep the last), and so are
aliases that add more than :data:`MAX_ALIASED_VALUES` values and values nested
more than :data:`MAX_DEPTH` deep.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rtim.conditions import Condition, ConditionError, compile_all
from rtim.context.model import IDENTIFYING_TRAITS, KEPT_TRAITS, MAX_TRAIT_NAME_CHARS, MAX_TRAITS
from rtim.errors import ConfigError, unknown_fields
from rtim.learn.features import DEFAULT_SPEC, FeatureSpec, FeatureSpecError, parse_spec
from rtim.names import OFFER_CHANNELS
from rtim.offers.policy import (
    KINDS,
    MAX_DURATION_S,
    MAX_NAME_CHARS,
    NO_POLICY,
    Cap,
    Policy,
    PolicyError,
    duration_ms,
    is_number,
    parse_cap,
    parse_groups,
    parse_policy,
    parse_suppression,
    parse_weights,
)
from rtim.triggers.rules import TriggerRule, parse_rule

CHANNELS = OFFER_CHANNELS
_T = TypeVar("_T")
_OFFER_KEYS = {
    "attribution_window",
    "id",
    "name",
    "channels",
    "value",
    "priority",
    "category",
    "triggers",
    "eligibility",
    "valid_from",
    "valid_to",
    "creative",
    "kind",
    "group",
    "cooldown",
    "caps",
}


class CatalogError(ConfigError, ValueError):
    """The catalog file cannot be used; the message says where and why."""


class Lines:
    """Line numbers of the mappings of a YAML document, and of their keys.

    Keyed by the identity of the mapping the loader built, so the document
    stays plain dicts and lists.
    """

    def __init__(self) -> None:
        self._lines: dict[int, tuple[int, dict[Any, int]]] = {}

    def record(self, mapping: dict[Any, Any], node: yaml.MappingNode) -> None:
        keys: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                keys.setdefault(key_node.value, key_node.start_mark.line + 1)
        self._lines[id(mapping)] = (node.start_mark.line + 1, keys)

    def of(self, mapping: Any, message: str = "") -> int | None:
        """The line of ``mapping``, or of its key the message names (``'key'``, ``.key``)."""
        found = self._lines.get(id(mapping))
        if found is None:
            return None
        line, keys = found
        for key, key_line in keys.items():
            if f"'{key}'" in message or f"'{key}." in message or f".{key}" in message:
                return key_line
        return line


_YAML_BOOL = "tag:yaml.org,2002:bool"
_YAML_STR = "tag:yaml.org,2002:str"
_YAML_MERGE = "tag:yaml.org,2002:merge"

#: Deepest nesting of values in a catalog, aliases expanded (decisions carry the
#: creative, and their JSON is bounded in depth too).
MAX_DEPTH = 50
#: Most values aliases may add to a catalog, each alias counted as the values it stands for.
MAX_ALIASED_VALUES = 100_000


class _Refused(yaml.composer.ComposerError):
    """YAML a catalog may not be, though a YAML reader would take it (too deep, too large)."""


class _Composer(yaml.SafeLoader):
    """SafeLoader, bounded in depth and in what aliases expand to.

    Aliases are allowed (``<<: *defaults`` is handy), but the values each one stands
    for are counted, expanded, as the document is read: a few lines of nested aliases
    ("billion laughs") would otherwise make every decision's answer megabytes long.
    The count costs one walk of each aliased value (its size is kept).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # the nodes being composed: one inside another
        self._aliased = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node): (values, depth)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.NodeEvent = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None:  # else SafeLoader's own error (an undefined alias)
                self._count(node, f"*{event.anchor}", mark)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(None, None, f"values nested more than {MAX_DEPTH} deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _count(self, node: yaml.Node, alias: str, mark: yaml.Mark | None) -> None:
        if node.end_mark is None:  # still being read: the alias is inside what it names
            raise _Refused(None, None, f"alias {alias} is inside the value it names", mark)
        values, depth = self._measure(node)
        self._aliased += values
        if self._aliased > MAX_ALIASED_VALUES:
            raise _Refused(
                None,
                None,
                f"aliases expand to more than {MAX_ALIASED_VALUES} values (at {alias}); "
                "write the repeated parts out, or repeat less",
                mark,
            )
        if self._depth + depth > MAX_DEPTH:
            raise _Refused(
                None, None, f"values nested more than {MAX_DEPTH} deep (at {alias}, expanded)", mark
            )

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        """The values ``node`` stands for, aliases expanded, and how deep they nest."""
        found = self._measured.get(id(node))
        if found is None:
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            parts = [self._measure(child) for child in children]  # as deep as MAX_DEPTH
            found = (1 + sum(v for v, _ in parts), 1 + max((d for _, d in parts), default=0))
            self._measured[id(node)] = found
        return found


def _load_yaml(text: str) -> tuple[Any, Lines]:
    lines = Lines()

    class Loader(_Composer):
        pass

    # As SafeLoader's construct_yaml_map: an empty dict first (it may be
    # referred to by an alias inside itself), filled afterwards.
    def construct_map(loader: Loader, node: yaml.MappingNode) -> Any:
        mapping: dict[Any, Any] = {}
        lines.record(mapping, node)
        yield mapping
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            # A key is a name as written: YAML 1.1 reads ``on:``, ``no:`` or ``yes:`` as a
            # boolean, and an error would name the field True.
            if key_node.tag == _YAML_BOOL:
                key_node.tag = _YAML_STR
            # A key given twice is refused (PyYAML keeps the last); one a merge (``<<``)
            # brings in may be given again, that is what merges are for.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _YAML_MERGE:
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key_node.value!r} given twice, on lines {seen[key]} and {line}",
                        key_node.start_mark,
                    )
                seen[key] = line
        mapping.update(yaml.SafeLoader.construct_mapping(loader, node))

    def construct_timestamp(loader: Loader, node: yaml.ScalarNode) -> Any:
        try:
            return yaml.SafeLoader.construct_yaml_timestamp(loader, node)
        except ValueError as exc:  # a date YAML recognises but cannot build (2026-02-30)
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value}: {exc}", node.start_mark
            ) from None

    Loader.add_constructor("tag:yaml.org,2002:map", construct_map)
    Loader.add_constructor("tag:yaml.org,2002:timestamp", construct_timestamp)
    return yaml.load(text, Loader=Loader), lines


@dataclass(frozen=True, slots=True)
class Offer:
    """One offer or action the engine can decide for."""

    id: str
    name: str
    channels: tuple[str, ...]
    value: float = 1.0
    priority: float = 1.0
    category: str | None = None
    triggers: frozenset[str] | None = None
    eligibility: tuple[Condition, ...] = ()
    valid_from_ms: int | None = None
    valid_to_ms: int | None = None
    creative: Mapping[str, Any] = field(default_factory=dict)
    #: How long after a decision (event time) a conversion is credited to it, in ms;
    #: None: ``RTIM_ATTRIBUTION_WINDOW_S``.
    attribution_window_ms: int | None = None
    #: sales, service or information (suppression rules select by kind).
    kind: str = "sales"
    #: The offer group (caps, weights, suppression and group priority select by group).
    group: str | None = None
    #: How long after a dismissal the offer is not offered again (None: the policy's).
    cooldown_ms: int | None = None
    #: The offer's own caps (they count this offer's contacts).
    caps: tuple[Cap, ...] = ()

    def is_valid_at(self, now_ms: int) -> bool:
        if self.valid_from_ms is not None and now_ms < self.valid_from_ms:
            return False
        return self.valid_to_ms is None or now_ms < self.valid_to_ms

    def channel_for(self, event_channel: str) -> str:
        """Answer on the channel the customer is on if the offer can use it."""
        return event_channel if event_channel in self.channels else self.channels[0]


@dataclass(frozen=True, slots=True)
class Placement:
    """A place the decision API answers for: on which channels, with which offers."""

    id: str
    channels: tuple[str, ...]
    #: The offers that may appear there; None: every offer on the request's channel.
    offers: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Catalog:
    """Triggers and offers, as loaded from one file."""

    triggers: tuple[TriggerRule, ...]
    offers: tuple[Offer, ...]
    source: str = "<memory>"
    #: Identify traits kept in contexts (the allowlist).
    traits: tuple[str, ...] = KEPT_TRAITS
    #: The features decisions are scored on.
    features: FeatureSpec = DEFAULT_SPEC
    #: Contact policy and levers (:mod:`rtim.offers.policy`); None when the catalog
    #: has none, so that decisions skip every policy step.
    policy: Policy | None = None
    placements: tuple[Placement, ...] = ()
    #: The YAML text it was read from (what the live catalog publishes), if any.
    text: str | None = field(default=None, repr=False, compare=False)
    _by_trigger: dict[str, tuple[Offer, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _by_id: dict[str, Offer] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._by_id.update((o.id, o) for o in self.offers)

    @property
    def offers_by_id(self) -> Mapping[str, Offer]:
        """The offers by id."""
        return self._by_id

    @property
    def consent_categories(self) -> Mapping[str, tuple[str, ...]]:
        """The Segment consent categories the policy reads, and the channels each covers."""
        return self.policy.categories if self.policy is not None else {}

    def offers_for(self, trigger_id: str) -> tuple[Offer, ...]:
        """The offers a decision moment may lead to, in catalog order."""
        found = self._by_trigger.get(trigger_id)
        if found is None:
            found = tuple(o for o in self.offers if o.triggers is None or trigger_id in o.triggers)
            self._by_trigger[trigger_id] = found
        return found

    def placement(self, placement_id: str) -> Placement | None:
        for placement in self.placements:
            if placement.id == placement_id:
                return placement
        return None

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(c for o in self.offers for c in o.channels)


def _date_ms(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise CatalogError(f"{where}: not an ISO date: {value!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
    else:
        raise CatalogError(f"{where}: not a date: {value!r}")
    return int(moment.timestamp() * 1000)


def _number(raw: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = raw.get(key, default)
    if not is_number(value) or value < 0:
        raise CatalogError(f"{where}: '{key}' must be a finite number >= 0, got {value!r}")
    return float(value)


def _window_ms(raw: Mapping[str, Any], where: str) -> int | None:
    seconds = raw.get("attribution_window")
    if seconds is None:
        return None
    if not is_number(seconds) or not 0 < seconds <= MAX_DURATION_S:
        raise CatalogError(
            f"{where}: 'attribution_window' must be a number of seconds > 0 and at most "
            f"{MAX_DURATION_S}, got {seconds!r}"
        )
    return int(seconds * 1000)


def parse_offer(raw: Any, index: int, trigger_ids: frozenset[str]) -> Offer:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise CatalogError(f"offers[{index}]: each offer needs a string 'id'")
    where = f"offer {raw['id'][:MAX_NAME_CHARS]!r}"
    if len(raw["id"]) > MAX_NAME_CHARS:
        # Contexts keep offer ids (contacts, dismissals, open decisions) within a budget.
        raise CatalogError(f"{where}...: an offer id is at most {MAX_NAME_CHARS} characters")
    if raw["id"].startswith("__"):
        # Keys beginning with two underscores name the pooled model and the
        # learners' cursors on rtim.training and rtim.models.
        raise CatalogError(f"{where}: an offer id may not begin with '__' (reserved)")
    unknown = unknown_fields(raw, _OFFER_KEYS)
    if unknown:
        raise CatalogError(f"{where}: {unknown}")
    channels = _channels(raw, where)
    linked = _references(raw, "triggers", where, trigger_ids, "trigger")
    triggers = None if linked is None else frozenset(linked)
    creative = raw.get("creative") or {}
    if not isinstance(creative, dict):
        raise CatalogError(f"{where}: 'creative' must be a mapping")
    category = raw.get("category")
    kind = raw.get("kind", "sales")
    if kind not in KINDS:
        raise CatalogError(f"{where}: 'kind' must be one of {list(KINDS)}, got {kind!r}")
    group = raw.get("group")
    if group is not None and (
        not isinstance(group, str) or not group or len(group) > MAX_NAME_CHARS
    ):
        raise CatalogError(
            f"{where}: 'group' must be a name of at most {MAX_NAME_CHARS} characters"
        )
    cooldown = raw.get("cooldown")
    caps = raw.get("caps") or []
    if not isinstance(caps, list):
        raise CatalogError(f"{where}: 'caps' must be a list")
    try:
        eligibility = compile_all(raw.get("eligibility"), f"{where}.eligibility")
    except ConditionError as exc:
        raise CatalogError(str(exc)) from None
    offer = Offer(
        id=raw["id"],
        name=str(raw.get("name", raw["id"])),
        channels=tuple(channels),
        value=_number(raw, "value", 1.0, where),
        priority=_number(raw, "priority", 1.0, where),
        category=category.lower() if isinstance(category, str) else None,
        triggers=triggers,
        eligibility=eligibility,
        valid_from_ms=_date_ms(raw.get("valid_from"), f"{where}.valid_from"),
        valid_to_ms=_date_ms(raw.get("valid_to"), f"{where}.valid_to"),
        creative=creative,
        attribution_window_ms=_window_ms(raw, where),
        kind=kind,
        group=group,
        cooldown_ms=None if cooldown is None else duration_ms(cooldown, f"{where}.cooldown", raw),
        caps=tuple(parse_cap(c, f"{where}.caps[{i}]", offer=raw["id"]) for i, c in enumerate(caps)),
    )
    if (
        offer.valid_from_ms is not None
        and offer.valid_to_ms is not None
        and offer.valid_from_ms >= offer.valid_to_ms
    ):
        raise CatalogError(f"{where}: valid_from must be before valid_to")
    return offer


def parse_placement(raw: Any, index: int, offer_ids: frozenset[str]) -> Placement:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise CatalogError(f"placements[{index}]: each placement needs a string 'id'")
    where = f"placement {raw['id']!r}"
    unknown = unknown_fields(raw, ("id", "channels", "offers"))
    if unknown:
        raise CatalogError(f"{where}: {unknown}")
    channels = _channels(raw, where)
    offers = _references(raw, "offers", where, offer_ids, "offer")
    return Placement(
        id=raw["id"], channels=tuple(channels), offers=None if offers is None else tuple(offers)
    )


def _channels(raw: dict[str, Any], where: str) -> list[str]:
    """The ``channels`` of an offer or a placement: a non-empty list of known channels."""
    channels = raw.get("channels")
    if isinstance(channels, str):
        channels = [channels]
    if not isinstance(channels, list) or not channels:
        raise CatalogError(f"{where}: 'channels' must be a non-empty list")
    bad = [c for c in channels if c not in CHANNELS]
    if bad:
        raise CatalogError(f"{where}: unknown channel(s) {bad}; known: {sorted(CHANNELS)}")
    return channels


def _references(
    raw: dict[str, Any], key: str, where: str, known: frozenset[str], kind: str
) -> list[str] | None:
    """Ids of triggers or offers listed under ``key`` (one id alone is a list of one),
    each defined in the catalog; None if the key is absent."""
    ids = raw.get(key)
    if ids is None:
        return None
    if isinstance(ids, str):
        ids = [ids]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CatalogError(f"{where}: '{key}' must be a list of {kind} ids")
    missing = [i for i in ids if i not in known]
    if missing:
        raise CatalogError(f"{where}: '{key}' refers to undefined {kind}(s) {missing}")
    return ids


def _duplicates(ids: list[str]) -> list[str]:
    return sorted({i for i in ids if ids.count(i) > 1})


def _ids_of(raw_items: list[Any]) -> frozenset[str]:
    """The ids a section's items give themselves, whether or not they are valid."""
    return frozenset(
        raw["id"] for raw in raw_items if isinstance(raw, dict) and isinstance(raw.get("id"), str)
    )


#: At most this many of a catalog's errors are listed (and how many more there are).
MAX_ERRORS_LISTED = 20


def _all_of(errors: list[CatalogError]) -> CatalogError:
    """One error that lists every one found, one per line, in the file's order."""
    if len(errors) == 1:
        return errors[0]
    lines = [str(e) for e in errors[:MAX_ERRORS_LISTED]]
    if len(errors) > MAX_ERRORS_LISTED:
        lines.append(f"... and {len(errors) - MAX_ERRORS_LISTED} more errors")
    return CatalogError("\n".join(lines))


def parse_catalog(data: Any, source: str = "<memory>", lines: Lines | None = None) -> Catalog:
    """Build a :class:`Catalog` from the parsed YAML document.

    With the document's ``lines`` (:func:`load_catalog` has them), errors name
    ``source:line``.
    """
    lines = lines or Lines()

    def error(message: str, where: Any = None) -> CatalogError:
        line = lines.of(where if where is not None else data, message)
        return CatalogError(f"{source}:{line}: {message}" if line else f"{source}: {message}")

    if not isinstance(data, dict):
        raise error("the catalog must be a mapping with 'triggers' and 'offers'")
    unknown = unknown_fields(
        data, ("triggers", "offers", "learning", "placements", *_POLICY_SECTIONS)
    )
    if unknown:
        raise error(f"top level: {unknown}")
    raw_triggers = data.get("triggers") or []
    raw_offers = data.get("offers") or []
    if not isinstance(raw_triggers, list) or not isinstance(raw_offers, list):
        raise error("'triggers' and 'offers' must be lists")
    # Each trigger, offer and placement is checked, and every error is reported at once
    # (an author fixes them all in one go); an item in error still lends its id to the
    # checks of what refers to it, so that one error does not make others.
    errors: list[CatalogError] = []
    triggers = []
    for i, raw in enumerate(raw_triggers):
        try:
            triggers.append(parse_rule(raw, i))
        except ConditionError as exc:
            errors.append(error(str(exc), raw))
    ids = [t.id for t in triggers]
    if len(set(ids)) != len(ids):
        errors.append(
            error(f"duplicate trigger id(s) {_duplicates(ids)}", _second(raw_triggers, ids))
        )
    trigger_ids = _ids_of(raw_triggers)  # the valid ones' and those in error
    offers = []
    for i, raw in enumerate(raw_offers):
        try:
            offers.append(parse_offer(raw, i, trigger_ids))
        except CatalogError as exc:
            errors.append(error(str(exc), raw))
        except PolicyError as exc:
            errors.append(error(str(exc), raw if exc.where is None else exc.where))
    offer_ids = [o.id for o in offers]
    if len(set(offer_ids)) != len(offer_ids):
        errors.append(
            error(f"duplicate offer id(s) {_duplicates(offer_ids)}", _second(raw_offers, offer_ids))
        )
    raw_placements = data.get("placements") or []
    if not isinstance(raw_placements, list):
        errors.append(error("'placements' must be a list"))
        raw_placements = []
    placements = []
    offer_ids_given = _ids_of(raw_offers)
    for i, raw in enumerate(raw_placements):
        try:
            placements.append(parse_placement(raw, i, offer_ids_given))
        except CatalogError as exc:
            errors.append(error(str(exc), raw))
    placement_ids = [p.id for p in placements]
    if len(set(placement_ids)) != len(placement_ids):
        errors.append(
            error(
                f"duplicate placement id(s) {_duplicates(placement_ids)}",
                _second(raw_placements, placement_ids),
            )
        )
    learning = data.get("learning") or {}
    try:
        traits, features = parse_learning(learning)
    except CatalogError as exc:
        errors.append(error(str(exc), learning))
    policy_errors: list[PolicyError] = []
    policy = _policy(data, offers, raw_offers, policy_errors)
    errors.extend(error(str(exc), exc.where) for exc in policy_errors)
    if errors:
        raise _all_of(errors)
    return Catalog(
        triggers=tuple(triggers),
        offers=tuple(offers),
        source=source,
        traits=traits,
        features=features,
        policy=policy,
        placements=tuple(placements),
    )


_POLICY_SECTIONS = ("policy", "groups", "weights", "suppression")


def _policy(
    data: dict[str, Any], offers: list[Offer], raw_offers: list[Any], errors: list[PolicyError]
) -> Policy | None:
    """The contact policy and levers; None when they could change no decision, or when a
    section is in error (the first error of each is added to ``errors``)."""

    def checked(parse: Callable[..., _T], *args: Any) -> _T | None:
        try:
            return parse(*args)
        except PolicyError as exc:
            errors.append(exc)
            return None

    raw_groups = data.get("groups")
    groups = checked(parse_groups, raw_groups)
    if groups is None:  # in error: its names are known still
        groups = {str(name): 1.0 for name in raw_groups} if isinstance(raw_groups, dict) else {}
    # The sections refer to offers and groups; an offer in error lends them its id and
    # its group (as its id to placements), so that its error makes no other.
    parsed = {o.id: o for o in offers}
    ids = _ids_of(raw_offers)
    lent = [
        r["group"] for r in raw_offers if isinstance(r, dict) and isinstance(r.get("group"), str)
    ]
    known = {
        "offers": ids,
        "groups": set(groups) | set(lent),
        "groups_of": {i: parsed[i].group if i in parsed else None for i in ids},
        "kinds": {i: parsed[i].kind if i in parsed else None for i in ids},
    }
    weights = checked(parse_weights, data.get("weights"), known) or ()
    suppression = checked(parse_suppression, data.get("suppression"), known) or ()
    policy = checked(parse_policy, data.get("policy"), groups, weights, known) or NO_POLICY
    if errors:
        return None
    offer_caps = [c for o in offers for c in o.caps]
    cooldowns = [o.cooldown_ms for o in offers if o.cooldown_ms is not None]
    if policy.dismissal_cooldown_ms is not None:
        cooldowns.append(policy.dismissal_cooldown_ms)
    if not (
        "policy" in data
        or suppression
        or weights
        or any(p != 1.0 for p in groups.values())
        or offer_caps
        or cooldowns
    ):
        return None
    return replace(
        policy,
        suppression=suppression,
        contact_horizon_ms=max((c.per_ms for c in (*policy.caps, *offer_caps)), default=0),
        dismissal_horizon_ms=max(cooldowns, default=0),
    )


def parse_learning(raw: Any) -> tuple[tuple[str, ...], FeatureSpec]:
    """The ``learning`` section: the traits kept in contexts (an allowlist) and the
    features decisions are scored on (:mod:`rtim.learn.features`)."""
    if not isinstance(raw, dict):
        raise CatalogError("'learning' must be a mapping with 'traits' and/or 'features'")
    unknown = unknown_fields(raw, ("traits", "features"))
    if unknown:
        raise CatalogError(f"learning: {unknown}")
    traits = raw.get("traits", list(KEPT_TRAITS))
    if not isinstance(traits, list) or not all(isinstance(t, str) and t for t in traits):
        raise CatalogError("learning.traits must be a list of trait names")
    if len(traits) > MAX_TRAITS or any(len(t) > MAX_TRAIT_NAME_CHARS for t in traits):
        raise CatalogError(
            f"learning.traits: at most {MAX_TRAITS} names of at most "
            f"{MAX_TRAIT_NAME_CHARS} characters"
        )
    identifying = sorted(t for t in traits if t.lower() in IDENTIFYING_TRAITS)
    if identifying:
        raise CatalogError(
            f"learning.traits: {identifying} identify a person; RTIM never keeps such traits"
        )
    features = DEFAULT_SPEC
    if "features" in raw:
        try:
            features = parse_spec(raw["features"], "learning.features")
        except FeatureSpecError as exc:
            raise CatalogError(str(exc)) from None
    return tuple(dict.fromkeys(traits)), features


def _second(raws: list[Any], ids: list[str]) -> Any:
    """The first entry whose id was used before (where a duplicate shows)."""
    seen: set[str] = set()
    for raw, id_ in zip(raws, ids, strict=True):
        if id_ in seen:
            return raw
        seen.add(id_)
    return None


def load_catalog(path: str | Path) -> Catalog:
    """Read and check a catalog file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from None
    return catalog_from_text(text, str(path))


def catalog_from_text(text: str, source: str) -> Catalog:
    """Check a catalog's YAML text; ``source`` names it in errors (``source:line``)."""
    try:
        data, lines = _load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = "; ".join(p for p in (exc.context, exc.problem) if p)
        said = problem if isinstance(exc, _Refused) else f"not valid YAML: {problem}"
        raise CatalogError(f"{where}: {said}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{source}: not valid YAML: {exc}") from None
    return replace(parse_catalog(data, source=source, lines=lines), text=text)
