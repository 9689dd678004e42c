"""Features of a decision moment, built from the customer's context and the moment.

The propensity models (:mod:`rtim.learn.models`) read features as an *active
set*: a feature is a string key that is either present or not (AdPredictor
ignores a key's magnitude). So every input is encoded as categorical keys:
a trait as ``traits.plan=gold``, a count as the power-of-two bucket it falls
in (``orders~2`` for 2-3 orders), a time as how long ago it was
(``cart.updated_ms@<1h``).

What is encoded is a :class:`FeatureSpec`: a list of entries, each a context
path (``traits``, ``cart``, ``affinity``, ``pages``, ...; ``moment.channel``
and ``moment.trigger`` name the moment rather than the context) and how it
is encoded. :data:`DEFAULT_SPEC` encodes every kept trait, the channel and
trigger, counts and recency, the cart, the customer's affinity to the
offer's category, the pages the session showed and open service issues,
with no code per offer. :func:`parse_spec` builds a spec from plain data (a
catalog section) and raises :class:`FeatureSpecError` naming the entry.

The features shared by all candidates of a decision are built once
(:meth:`FeatureBuilder.shared`); the few that depend on the offer (its
category's affinity) are added per candidate (:meth:`FeatureBuilder.for_offer`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rtim.context.model import Context
from rtim.errors import ConfigError

#: Encodings a spec entry may name, and the options each accepts.
ENCODINGS: dict[str, frozenset[str]] = {
    # each value (or each key=value of a mapping) is a key of its own
    "category": frozenset(),
    # a number, as the power-of-two bucket it falls in (0, 1, 2-3, 4-7, ...)
    "log2": frozenset({"max"}),
    # present and truthy or not (``issues=yes``)
    "flag": frozenset(),
    # an event time, as how long before the moment it was
    "recency": frozenset(),
    # the cart: empty, or its value bucket and its number of lines
    "cart": frozenset(),
    # the customer's affinity to the offer's category (per offer)
    "offer_affinity": frozenset({"max"}),
    # the last few items of a list (recent pages), cut to their leading path segments
    "recent": frozenset({"last", "depth"}),
}
#: Encodings whose keys depend on the offer (added per candidate).
PER_OFFER = frozenset({"offer_affinity"})
#: Paths that name the decision moment, not the context.
MOMENT_PATHS = frozenset({"moment.channel", "moment.trigger"})

#: Recency buckets: upper bound (ms) and label.
_RECENCY = (
    (60_000, "<1m"),
    (600_000, "<10m"),
    (3_600_000, "<1h"),
    (86_400_000, "<1d"),
    (7 * 86_400_000, "<7d"),
    (30 * 86_400_000, "<30d"),
)

DEFAULT_SPEC_DATA: list[dict[str, Any]] = [
    {"path": "moment.channel", "encode": "category"},
    {"path": "moment.trigger", "encode": "category"},
    {"path": "traits", "encode": "category"},
    {"path": "n", "encode": "log2", "max": 10},
    {"path": "orders", "encode": "log2", "max": 5},
    {"path": "first_ms", "encode": "recency"},
    {"path": "cart", "encode": "cart"},
    {"path": "issues", "encode": "flag"},
    {"path": "pages", "encode": "recent", "last": 3, "depth": 2},
    {"path": "affinity", "encode": "offer_affinity", "max": 4},
]


class FeatureSpecError(ConfigError, ValueError):
    """A feature spec cannot be used; the message names the entry and why."""


@dataclass(frozen=True, slots=True)
class FeatureEntry:
    """One context path and how it is encoded."""

    path: str
    encode: str
    options: Mapping[str, int]
    keys: tuple[str, ...]  # the path split on dots

    @property
    def per_offer(self) -> bool:
        return self.encode in PER_OFFER


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    entries: tuple[FeatureEntry, ...]


def parse_spec(data: Any, where: str = "features") -> FeatureSpec:
    """Build a spec from a list of ``{path, encode, **options}`` mappings."""
    if not isinstance(data, list) or not data:
        raise FeatureSpecError(f"{where}: must be a non-empty list of {{path, encode}} entries")
    entries = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(raw, dict):
            raise FeatureSpecError(f"{at}: must be a mapping with 'path' and 'encode'")
        path = raw.get("path")
        if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
            raise FeatureSpecError(f"{at}: 'path' must be a dotted context path, got {path!r}")
        at = f"{where}[{i}] (path {path!r})"
        encode = raw.get("encode")
        if encode not in ENCODINGS:
            raise FeatureSpecError(f"{at}: unknown encoding {encode!r}; known: {sorted(ENCODINGS)}")
        if path.startswith("moment.") and path not in MOMENT_PATHS:
            raise FeatureSpecError(f"{at}: unknown moment path; known: {sorted(MOMENT_PATHS)}")
        options = {k: v for k, v in raw.items() if k not in ("path", "encode")}
        unknown = set(options) - ENCODINGS[encode]
        if unknown:
            raise FeatureSpecError(
                f"{at}: option(s) {sorted(map(str, unknown))} do not apply to encoding {encode!r}"
            )
        for key, value in options.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FeatureSpecError(f"{at}: option {key!r} must be an integer >= 1")
        if (path, encode) in seen:
            raise FeatureSpecError(f"{at}: encoded twice the same way")
        seen.add((path, encode))
        entries.append(FeatureEntry(path, encode, options, tuple(path.split("."))))
    return FeatureSpec(tuple(entries))


DEFAULT_SPEC = parse_spec(DEFAULT_SPEC_DATA, "default features")


def _lookup(ctx: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = ctx
    for key in keys:
        # Contexts are dicts: the tuple skips the slower ABC check for them.
        if not isinstance(value, (dict, Mapping)):
            return None
        value = value.get(key)
    return value


def log2_bucket(value: float, top: int) -> int:
    """0 for <= 0 (and not a number), 1 for (0, 2), then one bucket per power of two.

    >>> [log2_bucket(v, 10) for v in (0, 1, 2, 3, 4, 100, 1e9)]
    [0, 1, 2, 2, 3, 7, 10]
    """
    if not value > 0:
        return 0
    if value < 2:
        return 1
    return min(top, int(math.log2(value)) + 1)


def recency_label(age_ms: float) -> str:
    for bound, label in _RECENCY:
        if age_ms < bound:
            return label
    return ">=30d"


_EMPTY: Mapping[Any, Any] = {}


def _bucket(value: Any, top: int) -> int:
    """:func:`log2_bucket` of a number, 0 of anything else."""
    if type(value) is float or _is_number(value):
        return log2_bucket(value, top)
    return 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: Pages whose keys a builder remembers (per entry; forgotten all at once when full).
_PAGES_REMEMBERED = 4096


def _keys_of(entry: FeatureEntry) -> Any:
    """The keys an entry's encoding can give, formatted once (see FeatureBuilder.shared)."""
    path = entry.path
    if entry.encode == "log2":
        return tuple(f"{path}~{b}" for b in range(entry.options.get("max", 10) + 1))
    if entry.encode == "flag":
        return (f"{path}=no", f"{path}=yes")
    if entry.encode == "recency":
        labels = [label for _, label in _RECENCY] + [">=30d"]
        return {None: f"{path}@never"} | {label: f"{path}@{label}" for label in labels}
    if entry.encode == "cart":
        return (
            f"{path}=empty",
            tuple(f"{path}.value~{b}" for b in range(15)),
            tuple(f"{path}.items~{b}" for b in range(6)),
        )
    if entry.encode == "recent":
        return {}  # page -> its key, filled as pages are met
    return None


class FeatureBuilder:
    """Builds a decision's features from a context and the moment, as lists of keys."""

    __slots__ = ("_offer_entries", "_own", "_shared_entries", "_shared_keys", "_singles", "spec")

    def __init__(self, spec: FeatureSpec = DEFAULT_SPEC) -> None:
        self.spec = spec
        self._shared_entries = tuple(e for e in spec.entries if not e.per_offer)
        self._offer_entries = tuple(e for e in spec.entries if e.per_offer)
        # Per offer entry: its context path, top bucket and the key of each bucket,
        # formatted once (a candidate's keys are looked up, not formatted).
        self._own = tuple(
            (e.keys, top, tuple(f"{e.path}~{b}" for b in range(top + 1)))
            for e in self._offer_entries
            for top in (e.options.get("max", 4),)
        )
        self._singles = tuple((k,) for k in self._own[0][2]) if len(self._own) == 1 else ()
        # Per shared entry, its keys formatted once where they are few (buckets, flags,
        # recency labels, the cart's), or remembered as met (pages): most keys of a
        # decision are looked up, not formatted.
        self._shared_keys = tuple((e, _keys_of(e)) for e in self._shared_entries)

    def shared(self, ctx: Context, *, channel: str, trigger: str, now_ms: int) -> list[str]:
        """The keys every candidate of this decision shares."""
        out: list[str] = []
        append = out.append
        for entry, keys in self._shared_keys:
            path = entry.path
            if path == "moment.channel":
                value: Any = channel
            elif path == "moment.trigger":
                value = trigger
            else:
                value = _lookup(ctx, entry.keys)
            encode = entry.encode
            if encode == "category":
                if isinstance(value, (dict, Mapping)):
                    for k, v in value.items():
                        if isinstance(v, (str, int, float)):
                            append(f"{path}.{k}={v}")
                elif isinstance(value, (str, int, float)) and value != "":
                    append(f"{path}={value}")
            elif encode == "log2":
                number = value if _is_number(value) else 0
                append(keys[log2_bucket(number, len(keys) - 1)])
            elif encode == "flag":
                append(keys[1] if value else keys[0])
            elif encode == "recency":
                append(keys[recency_label(now_ms - value)] if _is_number(value) else keys[None])
            elif encode == "cart":
                items = value.get("items") if isinstance(value, (dict, Mapping)) else None
                if not items:
                    append(keys[0])
                else:
                    append(keys[1][log2_bucket(value.get("value", 0.0), 14)])
                    append(keys[2][log2_bucket(len(items), 5)])
            elif encode == "recent" and isinstance(value, list):
                seen = set()
                depth = entry.options.get("depth", 2)
                for item in value[-entry.options.get("last", 3) :]:
                    if isinstance(item, str):
                        key = keys.get(item)
                        if key is None:
                            if len(keys) >= _PAGES_REMEMBERED:
                                keys.clear()
                            cut = "/".join(item.strip("/").split("/")[:depth])
                            key = keys[item] = f"{path}={cut}"
                        if key not in seen:
                            seen.add(key)
                            append(key)
        return out

    def own(self, ctx: Context, category: str | None) -> tuple[str, ...]:
        """The keys of one candidate offer, scored with the shared ones."""
        return self.owns(ctx, (category,))[0]

    def owns(self, ctx: Context, categories: Sequence[str | None]) -> list[tuple[str, ...]]:
        """:meth:`own` of each of these offers' categories, in order (one tuple per
        category: the offers of a category share it)."""
        if not self._own:
            return [()] * len(categories)
        tables: list[tuple[Mapping[Any, Any], int, tuple[str, ...]]] = []
        for path, top, bucket_keys in self._own:
            table = _lookup(ctx, path)
            tables.append(
                (table if isinstance(table, (dict, Mapping)) else _EMPTY, top, bucket_keys)
            )
        # The usual spec has one per-offer entry: its keys come as ready tuples.
        singles = self._singles
        table, top, _ = tables[0]
        # offer_affinity is the only per-offer encoding: an offer without a category
        # has no affinity key at all.
        by_category: dict[str | None, tuple[str, ...]] = {None: ()}
        out = []
        for category in categories:
            own = by_category.get(category)
            if own is None:
                own = by_category[category] = (
                    singles[_bucket(table.get(category, 0.0), top)]
                    if singles
                    else tuple([keys[_bucket(t.get(category, 0.0), n)] for t, n, keys in tables])
                )
            out.append(own)
        return out

    def for_offer(self, shared: list[str], ctx: Context, category: str | None) -> list[str]:
        """All the keys one candidate is scored on: the shared ones and its own."""
        return [*shared, *self.own(ctx, category)]


def explain(features: Sequence[str]) -> str:
    """One line for people: the keys, comma separated."""
    return ", ".join(features)
