"""Trigger rules: the decision moments, evaluated on every event.

A rule fires when an event matches its pattern (call type, event or page name,
channel, property values) and every condition holds on the event and on the
customer's context *after* the event was applied. A rule that fired for a
customer stays quiet for that customer for ``cooldown`` seconds of event time,
so a burst of clicks makes one decision, not twenty.

YAML form (a list under ``triggers:`` in the catalog file)::

    - id: cart-builder
      description: the cart passed 100 with no order yet
      when: {type: track, event: Product Added}
      if: ["cart.value >= 100", "orders == 0"]
      cooldown: 3600
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rtim.conditions import Condition, ConditionError, compile_all
from rtim.context.model import Context
from rtim.errors import unknown_fields
from rtim.events import Event
from rtim.offers.policy import MAX_DURATION_S, is_number

_PATTERN_KEYS = {"type", "event", "name", "channel", "properties"}
_RULE_KEYS = {"id", "description", "when", "if", "cooldown"}


@dataclass(frozen=True, slots=True)
class TriggerRule:
    """One compiled decision moment."""

    id: str
    description: str = ""
    types: frozenset[str] | None = None
    names: frozenset[str] | None = None
    channels: frozenset[str] | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)
    conditions: tuple[Condition, ...] = ()
    cooldown_ms: int = 3_600_000

    def matches_pattern(self, event: Event) -> bool:
        """Cheap check on the event alone, done before any condition."""
        if self.types is not None and event.type not in self.types:
            return False
        if self.names is not None and event.name not in self.names:
            return False
        if self.channels is not None and event.channel not in self.channels:
            return False
        props = event.properties
        return all(props.get(key) == expected for key, expected in self.properties.items())

    def cooled_down(self, ctx: Context, now_ms: int) -> bool:
        last = ctx["fired"].get(self.id)
        return last is None or now_ms - last >= self.cooldown_ms


def _as_set(value: Any, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset([value])
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise ConditionError(f"{where}: expected a string or a list of strings, got {value!r}")


def parse_rule(raw: Any, index: int) -> TriggerRule:
    """Build a rule from its YAML mapping; errors name the rule and the field."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise ConditionError(f"triggers[{index}]: each trigger needs a string 'id'")
    where = f"trigger {raw['id']!r}"
    unknown = unknown_fields(raw, _RULE_KEYS)
    if unknown:
        raise ConditionError(f"{where}: {unknown}")
    pattern = raw.get("when") or {}
    if not isinstance(pattern, dict):
        raise ConditionError(
            f"{where}: 'when' must be a mapping with keys among {sorted(_PATTERN_KEYS)}"
        )
    unknown = unknown_fields(pattern, _PATTERN_KEYS)
    if unknown:
        raise ConditionError(f"{where}: 'when': {unknown}")
    props = pattern.get("properties") or {}
    if not isinstance(props, dict):
        raise ConditionError(f"{where}: 'when.properties' must be a mapping")
    names = pattern.get("event", pattern.get("name"))
    cooldown = raw.get("cooldown", 3600)
    if not is_number(cooldown) or not 0 <= cooldown <= MAX_DURATION_S:
        raise ConditionError(
            f"{where}: 'cooldown' must be a number of seconds from 0 to {MAX_DURATION_S}, "
            f"got {cooldown!r}"
        )
    return TriggerRule(
        id=raw["id"],
        description=str(raw.get("description", "")),
        types=_as_set(pattern.get("type"), f"{where}.when.type"),
        names=_as_set(names, f"{where}.when.event"),
        channels=_as_set(pattern.get("channel"), f"{where}.when.channel"),
        properties=props,
        conditions=compile_all(raw.get("if"), f"{where}.if"),
        cooldown_ms=int(cooldown * 1000),
    )


class RuleIndex:
    """Rules grouped by the (type, name) they can match, so that an event is only
    checked against rules that may fire for it (most events match none)."""

    def __init__(self, rules: tuple[TriggerRule, ...]) -> None:
        self.rules = rules
        self._by_key: dict[tuple[str, str | None], tuple[TriggerRule, ...]] = {}

    def candidates(self, event: Event) -> tuple[TriggerRule, ...]:
        key = (event.type, event.name)
        found = self._by_key.get(key)
        if found is None:
            if len(self._by_key) >= 10_000:  # event names come from clients: bound it
                self._by_key.clear()
            found = self._by_key[key] = tuple(
                r
                for r in self.rules
                if (r.types is None or event.type in r.types)
                and (r.names is None or event.name in r.names)
            )
        return found


def fired_rules(rules: tuple[TriggerRule, ...], event: Event, ctx: Context) -> list[TriggerRule]:
    """Return the rules this event fires for this customer (cool-downs respected).

    Pass all rules, or only those :meth:`RuleIndex.candidates` gives for the
    event (the engine does: most events then skip this call).
    """
    fired = []
    for rule in rules:
        if not rule.matches_pattern(event) or not rule.cooled_down(ctx, event.timestamp_ms):
            continue
        if first_failed(rule.conditions, event, ctx) is None:
            fired.append(rule)
    return fired


def first_failed(conditions: tuple[Condition, ...], event: Event, ctx: Context) -> Condition | None:
    """The first condition that does not hold on the event and the context (None if all do).

    Conditions on ``event.*`` see :func:`event_fields`; the others read the
    context directly (no copy of it is made).
    """

    def fields() -> dict[str, Any]:
        return event_fields(event)

    for cond in conditions:
        if not cond.test(ctx, fields):
            return cond
    return None


def event_fields(event: Event) -> dict[str, Any]:
    """What ``event.*`` paths in conditions see."""
    return {
        "type": event.type,
        "name": event.name,
        "channel": event.channel,
        "properties": event.properties,
        "timestamp_ms": event.timestamp_ms,
    }
