"""The per-customer context and the rules that update it from one event.

A context is a plain ``dict`` of JSON types, so that it is serialised with one
``orjson.dumps`` call and read back with one ``orjson.loads``. Every part of it
has a budget (see the ``MAX_*`` constants), so a customer's context stays
compact (a few KiB at most) whatever the customer does.

Fields
------
``id``            customer id (``userId``, or ``anonymousId`` for unknown visitors)
``first_ms``      event time of the first event seen
``last_ms``       event time of the latest event seen
``n``             number of events applied
``types``         count per Segment call type (page, track, ...)
``events``        count per track event name / page name (at most ``MAX_NAMES``)
``channels``      per channel: ``{"n": count, "last_ms": time}``
``pages``         the latest page paths or screen names, newest last
``cart``          ``{"items": {product_id: [quantity, price]}, "value": total}``
``affinity``      decayed interest per product category (half-life ``AFFINITY_HALF_LIFE_MS``)
``orders``        completed orders; ``revenue`` their total
``issues``        open service tickets (opened minus resolved, never negative)
``traits``        the non-identifying traits kept from identify calls (``plan``)
``fired``         per trigger rule, the event time it last fired (cool-downs)
``ids``           the latest message ids applied (duplicate suppression)
``src``           ``[partition, offset]`` of the last clickstream record applied
"""

from __future__ import annotations

import math
from typing import Any

from rtim.events import Event

MAX_NAMES = 48
MAX_PAGES = 10
MAX_IDS = 8
MAX_CART_ITEMS = 50
MAX_CATEGORIES = 16
AFFINITY_HALF_LIFE_MS = 7 * 24 * 3600 * 1000
#: Affinity is decayed in steps of at least this much event time.
AFFINITY_DECAY_STEP_MS = 60_000
#: Traits kept in the context; names, e-mails and addresses never are (privacy).
KEPT_TRAITS = ("plan", "tier", "segment")

_LN2 = math.log(2.0)
# How much each kind of interaction says about interest in a category.
AFFINITY_WEIGHTS = {
    "Product List Viewed": 0.5,
    "Product Viewed": 1.0,
    "Product Added": 3.0,
    "Product Removed": -1.0,
    "Order Completed": 5.0,
}

Context = dict[str, Any]


def new_context(customer_id: str) -> Context:
    """Return the empty context of a customer never seen before."""
    return {
        "id": customer_id,
        "first_ms": None,
        "last_ms": None,
        "n": 0,
        "types": {},
        "events": {},
        "channels": {},
        "pages": [],
        "cart": {"items": {}, "value": 0.0},
        "affinity": {},
        "aff_ms": None,
        "orders": 0,
        "revenue": 0.0,
        "issues": 0,
        "traits": {},
        "fired": {},
        "ids": [],
        "src": None,
    }


def is_duplicate(ctx: Context, event: Event, partition: int, offset: int) -> bool:
    """Tell whether this event was already applied to the context.

    Two cases: a record delivered again after a crash or a rebalance (its offset
    is at or below the last one applied from the same partition), and the same
    ``messageId`` sent twice by a producer (kept for the latest ``MAX_IDS``).
    """
    src = ctx["src"]
    if src is not None and src[0] == partition and offset <= src[1]:
        return True
    return event.message_id in ctx["ids"]


def _as_float(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return default
        return parsed if math.isfinite(parsed) else default
    return default


def _decay_affinity(ctx: Context, now_ms: int) -> None:
    last = ctx["aff_ms"]
    if last is not None and now_ms - last < AFFINITY_DECAY_STEP_MS:
        # Within a session: defer (the next step decays for all the time since
        # ``aff_ms``, so nothing is lost; a value is at most 0.007% too high).
        return
    if last is not None and now_ms > last:
        factor = math.exp(-_LN2 * (now_ms - last) / AFFINITY_HALF_LIFE_MS)
        aff = ctx["affinity"]
        for cat in aff:
            aff[cat] = aff[cat] * factor
    if last is None or now_ms > last:
        ctx["aff_ms"] = now_ms


def _add_affinity(ctx: Context, category: str, weight: float, now_ms: int) -> None:
    _decay_affinity(ctx, now_ms)
    aff = ctx["affinity"]
    aff[category] = max(0.0, aff.get(category, 0.0) + weight)
    if len(aff) > MAX_CATEGORIES:
        del aff[min(aff, key=aff.__getitem__)]


def _recompute_cart(cart: dict[str, Any]) -> None:
    cart["value"] = round(sum(q * p for q, p in cart["items"].values()), 2)


def _products(props: dict[str, Any]) -> list[dict[str, Any]]:
    products = props.get("products")
    if isinstance(products, list):
        return [p for p in products if isinstance(p, dict)]
    return [props]


def _apply_commerce(ctx: Context, name: str, props: dict[str, Any], ts: int) -> None:
    weight = AFFINITY_WEIGHTS.get(name)
    if weight is not None:
        for product in _products(props):
            category = product.get("category")
            if isinstance(category, str) and category:
                _add_affinity(ctx, category.lower(), weight, ts)
    cart = ctx["cart"]
    if name == "Product Added" or name == "Product Removed":
        pid = props.get("product_id") or props.get("sku")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            return
        pid = str(pid)
        qty = _as_float(props.get("quantity"), 1.0)
        if qty <= 0:
            qty = 1.0
        items = cart["items"]
        if name == "Product Added":
            if pid in items or len(items) < MAX_CART_ITEMS:
                old_qty = items[pid][0] if pid in items else 0.0
                items[pid] = [old_qty + qty, max(0.0, _as_float(props.get("price")))]
        elif pid in items:
            left = items[pid][0] - qty
            if left > 0:
                items[pid][0] = left
            else:
                del items[pid]
        _recompute_cart(cart)
        cart["updated_ms"] = ts
    elif name == "Order Completed":
        ctx["orders"] += 1
        total = props.get("total", props.get("revenue"))
        ctx["revenue"] = round(ctx["revenue"] + _as_float(total), 2)
        cart["items"] = {}
        cart["value"] = 0.0
        cart["updated_ms"] = ts
    elif name == "Support Ticket Opened":
        ctx["issues"] += 1
    elif name == "Support Ticket Resolved":
        ctx["issues"] = max(0, ctx["issues"] - 1)


def apply_event(ctx: Context, event: Event, partition: int, offset: int) -> None:
    """Update ``ctx`` in place with one (already validated, non-duplicate) event."""
    ts = event.timestamp_ms
    first = ctx["first_ms"]
    if first is None or ts < first:
        ctx["first_ms"] = ts
    last = ctx["last_ms"]
    if last is None or ts > last:
        ctx["last_ms"] = ts
    ctx["n"] += 1
    if ctx["affinity"]:
        # Conditions and scores read the affinity as of this event: decay it
        # even when this event adds no interest (else old interests stay fresh).
        aff_ms = ctx["aff_ms"]
        if aff_ms is None or ts - aff_ms >= AFFINITY_DECAY_STEP_MS:
            _decay_affinity(ctx, ts)
    event_type = event.type
    types = ctx["types"]
    types[event_type] = types.get(event_type, 0) + 1

    channels = ctx["channels"]
    channel = channels.get(event.channel)
    if channel is None:
        channel = channels[event.channel] = {"n": 0, "last_ms": ts}
    channel["n"] += 1
    if ts > channel["last_ms"]:
        channel["last_ms"] = ts

    name = event.name
    if name:
        counts = ctx["events"]
        if name in counts:
            counts[name] += 1
        elif len(counts) < MAX_NAMES:
            counts[name] = 1
    if event_type == "track":
        if name:
            _apply_commerce(ctx, name, event.properties, ts)
    elif event_type == "page" or event_type == "screen":
        properties = event.properties
        page = properties.get("path") if event_type == "page" else None
        if not isinstance(page, str) or not page:
            ctx_page = event.context.get("page")
            page = ctx_page.get("path") if isinstance(ctx_page, dict) else None
        page = page if isinstance(page, str) and page else name
        if page:
            pages = ctx["pages"]
            pages.append(page[:200])
            if len(pages) > MAX_PAGES:
                del pages[0]
        category = properties.get("category")
        if isinstance(category, str) and category:
            _add_affinity(ctx, category.lower(), 0.5, ts)
    elif event_type == "identify":
        traits = ctx["traits"]
        for trait in KEPT_TRAITS:
            value = event.traits.get(trait)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                traits[trait] = value

    ids = ctx["ids"]
    ids.append(event.message_id)
    if len(ids) > MAX_IDS:
        del ids[0]
    src = ctx["src"]
    if src is None:
        ctx["src"] = [partition, offset]
    else:
        src[0] = partition
        src[1] = offset
