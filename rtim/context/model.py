"""The per-customer context and the rules that update it from one event.

A context is a plain ``dict`` of JSON types, so that it is serialised with one
``orjson.dumps`` call and read back with one ``orjson.loads``.

Budgets
-------
Every part of a context has a budget (the ``MAX_*`` constants): how many event
names, pages, cart lines, categories and message ids are kept, and how long
the strings kept may be (longer names are not counted; pages, product ids,
categories and trait values are cut). The customer id is at most
:data:`rtim.events.segment.MAX_CUSTOMER_ID_CHARS` (longer ones are refused by
the parser). Every part at its budget with plain ASCII strings makes a
context of about 43 KB (12 KB of it message ids, 15 KB the contact policy's
contacts, dismissals and consent); a typical one is 1-2 KB.

The serialised context has a hard ceiling, :data:`MAX_CONTEXT_BYTES` (64 KiB;
Kafka's default record limit is 1 MiB). Strings of characters that JSON
escapes (6 bytes each) or of multi-byte characters can reach it: the engine
then refuses (dead-letters as ``too_large``) each event that would take the
context over it, and the context stays as it was before that event.

Every number written is finite: a price, quantity or order total beyond
:data:`MAX_AMOUNT` is refused (``out_of_range``), so sums cannot overflow.
A stored context without the current ``v`` is repaired when loaded (see
:func:`repair`), so that a context stored by an older version, even with
``null`` where a number belongs, never makes its customer's events fail.

Fields
------
``v``             shape version (:data:`VERSION`); a stored context without it is repaired
``id``            customer id (``userId``, or ``anonymousId`` for unknown visitors)
``first_ms``      event time of the first event seen
``last_ms``       event time of the latest event seen (the customer's event-time clock)
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
``ids``           the message ids applied lately, 12 characters each (duplicate suppression)
``id_hours``      ``[hour, count, hour, count, ...]``: how many of ``ids`` are of each hour
``ids_ms``        the event time before which message ids may have been forgotten
``pending``       open decisions: ``[decision id, offer id, features, decided ms, window end ms,
                  outcomes seen]``, oldest first (:mod:`rtim.learn.attribution`)
``closed``        decisions closed lately: ``[decision id, window end ms, outcomes seen, offer
                  id]`` (a late dismissal still cools its offer down; null when repaired)
``tz``            the customer's IANA time zone (Segment ``context.timezone``), or null
``consent``       per channel the customer said yes or no to: ``{channel: [allowed, event ms]}``
``consent_cat``   per Segment consent category: ``{category: [allowed, event ms]}``
``contacts``      offers made: ``[event ms, channel, offer id, group]``, oldest first
``dismissed``     per offer, the event time of its latest dismissal
``src``           ``[partition, offset]`` of the last clickstream record applied

Consent and time zone
---------------------
Consent is read from three sources, each change stamped with its event time
(an event older than the stamp changes nothing, so late events cannot undo a
newer choice):

- identify trait ``consent``, per channel: ``{"traits": {"consent": {"email": false,
  "sms": true}}}`` (Segment recommends traits for communication preferences);
- Segment Consent Management's ``context.consent.categoryPreferences``
  (``{"Advertising": true, "Functional": false}``) on any event, among them the
  ``Segment Consent Preference Updated`` track event; an empty
  ``categoryPreferences`` withdraws every category (as Segment's profiles do).
  The catalog's ``policy.consent.categories`` says which channels a category
  covers; at most :data:`~rtim.offers.policy.MAX_CONSENT_CATEGORIES` are kept
  (a new one replaces one that is granted, never a withdrawal).

Which source counts for a channel is decided by :mod:`rtim.decide.policy`: the
latest change among the channel's own consent and its categories' wins.
``context.timezone`` (an IANA name; others are ignored) sets ``tz``.

Contacts are recorded when a decision offers something, dismissals when a
dismissal response joins its decision (:mod:`rtim.decide.policy`); both are
pruned past the catalog's longest cap window and cool-down, and bounded
(:data:`~rtim.offers.policy.MAX_CONTACTS`, :data:`~rtim.offers.policy.MAX_DISMISSALS`).

Duplicate suppression
---------------------
A ``messageId`` applied to a customer is remembered as a 72-bit BLAKE2b
digest in 12 base64 characters (stable across processes, unlike ``hash()``),
appended to the string ``ids`` with the other ids of its event hour
(``id_hours`` counts them per hour, oldest first, in one flat list of
integers), so that a look-up is one substring search, expiry is cutting the
front of the string, and a context holds no object per id or per hour. An hour is
dropped once the customer's clock (``last_ms``, the latest event time applied)
is more than the dedupe window past the hour's end: a message id is
remembered for at least the window (default 24 hours, ``RTIM_DEDUPE_WINDOW_S``)
of the customer's own event time, at most one hour more. Wall-clock time plays
no part, so a backlog or a replay processed at any speed, in any batches,
gives the same result as the live run.

Memory per customer is bounded by :data:`MAX_IDS` message ids (12 KiB). A
customer with more events than that within the window (a bot: more than one
event every 84 s for a day) loses its oldest hours early, so its window is
shorter than the setting.

Whenever ids are forgotten, ``ids_ms`` moves to the end of what was forgotten
(never past the customer's latest event + 1 ms). An event stamped before
``ids_ms`` cannot be checked, so it is refused (``too_old``) rather than risk
applying it twice. In a live run that is an event more than the window older
than the customer's latest event (say, an offline phone that reconnects two
days later while the customer went on shopping on the web). An event older
than the window but after ``ids_ms`` (nothing of its time was forgotten) is
applied and its id forgotten at once, so a repeat of it is refused.

For a replay of yesterday's topic this means: a replayed event is dropped as
a duplicate if its customer's latest event is less than the window after it,
and dead-lettered as ``too_old`` otherwise; none is applied twice. To replay
the last D days with every event recognised as a duplicate, set the window to
more than D days plus the time since (memory permitting, see :data:`MAX_IDS`).
A resent event is recognised by its ``messageId`` alone; its event time may
differ, as long as it is not before ``ids_ms``.
"""

from __future__ import annotations

import binascii
import hashlib
import math
import re
from collections.abc import Collection
from typing import Any, TypeGuard

import orjson

from rtim.events import Event, InvalidEvent
from rtim.events.segment import CHANNELS, EVENT_TYPES
from rtim.learn.attribution import MAX_CLOSED_PER_CUSTOMER, MAX_PENDING_PER_CUSTOMER
from rtim.names import OFFER_CHANNELS
from rtim.offers.policy import (
    MAX_CATEGORY_CHARS as MAX_CONSENT_CATEGORY_CHARS,
)
from rtim.offers.policy import (
    MAX_CONSENT_CATEGORIES,
    MAX_CONTACTS,
    MAX_DISMISSALS,
    known_zone,
)
from rtim.settings import DEFAULTS

#: Shape version, stored in ``v``; contexts stored without it are repaired on load.
VERSION = 4
#: Event and page names counted; names longer than ``MAX_NAME_CHARS`` are not counted.
MAX_NAMES = 48
MAX_NAME_CHARS = 64
#: Recent pages kept, each cut to ``MAX_PAGE_CHARS``.
MAX_PAGES = 10
MAX_PAGE_CHARS = 200
#: Cart lines kept; product ids are cut to ``MAX_PRODUCT_ID_CHARS``.
MAX_CART_ITEMS = 50
MAX_PRODUCT_ID_CHARS = 64
#: Categories with an affinity; names cut to ``MAX_CATEGORY_CHARS``.
MAX_CATEGORIES = 16
MAX_CATEGORY_CHARS = 64
#: Open decisions and lately closed ones kept per customer (the join's budgets).
MAX_PENDING = MAX_PENDING_PER_CUSTOMER
MAX_CLOSED = MAX_CLOSED_PER_CUSTOMER
#: Kept trait strings are cut to this length.
MAX_TRAIT_CHARS = 64
#: Message ids remembered per customer (duplicate suppression), 12 bytes each.
MAX_IDS = 1024
#: Largest price, quantity or order total accepted (absolute value); beyond it
#: the event is refused (``out_of_range``), so that every sum stays finite.
MAX_AMOUNT = 1e12
#: Hard ceiling of a serialised context (Kafka's default record limit is 1 MiB).
MAX_CONTEXT_BYTES = 64 * 1024
#: Default duplicate-suppression window (event time); ``RTIM_DEDUPE_WINDOW_S``.
DEDUPE_WINDOW_MS = int(DEFAULTS.dedupe_window_s * 1000)
#: Message ids are kept and expired per bucket of this much event time.
ID_BUCKET_MS = 3600 * 1000
#: Characters of one remembered message id (9 digest bytes in base64).
ID_TOKEN_CHARS = 12
_MAX_ID_CHARS = MAX_IDS * ID_TOKEN_CHARS
AFFINITY_HALF_LIFE_MS = 7 * 24 * 3600 * 1000
#: Affinity is decayed in steps of at least this much event time.
AFFINITY_DECAY_STEP_MS = 60_000
#: Traits kept in the context by default (the catalog's ``learning.traits`` sets
#: the allowlist); names, e-mails, phone numbers and addresses never are (privacy).
KEPT_TRAITS = ("plan", "tier", "segment")
#: Most traits an allowlist may name, and the longest trait name.
MAX_TRAITS = 16
MAX_TRAIT_NAME_CHARS = 64
#: Trait names that identify a person: no allowlist may name them.
IDENTIFYING_TRAITS = frozenset(
    {
        "name",
        "first_name",
        "firstname",
        "last_name",
        "lastname",
        "username",
        "email",
        "phone",
        "phone_number",
        "mobile",
        "address",
        "street",
        "city",
        "postal_code",
        "postcode",
        "zip",
        "birthday",
        "date_of_birth",
        "ip",
        "ssn",
        "passport",
    }
)

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

_ID_HASH = hashlib.blake2b(digest_size=9)
_b64 = binascii.b2a_base64


def new_context(customer_id: str) -> Context:
    """Return the empty context of a customer never seen before."""
    return {
        "v": VERSION,
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
        "ids": "",
        "id_hours": [],
        "ids_ms": None,
        "pending": [],
        "closed": [],
        "tz": None,
        "consent": {},
        "consent_cat": {},
        "contacts": [],
        "dismissed": {},
        "src": None,
    }


_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
_PHONE = re.compile(r"\+?[\d\s().\-/]{7,}")


def looks_identifying(value: str) -> bool:
    """Whether a trait's value is an e-mail address or a phone number, which no
    allowlisted trait name makes fit to keep (a source may put anything in ``plan``).

    >>> [looks_identifying(v) for v in ("gold", "jane.doe@example.com", "+1-202-555-0143",
    ...     "(020) 7946 0018", "2024-06-01", "tier 3", "12345", "202 555 0143")]
    [False, True, True, True, False, False, False, True]
    """
    text = value[: 4 * MAX_TRAIT_CHARS].strip()  # the kept part and then some: linear
    if "@" in text and _EMAIL.search(text):
        return True
    if _PHONE.fullmatch(text) is None:
        return False
    # Nine digits and more, or seven with an international or area prefix; not a date
    # (2024-06-01 has eight).
    digits = sum(c.isdigit() for c in text)
    return digits >= 9 or (digits >= 7 and text[0] in "+(")


def id_token(message_id: str) -> str:
    """The form a message id is remembered in: a stable 72-bit digest, 12 characters.

    (Python's ``hash()`` is salted per process, so it cannot be stored.)

    >>> id_token("m-1"), len(id_token("a" * 500))
    ('bmFQofpis7k+', 12)
    """
    digest = _ID_HASH.copy()  # cheaper than building a hasher with its parameters
    digest.update(message_id.encode())
    return _b64(digest.digest(), newline=False).decode()


def _remembered(tokens: str, token: str) -> bool:
    i = tokens.find(token)
    while i >= 0:
        if i % ID_TOKEN_CHARS == 0:
            return True
        i = tokens.find(token, i + 1)  # a match across two tokens
    return False


def is_duplicate(
    ctx: Context, event: Event, partition: int, offset: int, token: str | None = None
) -> bool:
    """Tell whether this event was already applied to the context.

    Two cases: a record delivered again after a crash or a rebalance (its offset
    is at or below the last one applied from the same partition), and the same
    ``messageId`` sent again (remembered for the dedupe window, see the module
    notes). ``token`` is ``id_token(event.message_id)``, if already computed.
    """
    src = ctx["src"]
    if src is not None and src[0] == partition and offset <= src[1]:
        return True
    tokens = ctx["ids"]
    if not tokens:
        return False
    return _remembered(tokens, token if token is not None else id_token(event.message_id))


def _remember_late(ctx: Context, token: str, hour: int) -> None:
    """Remember the id of an event of a new hour, or of an earlier hour (a late event)."""
    hours = ctx["id_hours"]
    if hours and hours[-2] > hour:  # into the middle, with the ids of its hour
        i = at = 0
        while hours[i] < hour:
            at += hours[i + 1]
            i += 2
        if hours[i] == hour:
            at += hours[i + 1]
            hours[i + 1] += 1
        else:
            hours[i:i] = (hour, 1)
        at *= ID_TOKEN_CHARS
        tokens = ctx["ids"]
        ctx["ids"] = tokens[:at] + token + tokens[at:]
    else:
        hours += (hour, 1)
        ctx["ids"] += token


def _forget(ctx: Context, cutoff: int) -> None:
    """Drop the hours before ``cutoff``, then the oldest hours beyond ``MAX_IDS``."""
    hours = ctx["id_hours"]
    tokens = ctx["ids"]
    limit = _MAX_ID_CHARS
    cut = 0
    last = None
    while hours and (hours[0] < cutoff or len(tokens) - cut > limit):
        last, count = hours[0], hours[1]
        del hours[:2]
        cut += count * ID_TOKEN_CHARS
    ctx["ids"] = tokens[cut:]
    if last is not None:
        # Every id forgotten had an event time before the end of its hour, and
        # none is after the customer's clock.
        horizon = min((last + 1) * ID_BUCKET_MS, ctx["last_ms"] + 1)
        if ctx["ids_ms"] is None or horizon > ctx["ids_ms"]:
            ctx["ids_ms"] = horizon


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


def _amount(props: dict[str, Any], field: str, default: float = 0.0) -> float:
    value = _as_float(props.get(field), default)
    if -MAX_AMOUNT <= value <= MAX_AMOUNT:
        return value
    raise InvalidEvent(
        "out_of_range",
        f"properties.{field} is {value:.6g}, beyond the limit of {MAX_AMOUNT:.0e}",
        field=f"properties.{field}",
    )


def _amounts(name: str, props: dict[str, Any]) -> tuple[float, float]:
    """The numbers a commerce event adds, checked before anything changes."""
    if name == "Order Completed":
        return _amount(props, "total" if "total" in props else "revenue"), 0.0
    return _amount(props, "quantity", 1.0), _amount(props, "price")


#: The events whose numbers are summed into the context.
_AMOUNT_EVENTS = frozenset({"Product Added", "Product Removed", "Order Completed"})


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


def _apply_commerce(
    ctx: Context, name: str, props: dict[str, Any], ts: int, amounts: tuple[float, float] | None
) -> None:
    weight = AFFINITY_WEIGHTS.get(name)
    if weight is not None:
        for product in _products(props):
            category = product.get("category")
            if isinstance(category, str) and category:
                _add_affinity(ctx, category[:MAX_CATEGORY_CHARS].lower(), weight, ts)
    if amounts is None:
        if name == "Support Ticket Opened":
            ctx["issues"] += 1
        elif name == "Support Ticket Resolved":
            ctx["issues"] = max(0, ctx["issues"] - 1)
        return
    cart = ctx["cart"]
    if name == "Order Completed":
        ctx["orders"] += 1
        ctx["revenue"] = round(ctx["revenue"] + amounts[0], 2)
        cart["items"] = {}
        cart["value"] = 0.0
        cart["updated_ms"] = ts
        return
    pid = props.get("product_id") or props.get("sku")
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        return
    pid = str(pid)[:MAX_PRODUCT_ID_CHARS]
    qty, price = amounts
    if qty <= 0:
        qty = 1.0
    items = cart["items"]
    if name == "Product Added":
        if pid in items or len(items) < MAX_CART_ITEMS:
            old_qty = items[pid][0] if pid in items else 0.0
            items[pid] = [old_qty + qty, max(0.0, price)]
    elif pid in items:
        left = items[pid][0] - qty
        if left > 0:
            items[pid][0] = left
        else:
            del items[pid]
    _recompute_cart(cart)
    cart["updated_ms"] = ts


def apply_event(
    ctx: Context,
    event: Event,
    partition: int,
    offset: int,
    token: str | None = None,
    window_ms: int = DEDUPE_WINDOW_MS,
    traits: tuple[str, ...] = KEPT_TRAITS,
    categories: Collection[str] = (),
) -> None:
    """Update ``ctx`` in place with one (already validated, non-duplicate) event.

    ``traits`` are the identify traits kept (the catalog's allowlist); ``categories``
    the consent categories the catalog's policy reads (kept first, see
    :func:`_category_consent`).

    ``token`` is ``id_token(event.message_id)`` if already computed;
    ``window_ms`` the dedupe window. Raises :class:`InvalidEvent` (``too_old``,
    ``out_of_range``) before changing anything: the event cannot be applied.
    """
    ts = event.timestamp_ms
    horizon = ctx["ids_ms"]
    if horizon is not None and ts < horizon:
        raise InvalidEvent(
            "too_old",
            f"event time is {(horizon - ts) / 3_600_000:.1f} h before the oldest event time "
            f"whose message ids this customer's context still remembers (dedupe window "
            f"{window_ms / 3_600_000:g} h of the customer's event time): it may be a repeat",
            field="timestamp",
        )
    event_type = event.type
    name = event.name
    amounts = None
    if event_type == "track" and name in _AMOUNT_EVENTS:
        amounts = _amounts(name, event.properties)

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
    types = ctx["types"]
    types[event_type] = types.get(event_type, 0) + 1

    channels = ctx["channels"]
    channel = channels.get(event.channel)
    if channel is None:
        channel = channels[event.channel] = {"n": 0, "last_ms": ts}
    channel["n"] += 1
    if ts > channel["last_ms"]:
        channel["last_ms"] = ts

    if name:
        counts = ctx["events"]
        if name in counts:
            counts[name] += 1
        elif len(counts) < MAX_NAMES and len(name) <= MAX_NAME_CHARS:
            counts[name] = 1
    if event_type == "track":
        if name:
            _apply_commerce(ctx, name, event.properties, ts, amounts)
    elif event_type == "page" or event_type == "screen":
        properties = event.properties
        page = properties.get("path") if event_type == "page" else None
        if not isinstance(page, str) or not page:
            ctx_page = event.context.get("page")
            page = ctx_page.get("path") if isinstance(ctx_page, dict) else None
        page = page if isinstance(page, str) and page else name
        if page:
            pages = ctx["pages"]
            pages.append(page[:MAX_PAGE_CHARS])
            if len(pages) > MAX_PAGES:
                del pages[0]
        category = properties.get("category")
        if isinstance(category, str) and category:
            _add_affinity(ctx, category[:MAX_CATEGORY_CHARS].lower(), 0.5, ts)
    elif event_type == "identify":
        kept = ctx["traits"]
        for trait in traits:
            value = event.traits.get(trait)
            if isinstance(value, str):
                if looks_identifying(value):
                    kept.pop(trait, None)  # the trait's value is now one not to keep
                else:
                    kept[trait] = value[:MAX_TRAIT_CHARS]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                kept[trait] = value  # finite: JSON has no infinities
    segment = event.context
    if segment:
        zone = segment.get("timezone")
        if zone is not None and zone != ctx["tz"] and known_zone(zone) is not None:
            ctx["tz"] = zone
    apply_consent(ctx, event, categories)

    # Remember the message id (see the module notes), then forget what is due.
    if token is None:
        token = id_token(event.message_id)
    hours = ctx["id_hours"]
    hour = ts // ID_BUCKET_MS
    if hours and hours[-2] == hour:
        hours[-1] += 1
        ctx["ids"] += token
    else:
        _remember_late(ctx, token, hour)
    cutoff = (ctx["last_ms"] - window_ms) // ID_BUCKET_MS
    if hours[0] < cutoff or len(ctx["ids"]) > _MAX_ID_CHARS:
        _forget(ctx, cutoff)
    src = ctx["src"]
    if src is None:
        ctx["src"] = [partition, offset]
    else:
        src[0] = partition
        src[1] = offset


#: Consent values as sources write them, besides JSON's true and false (a consent
#: written as a string must not be ignored, least of all a withdrawal).
_CONSENT_WORDS = {
    "true": True,
    "yes": True,
    "1": True,
    "granted": True,
    "false": False,
    "no": False,
    "0": False,
    "denied": False,
}


def consent_value(value: Any) -> bool | None:
    """A consent flag as given (``true``, ``"false"``, ``"No"``, ``0``...); None if it
    says neither.

    >>> [consent_value(v) for v in (False, "false", " No ", 0, 1, "granted", "maybe", 2, None)]
    [False, False, False, False, True, True, None, None, None]
    """
    if type(value) is bool:
        return value
    if type(value) is int:
        return {0: False, 1: True}.get(value)
    if type(value) is str:
        return _CONSENT_WORDS.get(value.strip().lower())
    return None


def _channel_consent(ctx: Context, consent: dict[str, Any], ts: int) -> None:
    """Trait ``consent``: ``{channel: true|false}`` (channel names in any case, flags as
    :func:`consent_value` reads them); other channels and values are ignored."""
    kept = ctx["consent"]
    for name, given in consent.items():
        channel = name.strip().lower() if type(name) is str else name
        allowed = consent_value(given)
        if channel in OFFER_CHANNELS and allowed is not None:
            old = kept.get(channel)
            if old is None or ts >= old[1]:
                kept[channel] = [allowed, ts]


def apply_consent(ctx: Context, event: Event, categories: Collection[str] = ()) -> bool:
    """Apply the consent an event carries (:func:`apply_event` does, and so it is for an
    event refused for what else it would add: a withdrawal holds whatever the rest of
    the event); returns whether it carried any."""
    ts = event.timestamp_ms
    carried = False
    consent = event.traits.get("consent") if event.type == "identify" else None
    if type(consent) is dict:
        _channel_consent(ctx, consent, ts)
        carried = True
    consent = event.context.get("consent") if event.context else None
    if type(consent) is dict and type(consent.get("categoryPreferences")) is dict:
        _category_consent(ctx, consent["categoryPreferences"], ts, categories)
        carried = True
    return carried


def _category_consent(
    ctx: Context, preferences: Any, ts: int, categories: Collection[str] = ()
) -> None:
    """Segment's ``categoryPreferences``: ``{category: true|false}``; ``{}`` withdraws all.

    At most :data:`MAX_CONSENT_CATEGORIES` are kept. When full, a category granted goes
    first (never a withdrawal of one the catalog reads, ``categories``); a category the
    catalog reads takes the place of one it does not, withdrawn or not, so that a
    withdrawal the policy needs is never dropped for a consent tool's long list."""
    if type(preferences) is not dict:
        return
    kept = ctx["consent_cat"]
    if not preferences:
        preferences = dict.fromkeys(kept, False)
    for category, given in preferences.items():
        allowed = consent_value(given)
        if allowed is None or len(category) > MAX_CONSENT_CATEGORY_CHARS:
            continue
        old = kept.get(category)
        if old is not None:
            if ts >= old[1] and old[0] is not allowed:
                kept[category] = [allowed, ts]
            continue
        if len(kept) >= MAX_CONSENT_CATEGORIES:
            # Forget a category granted, one the catalog does not read first; for one it
            # reads, any it does not.
            victim = next((c for c, v in kept.items() if v[0] and c not in categories), None)
            if victim is None:
                victim = next((c for c, v in kept.items() if v[0]), None)
            if victim is None and category in categories:
                victim = next((c for c in kept if c not in categories), None)
            if victim is None:
                continue
            del kept[victim]
        kept[category] = [allowed, ts]


# --------------------------------------------------------------------------
# Loading stored contexts
# --------------------------------------------------------------------------


def load_context(raw: bytes, customer_id: str) -> tuple[Context, bool]:
    """Decode a stored context; repair one of an older shape or a damaged one.

    Returns the context and whether it had to be repaired. A context written by
    this version (``v`` is :data:`VERSION`) is taken as it is: every number it
    holds was checked when it was written.
    """
    try:
        ctx = orjson.loads(raw)
    except orjson.JSONDecodeError:
        ctx = None
    if type(ctx) is dict and ctx.get("v") == VERSION:
        return ctx, False
    return repair(ctx, customer_id), True


#: A serialised context's last field (``src`` is written last): read without decoding.
_SRC_TAIL = re.compile(rb'"src":(?:null|\[(\d+),(\d+)(?:,(\d+))?\])\}$')


def context_version(raw: bytes) -> tuple[int, int, int] | None:
    """The ``src`` of a stored context, ``(partition, offset, changes)``: how far it was
    built.

    Two contexts of one customer built from the same partition are ordered by it:
    the one with the higher offset has every event the other has, and of two with the
    same offset, the one with more changes that are not events (windows closed,
    responses joined, decisions requested or handed over: :func:`note_change`) has
    every change the other has (table recovery keeps it, whatever order the changelog
    has them in). None when no record was applied yet or ``raw`` is not a context.

    >>> context_version(b'{"n":2,"src":[3,41]}'), context_version(b'{"src":[3,41,2]}')
    ((3, 41, 0), (3, 41, 2))
    >>> context_version(b'{"src":null}') is None
    True
    """
    match = _SRC_TAIL.search(raw, max(0, len(raw) - 64))
    if match is not None:
        if match[1] is None:
            return None
        return int(match[1]), int(match[2]), int(match[3] or 0)
    try:  # written with another field order, or damaged
        src = orjson.loads(raw).get("src")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if _is_src(src):
        return src[0], src[1], src[2] if len(src) == 3 else 0
    return None


def _is_src(src: Any) -> TypeGuard[list[int]]:
    return type(src) is list and len(src) in (2, 3) and all(_is_int(x) and x >= 0 for x in src)


def note_change(ctx: Context, changes: int = 1) -> None:
    """Count changes of the context that are not events (decisions whose windows closed,
    a response joined, a decision requested or handed over) in its ``src``, so that a
    version of the context without them is older (:func:`context_version`). Counted
    per decision and per response, the count does not depend on how records were
    batched."""
    src = ctx["src"]
    if src is None or not changes:
        return  # no event yet: nothing to order it by
    if len(src) == 2:
        src.append(changes)
    else:
        src[2] += changes


def _is_int(value: Any) -> TypeGuard[int]:
    return type(value) is int


def _is_number(value: Any) -> TypeGuard[int | float]:
    return type(value) in (int, float) and math.isfinite(value)


def repair(stored: Any, customer_id: str) -> Context:
    """Rebuild a valid context from what a stored one still holds.

    What is kept must have the right type and be within the budgets; a number
    that is missing or not finite (versions before 2 stored an overflow as
    ``null``) starts again from zero, other parts from empty. Message ids kept
    as plain strings by versions before 2 are remembered in the hour of the
    latest event; if the ids are damaged, no event before the latest one can be
    checked, so ``ids_ms`` moves past it.
    """
    ctx = new_context(customer_id)
    if type(stored) is not dict:
        return ctx
    get = stored.get
    for f in ("first_ms", "last_ms", "aff_ms", "ids_ms"):
        if _is_int(get(f)):
            ctx[f] = get(f)
    for f in ("n", "orders", "issues"):
        count = get(f)
        if _is_int(count) and count >= 0:
            ctx[f] = count
    revenue = get("revenue")
    if _is_number(revenue):
        ctx["revenue"] = float(revenue)

    def mapping(f: str) -> dict[Any, Any]:
        value = get(f)
        return value if type(value) is dict else {}

    ctx["types"] = {
        k: v for k, v in mapping("types").items() if k in EVENT_TYPES and _is_int(v) and v > 0
    }
    events = ctx["events"]
    for k, v in mapping("events").items():
        if len(events) < MAX_NAMES and len(k) <= MAX_NAME_CHARS and _is_int(v) and v > 0:
            events[k] = v
    ctx["channels"] = {
        k: {"n": v["n"], "last_ms": v["last_ms"]}
        for k, v in mapping("channels").items()
        if k in CHANNELS
        and type(v) is dict
        and _is_int(v.get("n"))
        and v["n"] > 0
        and _is_int(v.get("last_ms"))
    }
    pages = get("pages")
    if type(pages) is list:
        kept = [p[:MAX_PAGE_CHARS] for p in pages if type(p) is str and p]
        ctx["pages"] = kept[-MAX_PAGES:]
    cart = get("cart")
    if type(cart) is dict:
        items = cart.get("items")
        kept_items = ctx["cart"]["items"]
        if type(items) is dict:
            for pid, line in items.items():
                if len(kept_items) >= MAX_CART_ITEMS:
                    break
                if (
                    type(line) is list
                    and len(line) == 2
                    and _is_number(line[0])
                    and _is_number(line[1])
                    and line[0] > 0
                    and 0 <= line[1] <= MAX_AMOUNT
                ):
                    kept_items[pid[:MAX_PRODUCT_ID_CHARS]] = [float(line[0]), float(line[1])]
        _recompute_cart(ctx["cart"])
        if not math.isfinite(ctx["cart"]["value"]):
            ctx["cart"] = {"items": {}, "value": 0.0}
        if _is_int(cart.get("updated_ms")):
            ctx["cart"]["updated_ms"] = cart["updated_ms"]
    affinity = {
        k[:MAX_CATEGORY_CHARS]: float(v)
        for k, v in mapping("affinity").items()
        if _is_number(v) and v >= 0
    }
    for k in sorted(affinity, key=affinity.__getitem__, reverse=True)[:MAX_CATEGORIES]:
        ctx["affinity"][k] = affinity[k]
    # (Kept when they were written, by the allowlist of that time.)
    for trait, value in mapping("traits").items():
        if len(ctx["traits"]) >= MAX_TRAITS:
            break
        if len(trait) > MAX_TRAIT_NAME_CHARS or trait.lower() in IDENTIFYING_TRAITS:
            continue
        if type(value) is str:
            ctx["traits"][trait] = value[:MAX_TRAIT_CHARS]
        elif _is_number(value):
            ctx["traits"][trait] = value
    ctx["fired"] = {k: v for k, v in mapping("fired").items() if _is_int(v)}
    ids, hours = get("ids"), get("id_hours")
    if type(ids) is list:  # before version 2: the latest message ids, as they came
        old = [i for i in ids if type(i) is str and i]
        if old and ctx["last_ms"] is not None:
            ctx["ids"] = "".join(id_token(i) for i in old)
            ctx["id_hours"] = [ctx["last_ms"] // ID_BUCKET_MS, len(old)]
    elif (
        type(ids) is str
        and type(hours) is list
        and len(hours) % 2 == 0
        and all(_is_int(h) for h in hours)
        and all(hours[i] < hours[i + 2] for i in range(0, len(hours) - 2, 2))
        and all(n > 0 for n in hours[1::2])
        and len(ids) == sum(hours[1::2]) * ID_TOKEN_CHARS
    ):
        ctx["ids"] = ids
        ctx["id_hours"] = hours
    elif ctx["last_ms"] is not None:
        # The ids are lost: nothing before the latest event can be checked.
        ctx["ids_ms"] = max(ctx["ids_ms"] or 0, ctx["last_ms"] + 1)
    if ctx["id_hours"]:
        _forget(ctx, -(2**62))  # within the budget
    ctx["pending"] = [p for p in _list(get("pending")) if _is_pending(p)][-MAX_PENDING:]
    ctx["closed"] = [
        [c[0], c[1], c[2], c[3] if len(c) == 4 else None]
        for c in _list(get("closed"))
        if _is_closed(c)
    ][-MAX_CLOSED:]
    zone = get("tz")
    if type(zone) is str and known_zone(zone) is not None:
        ctx["tz"] = zone
    ctx["consent"] = {
        k: [v[0], v[1]] for k, v in mapping("consent").items() if k in OFFER_CHANNELS and _stamp(v)
    }
    categories = [
        (k, v)
        for k, v in mapping("consent_cat").items()
        if len(k) <= MAX_CONSENT_CATEGORY_CHARS and _stamp(v)
    ]
    ctx["consent_cat"] = {k: [v[0], v[1]] for k, v in categories[:MAX_CONSENT_CATEGORIES]}
    ctx["contacts"] = [c for c in _list(get("contacts")) if _is_contact(c)][-MAX_CONTACTS:]
    dismissed = [(k, v) for k, v in mapping("dismissed").items() if _is_int(v)]
    ctx["dismissed"] = dict(dismissed[-MAX_DISMISSALS:])
    src = get("src")
    if _is_src(src):
        ctx["src"] = list(src)
    return ctx


def _stamp(value: Any) -> bool:
    return type(value) is list and len(value) == 2 and type(value[0]) is bool and _is_int(value[1])


def _is_contact(c: Any) -> bool:
    return (
        type(c) is list
        and len(c) == 4
        and _is_int(c[0])
        and type(c[1]) is str
        and c[1] in OFFER_CHANNELS
        and type(c[2]) is str
        and (c[3] is None or type(c[3]) is str)
    )


def _list(value: Any) -> list[Any]:
    return value if type(value) is list else []


def _strings(value: Any, limit: int) -> bool:
    return type(value) is list and len(value) <= limit and all(type(x) is str for x in value)


def _is_pending(p: Any) -> bool:
    return (
        type(p) is list
        and len(p) == 6
        and type(p[0]) is str
        and type(p[1]) is str
        and _strings(p[2], 4 * MAX_NAMES)
        and _is_int(p[3])
        and _is_int(p[4])
        and _strings(p[5], 4)
    )


def _is_closed(c: Any) -> bool:
    """A closed decision, of version 4 or, without its offer id, of an earlier one."""
    return (
        type(c) is list
        and (len(c) == 3 or (len(c) == 4 and (c[3] is None or type(c[3]) is str)))
        and type(c[0]) is str
        and _is_int(c[1])
        and _strings(c[2], 4)
    )
