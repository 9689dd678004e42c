"""Conditions over an event and a customer context, as written in the YAML files.

A condition is one line: ``<path> <operator> <value>``, for example::

    cart.value >= 50
    event.properties.category == "shoes"
    channels.app.n >= 3
    events.Product Viewed >= 2
    issues == 0
    traits.plan in ["gold", "platinum"]
    event.properties.coupon exists

The path starts at the context (``cart.value``) or at the event
(``event.name``, ``event.channel``, ``event.properties.*``); dots separate keys,
and keys may contain spaces. The value is a YAML scalar or list. Operators:
``== != > >= < <= in not in contains``, and the one-sided ``exists`` and
``missing``. A path that does not resolve makes every comparison false (only
``missing`` is true), so a rule never fires on data it cannot see.

Conditions are compiled once, when the file is loaded; a malformed one is a
:class:`ConditionError` naming the text, never a failure at event time.
"""

from __future__ import annotations

import contextlib
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

_MISSING = object()

_BINARY: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
    "contains": lambda a, b: b in a,
}
_UNARY = ("exists", "missing")
# Longest operators first so that ">=" is not read as ">".
_BINARY_RE = re.compile(
    r"^(?P<path>.+?)\s+(?P<op>not in|contains|in|==|!=|>=|<=|>|<)\s+(?P<value>.+)$"
)
_UNARY_RE = re.compile(r"^(?P<path>.+?)\s+(?P<op>exists|missing)$")
# "status == missing" compares with the word "missing"; no key ends in "==".
_ENDS_WITH_SYMBOL_OP = re.compile(r"\s(?:==|!=|>=|<=|>|<)$")


class ConditionError(ValueError):
    """A condition in a rules file that cannot be understood."""


@dataclass(frozen=True, slots=True)
class Condition:
    """One compiled condition; call it with a namespace to evaluate it."""

    text: str
    path: tuple[str, ...]
    op: str
    value: Any
    # Derived from the above once, so that an evaluation does no look-ups.
    _compare: Callable[[Any, Any], bool] | None = field(init=False, repr=False, compare=False)
    _on_event: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compare", _BINARY.get(self.op))
        object.__setattr__(self, "_on_event", self.path[0] == "event")

    def __call__(self, namespace: Mapping[str, Any]) -> bool:
        return self._holds(resolve(namespace, self.path))

    def test(self, ctx: Mapping[str, Any], event_fields: Callable[[], Mapping[str, Any]]) -> bool:
        """Evaluate on a context and an event without building a namespace.

        ``event_fields()`` gives what ``event.*`` paths see; it is only called
        by conditions on the event (most read the context only).
        """
        if self._on_event:
            return self._holds(resolve(event_fields(), self.path[1:]))
        return self._holds(resolve(ctx, self.path))

    def _holds(self, found: Any) -> bool:
        compare = self._compare
        if compare is None:
            if self.op == "exists":
                return found is not _MISSING and found is not None
            return found is _MISSING or found is None  # missing
        if found is _MISSING:
            return False
        try:
            return bool(compare(found, self.value))
        except TypeError:
            # Comparing a string with a number, say: the rule does not match.
            return False


def resolve(namespace: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """Follow ``path`` through nested mappings; return ``_MISSING`` if it breaks."""
    node: Any = namespace
    for key in path:
        # Contexts and events are dicts: skip the slower ABC check for them.
        if isinstance(node, (dict, Mapping)):
            node = node.get(key, _MISSING)
            if node is _MISSING:
                return _MISSING
        else:
            return _MISSING
    return node


#: Operators that order their operands (a number written in any YAML form is one).
_ORDERING = frozenset({">", ">=", "<", "<="})


def compile_condition(text: str) -> Condition:
    """Compile one condition line.

    Examples
    --------
    >>> cond = compile_condition("cart.value >= 50")
    >>> cond({"cart": {"value": 80.0}}), cond({"cart": {"value": 10}}), cond({})
    (True, False, False)
    >>> compile_condition("event.properties.category in [shoes, sports]")(
    ...     {"event": {"properties": {"category": "shoes"}}})
    True
    >>> compile_condition("cart.value >= 1e3")({"cart": {"value": 1200}})
    True
    >>> compile_condition("cart.value >= .nan")
    Traceback (most recent call last):
    ...
    rtim.conditions.ConditionError: a number must be finite in condition 'cart.value >= .nan'
    """
    if not isinstance(text, str) or not text.strip():
        raise ConditionError(f"a condition must be a non-empty string, got {text!r}")
    line = text.strip()
    match = _UNARY_RE.match(line)
    if match and _ENDS_WITH_SYMBOL_OP.search(match["path"]):
        match = None
    if match:
        value: Any = None
    else:
        match = _BINARY_RE.match(line)
        if not match:
            raise ConditionError(
                f"cannot read condition {text!r}: expected '<path> <operator> <value>' "
                f"with an operator among {sorted(_BINARY)} or '<path> exists|missing'"
            )
        try:
            value = yaml.safe_load(match["value"])
        except yaml.YAMLError as exc:
            raise ConditionError(f"cannot read the value in condition {text!r}: {exc}") from exc
        if match["op"] in ("in", "not in") and not isinstance(value, list):
            raise ConditionError(f"'{match['op']}' needs a list in condition {text!r}")
        if (
            match["op"] in _ORDERING
            and isinstance(value, str)
            and match["value"].strip()[:1] not in ("'", '"')
        ):
            # YAML reads 1e3 (no dot) and nan, unquoted, as strings, which a number is
            # never ordered against: a number written so is meant as one.
            with contextlib.suppress(ValueError):
                value = float(value)
        if any(
            type(v) is float and not math.isfinite(v)
            for v in (value if isinstance(value, list) else [value])
        ):
            # .nan equals nothing and .inf is passed by nothing: a mistake, never a rule.
            raise ConditionError(f"a number must be finite in condition {text!r}")
    path = tuple(part.strip() for part in match["path"].split("."))
    if not all(path):
        raise ConditionError(f"empty key in the path of condition {text!r}")
    return Condition(text=line, path=path, op=match["op"], value=value)


def compile_all(texts: Any, where: str) -> tuple[Condition, ...]:
    """Compile a YAML list of conditions (or one string); ``where`` names it in errors."""
    if texts is None:
        return ()
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise ConditionError(f"{where}: conditions must be a list of strings")
    try:
        return tuple(compile_condition(t) for t in texts)
    except ConditionError as exc:
        raise ConditionError(f"{where}: {exc}") from None
