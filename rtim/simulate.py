"""Synthetic multi-channel customer journeys as Segment-spec events.

The simulator feeds ``rtim simulate``, ``rtim demo``, the tests and the
benchmark. It is deliberately free of asyncio and Kafka so that it can be used
(and tested) as a plain iterator; the Kafka producer that ships its output lives
in :mod:`rtim.simulate_kafka`, which keys the events with
:func:`rtim.events.customer_key`.

What it models
--------------
A population of customers, each with a *persona* (browser, bargain hunter,
loyal buyer, frustrated customer, cart abandoner) and favourite categories.
Every customer runs an endless journey of *sessions* on five channels:

* ``web`` -- ``page`` calls with ``context.page`` and ``context.userAgent``;
* ``app`` -- ``screen`` calls with ``context.app``, ``context.device``,
  ``context.os``;
* ``email`` -- "Email Opened" / "Email Link Clicked", often followed by a web
  session landing from the e-mail (cart reminders follow abandoned carts);
* ``call_centre`` -- "Support Ticket Opened" / "Support Ticket Resolved";
* ``store`` -- "Store Visited", sometimes with an in-store "Order Completed".

Shopping sessions follow the Segment E-commerce spec (search, list, product,
cart, checkout, order). Visitors start anonymous on every new device; known
customers sign in ("Signed In" followed by an ``identify`` with traits) and
from then on their events on that device carry ``userId``. A share of visitors
never signs in. Seconds pass between clicks and hours between sessions, and the
customers' journeys are merged by time so the stream is interleaved like real
traffic.

All randomness comes from one seeded :class:`random.Random`, so given ``seed``
and ``start_ms`` the stream (including ``messageId``) is reproducible.
"""

from __future__ import annotations

import gc
import heapq
import random
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CATALOG",
    "CATEGORIES",
    "CHANNELS",
    "CURRENCY",
    "EVENT_NAMES",
    "PERSONAS",
    "JourneySimulator",
    "Product",
    "format_timestamp",
]

CHANNELS: tuple[str, ...] = ("web", "app", "email", "call_centre", "store")
"""Channels a simulated event can come from (``context.channel``)."""

CURRENCY = "GBP"
SHOP_URL = "https://shop.example.com"

EVENT_NAMES: tuple[str, ...] = (
    "Products Searched",
    "Product List Viewed",
    "Product Viewed",
    "Product Added",
    "Product Removed",
    "Cart Viewed",
    "Checkout Started",
    "Order Completed",
    "Signed In",
    "Email Opened",
    "Email Link Clicked",
    "Support Ticket Opened",
    "Support Ticket Resolved",
    "Store Visited",
)
"""Every ``track`` event name the simulator emits."""


# --------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Product:
    """One catalogue item.

    Attributes
    ----------
    product_id, sku, name, category : str
        Segment E-commerce product fields.
    price : float
        Unit price in :data:`CURRENCY`.
    """

    product_id: str
    sku: str
    name: str
    category: str
    price: float

    def properties(self, quantity: int = 1) -> dict[str, Any]:
        """Segment product properties for this item.

        Parameters
        ----------
        quantity : int
            Units concerned by the event.

        Returns
        -------
        dict
            A fresh dict (callers may mutate it).
        """
        return {
            "product_id": self.product_id,
            "sku": self.sku,
            "category": self.category,
            "name": self.name,
            "price": self.price,
            "quantity": quantity,
        }


_CATALOG_SPEC: dict[str, tuple[tuple[str, float], ...]] = {
    "electronics": (
        ("Wireless Headphones", 89.99),
        ("Smart Watch", 199.00),
        ("Bluetooth Speaker", 49.99),
        ("4K Action Camera", 149.00),
        ("USB-C Fast Charger", 19.99),
    ),
    "shoes": (
        ("Trail Running Shoes", 119.00),
        ("Leather Chelsea Boots", 139.00),
        ("Canvas Sneakers", 45.00),
        ("Flip Flops", 12.50),
        ("Hiking Sandals", 59.00),
    ),
    "apparel": (
        ("Organic Cotton T-Shirt", 18.00),
        ("Denim Jacket", 79.00),
        ("Merino Jumper", 65.00),
        ("Waterproof Rain Coat", 99.00),
        ("Yoga Leggings", 39.00),
    ),
    "home": (
        ("Cast Iron Skillet", 45.00),
        ("Linen Bedding Set", 129.00),
        ("Espresso Machine", 229.00),
        ("Scented Candle", 14.00),
        ("Ceramic Vase", 32.00),
    ),
    "beauty": (
        ("Vitamin C Serum", 29.00),
        ("Hydrating Face Cream", 24.50),
        ("Ionic Hair Dryer", 89.00),
        ("Eau de Parfum 50ml", 68.00),
        ("Lip Balm Trio", 9.99),
    ),
    "sports": (
        ("Yoga Mat", 29.99),
        ("Adjustable Dumbbells", 179.00),
        ("Tennis Racket", 95.00),
        ("Cycling Helmet", 59.00),
        ("Insulated Water Bottle", 15.00),
    ),
    "books": (
        ("Streaming Systems Handbook", 39.00),
        ("Cosy Mystery Novel", 9.99),
        ("Fast Weeknight Cookbook", 22.00),
        ("Children's World Atlas", 16.00),
        ("Sci-Fi Trilogy Box Set", 34.00),
    ),
    "toys": (
        ("Building Blocks Set", 49.00),
        ("Remote Control Car", 59.99),
        ("Plush Bear", 19.00),
        ("Family Board Game", 29.00),
        ("1000-Piece Puzzle", 17.50),
    ),
}

CATEGORIES: tuple[str, ...] = tuple(_CATALOG_SPEC)
"""The eight catalogue categories."""

CATALOG: tuple[Product, ...] = tuple(
    Product(
        product_id=f"prd-{ci * 5 + pi + 1:03d}",
        sku=f"{cat[:3].upper()}-{ci * 5 + pi + 1:04d}",
        name=name,
        category=cat,
        price=price,
    )
    for ci, (cat, items) in enumerate(_CATALOG_SPEC.items())
    for pi, (name, price) in enumerate(items)
)
"""The fixed 40-product catalogue (5 products in each of :data:`CATEGORIES`)."""

_BY_CATEGORY: dict[str, tuple[Product, ...]] = {
    cat: tuple(p for p in CATALOG if p.category == cat) for cat in CATEGORIES
}
_BY_ID: dict[str, Product] = {p.product_id: p for p in CATALOG}
# Bargain hunters look at cheap things first: weights inversely proportional
# to price, precomputed as cumulative weights for random.choices.
_CHEAP_CUM: dict[str, list[float]] = {}
for _cat, _items in _BY_CATEGORY.items():
    _acc = 0.0
    _CHEAP_CUM[_cat] = []
    for _p in _items:
        _acc += 1.0 / _p.price
        _CHEAP_CUM[_cat].append(_acc)

_SEARCH_TERMS: dict[str, tuple[str, ...]] = {
    "electronics": ("headphones", "smart watch", "speaker", "action camera", "charger"),
    "shoes": ("running shoes", "boots", "sneakers", "sandals", "trail shoes"),
    "apparel": ("t-shirt", "jacket", "jumper", "rain coat", "leggings"),
    "home": ("skillet", "bedding", "coffee machine", "candle", "vase"),
    "beauty": ("serum", "face cream", "hair dryer", "perfume", "lip balm"),
    "sports": ("yoga mat", "dumbbells", "tennis", "helmet", "water bottle"),
    "books": ("cookbook", "mystery", "atlas", "sci-fi", "kafka book"),
    "toys": ("lego", "rc car", "teddy", "board game", "puzzle"),
}
_BARGAIN_WORDS = ("sale", "cheap", "discount", "deal", "clearance")

_STORES: tuple[tuple[str, str], ...] = (
    ("store-001", "London"),
    ("store-002", "Manchester"),
    ("store-003", "Birmingham"),
    ("store-004", "Leeds"),
    ("store-005", "Glasgow"),
    ("store-006", "Bristol"),
)
_ISSUES: tuple[str, ...] = (
    "delivery_delay",
    "damaged_item",
    "refund_request",
    "billing",
    "login_problem",
    "product_question",
)
_RESOLUTIONS = {
    "delivery_delay": "redelivery_booked",
    "damaged_item": "replacement_sent",
    "refund_request": "refund_issued",
    "billing": "charge_corrected",
    "login_problem": "password_reset",
    "product_question": "information_provided",
    "payment_failed": "payment_retried",
}
_USER_AGENTS: tuple[str, ...] = (
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4 Safari/605.1.15"
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36"
    ),
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
)
_APP_DEVICES: tuple[tuple[str, str, str, str], ...] = (
    # manufacturer, model, os name, os version
    ("Apple", "iPhone15,2", "iOS", "17.4.1"),
    ("Apple", "iPhone14,5", "iOS", "16.7.2"),
    ("Google", "Pixel 8", "Android", "14"),
    ("Samsung", "SM-S911B", "Android", "14"),
    ("Samsung", "SM-A546B", "Android", "13"),
)
_APP_NAME = "RTIM Shop"
_APP_VERSIONS = ("4.2.0", "4.2.1", "4.3.0")
_EXTERNAL_REFERRERS = (
    "https://www.google.com/",
    "https://www.google.com/",
    "https://www.bing.com/",
    "https://www.instagram.com/",
    "",  # direct traffic
    "",
)
_FIRST_NAMES = (
    "Alex", "Sam", "Priya", "Tom", "Aisha", "Liam", "Chloe", "Mohammed", "Emma",
    "Oliver", "Zara", "Jack", "Mia", "Noah", "Sofia", "Ethan", "Grace", "Kai",
    "Isla", "Ravi",
)  # fmt: skip
_LAST_NAMES = (
    "Smith", "Jones", "Patel", "Williams", "Brown", "Khan", "Taylor", "Davies",
    "Evans", "Wilson", "Thomas", "Roberts", "Walker", "Wright", "Chen", "Murphy",
)  # fmt: skip


# --------------------------------------------------------------------------
# Personas
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Persona:
    """Behavioural knobs of one persona (probabilities are per step/session)."""

    name: str
    weight: float  # share of the population
    can_stay_anonymous: bool
    steps: tuple[int, int]  # actions per shopping session (min, max)
    # Relative weights of the next action inside a shopping session.
    w_search: float
    w_browse: float
    w_view: float
    w_add: float
    w_remove: float
    w_cart: float
    w_checkout: float
    w_help: float
    p_buy: float  # checkout -> order completed
    p_sign_in: float  # signs in during a session even without checking out
    affinity: float  # probability of staying in a favourite category
    app_share: float  # probability that a shopping session is on the app
    mean_gap_h: float  # mean hours between sessions (on top of the minimum)
    p_email: float  # share of sessions that are a marketing e-mail
    p_click: float  # e-mail opened -> link clicked
    p_store: float  # share of sessions that are a store visit
    p_store_buy: float
    p_support: float  # share of sessions that are a call to the call centre
    cheap: bool  # prefers cheap products / sale searches / coupons


PERSONAS: dict[str, _Persona] = {
    p.name: p
    for p in (
        _Persona(
            name="browser", weight=0.30, can_stay_anonymous=True, steps=(2, 6),
            w_search=2, w_browse=3, w_view=5, w_add=1.2, w_remove=0.3, w_cart=0.5,
            w_checkout=1.2, w_help=0.1, p_buy=0.4, p_sign_in=0.25, affinity=0.45,
            app_share=0.25, mean_gap_h=10, p_email=0.2, p_click=0.35, p_store=0.08,
            p_store_buy=0.3, p_support=0.03, cheap=False,
        ),
        _Persona(
            name="bargain_hunter", weight=0.20, can_stay_anonymous=True, steps=(3, 8),
            w_search=4, w_browse=2, w_view=5, w_add=3, w_remove=1.5, w_cart=1.5,
            w_checkout=2, w_help=0.1, p_buy=0.5, p_sign_in=0.3, affinity=0.5,
            app_share=0.35, mean_gap_h=6, p_email=0.3, p_click=0.6, p_store=0.07,
            p_store_buy=0.4, p_support=0.03, cheap=True,
        ),
        _Persona(
            name="loyal_buyer", weight=0.20, can_stay_anonymous=False, steps=(2, 5),
            w_search=1.5, w_browse=1.5, w_view=4, w_add=5, w_remove=0.3, w_cart=1.5,
            w_checkout=6, w_help=0.05, p_buy=0.85, p_sign_in=0.8, affinity=0.85,
            app_share=0.55, mean_gap_h=8, p_email=0.2, p_click=0.5, p_store=0.22,
            p_store_buy=0.6, p_support=0.03, cheap=False,
        ),
        _Persona(
            name="frustrated", weight=0.12, can_stay_anonymous=False, steps=(3, 6),
            w_search=2, w_browse=1.5, w_view=4, w_add=3, w_remove=1.5, w_cart=1.5,
            w_checkout=2.5, w_help=2, p_buy=0.45, p_sign_in=0.6, affinity=0.6,
            app_share=0.3, mean_gap_h=5, p_email=0.1, p_click=0.2, p_store=0.07,
            p_store_buy=0.2, p_support=0.35, cheap=False,
        ),
        _Persona(
            name="cart_abandoner", weight=0.18, can_stay_anonymous=True, steps=(3, 7),
            w_search=2, w_browse=2, w_view=4, w_add=5, w_remove=0.8, w_cart=2.5,
            w_checkout=3, w_help=0.1, p_buy=0.12, p_sign_in=0.3, affinity=0.6,
            app_share=0.3, mean_gap_h=7, p_email=0.2, p_click=0.5, p_store=0.06,
            p_store_buy=0.3, p_support=0.03, cheap=False,
        ),
    )
}  # fmt: skip
"""Persona name -> behaviour parameters."""

_ANON_PERSONAS = tuple(p for p in PERSONAS.values() if p.can_stay_anonymous)
_ALL_PERSONAS = tuple(PERSONAS.values())

# Timing. Clicks inside a session are seconds apart and never more than
# _MAX_THINK_MS apart; sessions are at least _MIN_SESSION_GAP_MS apart, so a
# consumer (or a test) can recover sessions with any inactivity gap in between.
_MIN_THINK_MS = 1_500
_MEAN_THINK_MS = 14_000.0
_MAX_THINK_MS = 240_000
_MIN_SESSION_GAP_MS = 45 * 60_000
_FIRST_ARRIVAL_WINDOW_MS = 60 * 60_000  # first sessions start within an hour
_HOUR_MS = 3_600_000


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

_DAY_PREFIX: dict[int, str] = {}
_HMS: list[str] = []  # "HH:MM:SS." for every second of a day, built on first use
_MILLIS: list[str] = []  # "mmmZ" for every millisecond


def format_timestamp(ms: int) -> str:
    """Format epoch milliseconds as ISO-8601 UTC, e.g. ``2024-05-01T12:00:00.123Z``.

    Parameters
    ----------
    ms : int
        Milliseconds since the Unix epoch.

    Returns
    -------
    str
        Timestamp with millisecond precision and a ``Z`` suffix.

    Notes
    -----
    ``datetime.strftime`` (or even one f-string with four format specs) per
    event costs more than building the rest of the event, so the string is
    glued from cached pieces: the date per day, the time of day from a table
    of 86,400 seconds and the milliseconds from a table of 1,000.
    """
    if not _HMS:
        _HMS.extend(f"{h:02d}:{m:02d}:{s:02d}." for h in range(24) for m in range(60)
                    for s in range(60))  # fmt: skip
        _MILLIS.extend(f"{i:03d}Z" for i in range(1000))
    day, rem = divmod(ms, 86_400_000)
    prefix = _DAY_PREFIX.get(day)
    if prefix is None:
        prefix = datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y-%m-%dT")
        _DAY_PREFIX[day] = prefix
    sec, milli = divmod(rem, 1000)
    return prefix + _HMS[sec] + _MILLIS[milli]


def past_start_ms(days: int = 90) -> int:
    """A simulated-time start far enough back that no event lands in the future.

    Simulated time runs ahead of the wall clock (hours pass between a
    customer's sessions), and RTIM dead-letters events stamped in the future.
    """
    return int(time.time() * 1000) - days * 86_400_000


def _uuid4(getrandbits: Any) -> str:
    """RFC 4122 version-4 UUID string drawn from ``getrandbits`` (the seeded RNG).

    Same bit twiddling as ``uuid.UUID(int=..., version=4)``; unlike
    :func:`uuid.uuid4` it is reproducible because it draws from our RNG.
    """
    n = getrandbits(128)
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)
    n = (n & ~(0xF000 << 64)) | (4 << 76)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(slots=True)
class _Device:
    """A browser (cookie) or app install: owns an anonymousId and sign-in state."""

    kind: str  # "web" | "app"
    anonymous_id: str
    signed_in: bool = False
    user_agent: str = ""
    app: tuple[str, str, str, str, str] = ("", "", "", "", "")  # version, mfr, model, os, os_ver
    device_id: str = ""
    page: dict[str, str] | None = None  # current web page (context.page)


@dataclass(slots=True)
class _Customer:
    """Journey state of one simulated person."""

    idx: int
    persona: _Persona
    user_id: str | None  # None: a visitor who never signs in
    traits: dict[str, str] | None
    web: _Device
    app: _Device | None
    favourites: tuple[str, ...]
    clock: int = 0
    cart: dict[str, int] = field(default_factory=dict)  # product_id -> quantity
    cart_id: str = ""
    reminded_cart_id: str = ""  # one reminder e-mail per basket, not a spam loop
    orders: list[str] = field(default_factory=list)
    pending: list[tuple[int, int, str, Any]] = field(default_factory=list)  # heap
    pending_seq: int = 0


# --------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------


class JourneySimulator:
    """Generate interleaved, multi-channel customer journeys as Segment events.

    Parameters
    ----------
    customers : int
        Size of the simulated population.
    seed : int or None
        Seed of the internal RNG. With the same ``seed`` *and* ``start_ms``
        two simulators yield identical streams (``messageId`` included).
    start_ms : int or None
        Epoch milliseconds where simulated time starts; defaults to now.
    anonymous_share : float
        Share of customers who never sign in and therefore never carry a
        ``userId`` (they only shop on web/app and never receive e-mails,
        call the call centre or show a loyalty card in store).
    live : bool
        If true, ``timestamp`` is the wall-clock time at which each event is
        yielded (for the demo and latency runs) instead of simulated time.
        The order of events is the same as in simulated mode.

    Notes
    -----
    :meth:`events` continues one shared world: calling it twice yields the
    next events, not the same ones again. Events are fresh dicts that the
    caller owns. In simulated mode the stream is ordered by ``timestamp``.

    Simulated time runs ahead of the wall clock: about 10 hours after
    ``start_ms`` at 20 events per customer, about 4 days at 100. A consumer
    that rejects future timestamps (:func:`rtim.events.segment.parse_event`
    allows one hour of skew) needs ``start_ms`` far enough in the past, or
    ``live=True``.
    """

    def __init__(
        self,
        *,
        customers: int = 100,
        seed: int | None = None,
        start_ms: int | None = None,
        anonymous_share: float = 0.3,
        live: bool = False,
    ) -> None:
        if customers < 1:
            raise ValueError("customers must be >= 1")
        if not 0.0 <= anonymous_share <= 1.0:
            raise ValueError("anonymous_share must be within [0, 1]")
        self.customers = customers
        self.seed = seed
        self.start_ms = int(time.time() * 1000) if start_ms is None else int(start_ms)
        self.anonymous_share = anonymous_share
        self.live = live
        self._rng = random.Random(seed)
        self._last_live_ms = 0
        # messageId = a random UUID-v4 prefix drawn once from the seeded RNG
        # plus a 48-bit counter in the last group: unique by construction,
        # deterministic given the seed, still UUID-shaped, and ~10x cheaper
        # than drawing and formatting 128 random bits per event.
        self._id_prefix = _uuid4(self._rng.getrandbits)[:24]
        self._emitted = 0
        self._customers = [self._new_customer(i) for i in range(customers)]
        self._journeys = [self._journey(c) for c in self._customers]
        # Heap of (time of the customer's next event, customer index, event).
        # The index breaks ties deterministically and keeps dicts uncompared.
        self._heap: list[tuple[int, int, dict[str, Any]]] = []
        for c, journey in zip(self._customers, self._journeys, strict=True):
            event = next(journey)
            self._heap.append((c.clock, c.idx, event))
        heapq.heapify(self._heap)

    # ---------------------------------------------------------------- public

    def events(self, n: int | None = None) -> Iterator[dict[str, Any]]:
        """Yield the next ``n`` events of the interleaved stream.

        Parameters
        ----------
        n : int or None
            Number of events; ``None`` for an endless stream.

        Returns
        -------
        iterator of dict
            Segment-spec events (``page``, ``screen``, ``track`` or
            ``identify``) with ``messageId`` and ``timestamp`` filled in.

        Raises
        ------
        ValueError
            If ``n`` is negative (raised at call time, not on first ``next``).
        """
        if n is not None and n < 0:
            raise ValueError("n must be >= 0 (or None for an endless stream)")
        return self._events(n)

    def _events(self, n: int | None) -> Iterator[dict[str, Any]]:
        heap = self._heap
        journeys = self._journeys
        customers = self._customers
        replace = heapq.heapreplace
        fmt = format_timestamp
        id_prefix = self._id_prefix
        live = self.live
        remaining = -1 if n is None else n
        while remaining:
            ts, idx, event = heap[0]
            # Advance this customer first so the heap is consistent even if
            # the consumer abandons the generator right after the yield. (The
            # journey moves the customer's clock, so read it after next().)
            nxt = next(journeys[idx])
            replace(heap, (customers[idx].clock, idx, nxt))
            if live:
                now = int(time.time() * 1000)
                # Wall clocks can step back (NTP); keep the stream monotonic.
                ts = self._last_live_ms = max(self._last_live_ms, now)
            seq = self._emitted = self._emitted + 1
            event["messageId"] = f"{id_prefix}{seq:012x}"
            event["timestamp"] = fmt(ts)
            remaining -= 1
            yield event

    def pregenerate(self, n: int) -> list[dict[str, Any]]:
        """Materialise the next ``n`` events in a list.

        Parameters
        ----------
        n : int
            Number of events.

        Returns
        -------
        list of dict
            Useful to generate a benchmark's input before the clock starts.

        Notes
        -----
        The cyclic garbage collector is paused while the list grows: every
        event is a handful of live dicts, and the collector's repeated scans
        of the growing list otherwise halve the generation speed. Events hold
        no reference cycles, so nothing is leaked.
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return list(self.events(n))
        finally:
            if was_enabled:
                gc.enable()

    @property
    def profiles(self) -> list[dict[str, Any]]:
        """Who is who: one dict per customer (handy for demos and debugging).

        Returns
        -------
        list of dict
            Keys ``customer`` (index), ``persona``, ``user_id`` (None for
            visitors who never sign in), ``anonymous_ids`` (web, then app if
            the customer uses the app), ``favourite_categories`` and ``traits``.
        """
        return [
            {
                "customer": c.idx,
                "persona": c.persona.name,
                "user_id": c.user_id,
                "anonymous_ids": [c.web.anonymous_id]
                + ([c.app.anonymous_id] if c.app is not None else []),
                "favourite_categories": list(c.favourites),
                "traits": dict(c.traits) if c.traits else None,
            }
            for c in self._customers
        ]

    # ------------------------------------------------------------ population

    def _new_customer(self, idx: int) -> _Customer:
        rng = self._rng
        anonymous = rng.random() < self.anonymous_share
        pool = _ANON_PERSONAS if anonymous else _ALL_PERSONAS
        persona = rng.choices(pool, weights=[p.weight for p in pool])[0]
        favourites = tuple(rng.sample(CATEGORIES, 2))
        user_id: str | None = None
        traits: dict[str, str] | None = None
        if not anonymous:
            user_id = f"user-{rng.getrandbits(40):010x}"
            first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
            plan_weights = (0.2, 0.4, 0.4) if persona.name == "loyal_buyer" else (0.6, 0.3, 0.1)
            traits = {
                "email": f"{first.lower()}.{last.lower()}{idx}@example.com",
                "name": f"{first} {last}",
                "plan": rng.choices(("basic", "plus", "premium"), weights=plan_weights)[0],
            }
        web = _Device("web", _uuid4(rng.getrandbits), user_agent=rng.choice(_USER_AGENTS))
        app: _Device | None = None
        if rng.random() < persona.app_share * 1.5:
            mfr, model, os_name, os_ver = rng.choice(_APP_DEVICES)
            app = _Device(
                "app",
                _uuid4(rng.getrandbits),
                app=(rng.choice(_APP_VERSIONS), mfr, model, os_name, os_ver),
                device_id=_uuid4(rng.getrandbits).upper(),
            )
        return _Customer(
            idx=idx,
            persona=persona,
            user_id=user_id,
            traits=traits,
            web=web,
            app=app,
            favourites=favourites,
            cart_id=f"cart-{rng.getrandbits(32):08x}",
        )

    # --------------------------------------------------------------- journey

    def _journey(self, c: _Customer) -> Iterator[dict[str, Any]]:
        """Endless sequence of sessions of one customer; advances ``c.clock``."""
        rng = self._rng
        p = c.persona
        # Known customers already have a relationship with the brand, so their
        # first contact in the simulation may be on any channel; visitors who
        # never sign in only ever shop on the web or in the app.
        c.clock = self.start_ms + int(rng.random() * _FIRST_ARRIVAL_WINDOW_MS)
        data: Any = None  # its shape depends on the kind of session
        kind = self._pick_session(c)
        while True:
            if kind == "shop":
                yield from self._shop(c, self._pick_device(c), rng.choice(_EXTERNAL_REFERRERS))
            elif kind == "email":
                yield from self._email(c, data)
            elif kind == "store":
                yield from self._store(c)
            elif kind == "call":
                yield from self._support_call(c, data)
            elif kind == "resolve":
                yield from self._resolve_ticket(c, data)
            else:  # pragma: no cover - programming error
                raise AssertionError(kind)
            gap = _MIN_SESSION_GAP_MS + int(rng.expovariate(1.0 / (p.mean_gap_h * _HOUR_MS)))
            regular_at = c.clock + gap
            if c.pending and c.pending[0][0] <= regular_at:
                # Follow-ups (cart reminders, call-backs) pre-empt the next
                # regular session, but never inside the current one.
                at, _, kind, data = heapq.heappop(c.pending)
                c.clock = max(at, c.clock + _MIN_SESSION_GAP_MS)
            else:
                c.clock = regular_at
                kind, data = self._pick_session(c), None

    def _pick_session(self, c: _Customer) -> str:
        if c.user_id is None:
            return "shop"  # the offline channels need a known customer
        p = c.persona
        r = self._rng.random()
        if r < p.p_email:
            return "email"
        r -= p.p_email
        if r < p.p_store:
            return "store"
        r -= p.p_store
        if r < p.p_support:
            return "call"
        return "shop"

    def _pick_device(self, c: _Customer) -> _Device:
        if c.app is not None and self._rng.random() < c.persona.app_share * 1.6:
            return c.app
        return c.web

    def _schedule(self, c: _Customer, delay_ms: int, kind: str, data: Any = None) -> None:
        c.pending_seq += 1
        heapq.heappush(c.pending, (c.clock + delay_ms, c.pending_seq, kind, data))

    def _think(self) -> int:
        """Milliseconds between two clicks of one person."""
        t = _MIN_THINK_MS + int(self._rng.expovariate(1.0 / _MEAN_THINK_MS))
        return min(t, _MAX_THINK_MS)

    def _beat(self) -> int:
        """Milliseconds between a page view and the track call it fires."""
        return 40 + int(self._rng.random() * 400)

    # ----------------------------------------------------------- event shapes

    def _context(self, c: _Customer, dev: _Device) -> dict[str, Any]:
        if dev.kind == "web":
            return {
                "channel": "web",
                "page": dict(dev.page) if dev.page else {},
                "userAgent": dev.user_agent,
                "locale": "en-GB",
            }
        version, mfr, model, os_name, os_ver = dev.app
        return {
            "channel": "app",
            "app": {"name": _APP_NAME, "version": version, "build": version.replace(".", "")},
            "device": {
                "id": dev.device_id,
                "manufacturer": mfr,
                "model": model,
                "type": "ios" if os_name == "iOS" else "android",
            },
            "os": {"name": os_name, "version": os_ver},
            "locale": "en-GB",
        }

    def _track(
        self, c: _Customer, dev: _Device, name: str, properties: dict[str, Any]
    ) -> dict[str, Any]:
        # messageId/timestamp are placeholders filled in by events(); putting
        # them here fixes the key order of the serialised JSON.
        return {
            "type": "track",
            "messageId": "",
            "timestamp": "",
            "anonymousId": dev.anonymous_id,
            "userId": c.user_id if dev.signed_in else None,
            "event": name,
            "properties": properties,
            "context": self._context(c, dev),
        }

    def _offline(
        self,
        c: _Customer,
        channel: str,
        name: str,
        properties: dict[str, Any],
        context: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A server-side track call (e-mail, call centre, store): userId only."""
        ctx = {"channel": channel}
        if context:
            ctx.update(context)
        return {
            "type": "track",
            "messageId": "",
            "timestamp": "",
            "anonymousId": None,
            "userId": c.user_id,
            "event": name,
            "properties": properties,
            "context": ctx,
        }

    def _view_product(
        self,
        c: _Customer,
        dev: _Device,
        product: Product,
        category: str,
        referrer: str | None = None,
    ) -> dict[str, Any]:
        """The product page (or app screen) of ``product``."""
        return self._view(
            c,
            dev,
            "Product",
            f"/p/{product.product_id}",
            product.name,
            {"category": category},
            referrer=referrer,
        )

    def _view(
        self,
        c: _Customer,
        dev: _Device,
        name: str,
        path: str,
        title: str,
        extra: dict[str, Any] | None = None,
        referrer: str | None = None,
        campaign: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A ``page`` (web) or ``screen`` (app) call; updates the device's location."""
        if dev.kind == "app":
            props: dict[str, Any] = {"name": name}
            if extra:
                props.update(extra)
            event: dict[str, Any] = {
                "type": "screen",
                "messageId": "",
                "timestamp": "",
                "anonymousId": dev.anonymous_id,
                "userId": c.user_id if dev.signed_in else None,
                "name": name,
                "properties": props,
                "context": self._context(c, dev),
            }
            if campaign:  # opened through an e-mail deep link
                event["context"]["campaign"] = campaign
            return event
        url = SHOP_URL + path
        if referrer is None:
            referrer = dev.page["url"] if dev.page else ""
        page = {"path": path.split("?", 1)[0], "url": url, "title": title, "referrer": referrer}
        if "?" in path:
            page["search"] = "?" + path.split("?", 1)[1]
        dev.page = page
        props = dict(page)
        if extra:
            props.update(extra)
        event = {
            "type": "page",
            "messageId": "",
            "timestamp": "",
            "anonymousId": dev.anonymous_id,
            "userId": c.user_id if dev.signed_in else None,
            "name": name,
            "properties": props,
            "context": self._context(c, dev),
        }
        if campaign:
            event["context"]["campaign"] = campaign
        return event

    def _cart_products(self, c: _Customer) -> list[dict[str, Any]]:
        return [_BY_ID[pid].properties(q) for pid, q in c.cart.items()]

    def _cart_value(self, c: _Customer) -> float:
        return round(sum(_BY_ID[pid].price * q for pid, q in c.cart.items()), 2)

    def _pick_product(self, c: _Customer, category: str) -> Product:
        items = _BY_CATEGORY[category]
        if c.persona.cheap:
            return self._rng.choices(items, cum_weights=_CHEAP_CUM[category])[0]
        return self._rng.choice(items)

    def _pick_category(self, c: _Customer) -> str:
        rng = self._rng
        if rng.random() < c.persona.affinity:
            return c.favourites[0] if rng.random() < 0.7 else c.favourites[1]
        return rng.choice(CATEGORIES)

    # -------------------------------------------------------------- sessions

    def _sign_in(self, c: _Customer, dev: _Device) -> Iterator[dict[str, Any]]:
        """Sign-in page, "Signed In" (first event with userId), then identify."""
        assert c.user_id is not None and c.traits is not None
        c.clock += self._think()
        yield self._view(c, dev, "Sign In", "/account/sign-in", "Sign in")
        c.clock += self._think()
        dev.signed_in = True
        yield self._track(
            c, dev, "Signed In", {"username": c.traits["email"], "method": "password"}
        )
        c.clock += 20 + int(self._rng.random() * 200)
        yield {
            "type": "identify",
            "messageId": "",
            "timestamp": "",
            "anonymousId": dev.anonymous_id,
            "userId": c.user_id,
            "traits": dict(c.traits),
            "context": self._context(c, dev),
        }

    def _shop(
        self,
        c: _Customer,
        dev: _Device,
        referrer: str,
        campaign: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """One web/app shopping session (Segment E-commerce spec)."""
        rng = self._rng
        p = c.persona
        known = c.user_id is not None
        campaign_ctx = None
        category = self._pick_category(c)
        product: Product | None = None
        checkout_boost = 0.0

        # Landing.
        if campaign is not None:
            campaign_ctx = {"name": campaign, "source": "crm", "medium": "email"}
            utm = f"?utm_source=crm&utm_medium=email&utm_campaign={campaign}"
            if campaign == "cart_reminder" and c.cart:
                yield self._view(
                    c,
                    dev,
                    "Cart",
                    "/cart" + utm,
                    "Your basket",
                    referrer=referrer,
                    campaign=campaign_ctx,
                )
                c.clock += self._beat()
                yield self._track(
                    c,
                    dev,
                    "Cart Viewed",
                    {"cart_id": c.cart_id, "products": self._cart_products(c)},
                )
                checkout_boost = 0.35  # people who come back for their cart buy
            else:
                yield self._view(
                    c,
                    dev,
                    "Category",
                    f"/c/{category}{utm}",
                    category.title(),
                    {"category": category},
                    referrer=referrer,
                    campaign=campaign_ctx,
                )
                c.clock += self._beat()
                yield self._track(
                    c,
                    dev,
                    "Product List Viewed",
                    {"list_id": f"{category}-all", "category": category},
                )
                checkout_boost = 0.1
        elif referrer and rng.random() < 0.5:
            # Search-engine / social traffic lands on a product page.
            product = self._pick_product(c, category)
            yield self._view_product(c, dev, product, category, referrer=referrer)
            c.clock += self._beat()
            yield self._track(c, dev, "Product Viewed", product.properties())
        else:
            yield self._view(c, dev, "Home", "/", "RTIM Shop", referrer=referrer)

        wants_sign_in = known and not dev.signed_in and rng.random() < p.p_sign_in
        steps = rng.randint(*p.steps)
        for _ in range(steps):
            if wants_sign_in and rng.random() < 2.0 / steps:
                wants_sign_in = False
                yield from self._sign_in(c, dev)
            has_cart = bool(c.cart)
            # Weighted choice of the next action, written out by hand because
            # random.choices() was the single most expensive call per event.
            w_add = p.w_add if product is not None else 0.0
            w_remove = p.w_remove if has_cart else 0.0
            w_cart = p.w_cart if has_cart else 0.1
            # A fuller basket pulls harder towards the checkout.
            w_checkout = (
                p.w_checkout * (0.5 + 0.5 * len(c.cart)) + 4 * checkout_boost if has_cart else 0.0
            )
            w_help = p.w_help if known else 0.0
            r = rng.random() * (
                p.w_search + p.w_browse + p.w_view + w_add + w_remove + w_cart
                + w_checkout + w_help
            )  # fmt: skip
            for action, w in (  # noqa: B007 - the action is the one the loop stops at
                ("search", p.w_search),
                ("browse", p.w_browse),
                ("view", p.w_view),
                ("add", w_add),
                ("remove", w_remove),
                ("cart", w_cart),
                ("checkout", w_checkout),
            ):
                if r < w:
                    break
                r -= w
            else:
                action = "help" if w_help else "view"
            c.clock += self._think()
            if action == "search":
                category = self._pick_category(c)
                query = rng.choice(_SEARCH_TERMS[category])
                if p.cheap and rng.random() < 0.6:
                    query = f"{query} {rng.choice(_BARGAIN_WORDS)}"
                yield self._track(c, dev, "Products Searched", {"query": query})
                c.clock += self._beat()
                yield self._view(
                    c,
                    dev,
                    "Search Results",
                    "/search?q=" + query.replace(" ", "+"),
                    f"Results for {query}",
                    {"query": query},
                )
            elif action == "browse":
                category = self._pick_category(c)
                yield self._view(
                    c, dev, "Category", f"/c/{category}", category.title(), {"category": category}
                )
                c.clock += self._beat()
                yield self._track(
                    c,
                    dev,
                    "Product List Viewed",
                    {"list_id": f"{category}-all", "category": category},
                )
            elif action == "view":
                product = self._pick_product(c, category)
                yield self._view_product(c, dev, product, category)
                c.clock += self._beat()
                yield self._track(c, dev, "Product Viewed", product.properties())
            elif action == "add":
                assert product is not None
                qty = 1 if rng.random() < 0.85 else 2
                c.cart[product.product_id] = c.cart.get(product.product_id, 0) + qty
                props = product.properties(qty)
                props["cart_id"] = c.cart_id
                yield self._track(c, dev, "Product Added", props)
            elif action == "remove":
                pid = rng.choice(list(c.cart))
                qty = c.cart.pop(pid)
                props = _BY_ID[pid].properties(qty)
                props["cart_id"] = c.cart_id
                yield self._track(c, dev, "Product Removed", props)
            elif action == "cart":
                yield self._view(c, dev, "Cart", "/cart", "Your basket")
                c.clock += self._beat()
                yield self._track(
                    c,
                    dev,
                    "Cart Viewed",
                    {"cart_id": c.cart_id, "products": self._cart_products(c)},
                )
            elif action == "help":
                yield self._view(c, dev, "Help Centre", "/help", "Help centre")
                if dev.signed_in and rng.random() < 0.5:
                    c.clock += self._think()
                    yield self._open_ticket(c, dev)
            else:  # checkout
                if not known:
                    # Guest checkout is not offered: the sign-in wall is
                    # where visitors who never sign in abandon their cart.
                    yield self._view(c, dev, "Sign In", "/account/sign-in", "Sign in")
                    break
                if not dev.signed_in:
                    yield from self._sign_in(c, dev)
                    c.clock += self._think()
                bought = yield from self._checkout(c, dev, checkout_boost)
                if not bought or rng.random() < 0.7:
                    break
        # Session over. A non-empty cart is an abandoned cart; known customers
        # get a reminder e-mail a few hours later.
        if c.cart and known and c.reminded_cart_id != c.cart_id and rng.random() < 0.75:
            c.reminded_cart_id = c.cart_id
            self._schedule(c, _HOUR_MS + int(rng.random() * 5 * _HOUR_MS), "email", "cart_reminder")

    def _checkout(
        self, c: _Customer, dev: _Device, boost: float
    ) -> Generator[dict[str, Any], None, bool]:
        """Checkout Started, then Order Completed or abandonment. Returns bought?"""
        rng = self._rng
        p = c.persona
        order_id = f"ord-{rng.getrandbits(40):010x}"
        value = self._cart_value(c)
        products = self._cart_products(c)
        yield self._view(c, dev, "Checkout", "/checkout", "Checkout")
        c.clock += self._beat()
        yield self._track(c, dev, "Checkout Started", {
            "order_id": order_id, "value": value, "revenue": value,
            "currency": CURRENCY, "products": products,
        })  # fmt: skip
        if rng.random() >= p.p_buy + boost:
            if p.name == "frustrated" and rng.random() < 0.5:
                # A failed payment is a classic reason to call the call centre.
                self._schedule(
                    c,
                    _HOUR_MS + int(rng.random() * 3 * _HOUR_MS),
                    "call",
                    ("payment_failed", order_id),
                )
            return False
        c.clock += self._think() + 20_000  # typing card details takes a while
        discount, coupon = 0.0, None
        if p.cheap and rng.random() < 0.7:
            coupon, discount = "SAVE10", round(value * 0.10, 2)
        revenue = round(value - discount, 2)
        shipping = 0.0 if revenue >= 50 else 3.95
        props: dict[str, Any] = {
            "order_id": order_id,
            "total": round(revenue + shipping, 2),
            "revenue": revenue,
            "shipping": shipping,
            "discount": discount,
            "currency": CURRENCY,
            "products": self._cart_products(c),
        }
        if coupon:
            props["coupon"] = coupon
        yield self._track(c, dev, "Order Completed", props)
        c.clock += self._beat()
        yield self._view(
            c,
            dev,
            "Order Confirmation",
            f"/checkout/confirmation/{order_id}",
            "Thank you for your order",
            {"order_id": order_id},
        )
        c.cart.clear()
        c.cart_id = f"cart-{rng.getrandbits(32):08x}"
        c.orders.append(order_id)
        if p.name == "frustrated" and rng.random() < 0.6:
            issue = rng.choice(("delivery_delay", "damaged_item", "refund_request"))
            self._schedule(
                c, 20 * _HOUR_MS + int(rng.random() * 48 * _HOUR_MS), "call", (issue, order_id)
            )
        return True

    def _email(self, c: _Customer, campaign: str | None) -> Iterator[dict[str, Any]]:
        """A marketing e-mail is opened; a click starts a shopping session."""
        rng = self._rng
        p = c.persona
        if campaign is None:
            if p.cheap:
                campaign = rng.choice(("summer_sale", "clearance", "weekly_newsletter"))
            elif p.name == "loyal_buyer":
                campaign = rng.choice(("loyalty_rewards", f"new_in_{c.favourites[0]}"))
            else:
                campaign = rng.choice(("weekly_newsletter", f"new_in_{c.favourites[0]}"))
        if campaign == "cart_reminder" and not c.cart:
            campaign = "weekly_newsletter"  # bought in the meantime (e.g. in store)
        email_id = f"em-{rng.getrandbits(32):08x}"
        ctx = {"campaign": {"name": campaign, "source": "crm", "medium": "email"}}
        yield self._offline(
            c, "email", "Email Opened", {"campaign": campaign, "email_id": email_id}, ctx
        )
        p_click = min(0.9, p.p_click + (0.25 if campaign == "cart_reminder" else 0.0))
        if rng.random() >= p_click:
            return
        c.clock += 3_000 + int(rng.random() * 60_000)
        link = f"{SHOP_URL}/{'cart' if campaign == 'cart_reminder' else 'c/' + c.favourites[0]}"
        yield self._offline(
            c,
            "email",
            "Email Link Clicked",
            {"campaign": campaign, "email_id": email_id, "link_url": link},
            ctx,
        )
        c.clock += 1_000 + int(rng.random() * 3_000)
        # Links open in the browser (or the app, if installed, via deep link).
        yield from self._shop(c, self._pick_device(c), "", campaign=campaign)

    def _store(self, c: _Customer) -> Iterator[dict[str, Any]]:
        """A loyalty-card scan in a store, sometimes followed by a purchase."""
        rng = self._rng
        store_id, city = rng.choice(_STORES)
        ctx = {"location": {"city": city, "country": "GB"}}
        yield self._offline(
            c, "store", "Store Visited", {"store_id": store_id, "store_name": f"RTIM {city}"}, ctx
        )
        if rng.random() >= c.persona.p_store_buy:
            return
        c.clock += 3 * 60_000 + int(rng.random() * 17 * 60_000)  # browsing the shop floor
        if c.cart and rng.random() < 0.5:
            # Omnichannel: the online basket is bought in store.
            items = dict(c.cart)
            c.cart.clear()
            c.cart_id = f"cart-{rng.getrandbits(32):08x}"
        else:
            prod = self._pick_product(c, self._pick_category(c))
            items = {prod.product_id: 1}
        products = [_BY_ID[pid].properties(q) for pid, q in items.items()]
        revenue = round(sum(_BY_ID[pid].price * q for pid, q in items.items()), 2)
        order_id = f"ord-{rng.getrandbits(40):010x}"
        c.orders.append(order_id)
        yield self._offline(c, "store", "Order Completed", {
            "order_id": order_id, "total": revenue, "revenue": revenue, "shipping": 0.0,
            "discount": 0.0, "currency": CURRENCY, "products": products,
            "store_id": store_id,
        }, ctx)  # fmt: skip

    def _open_ticket(
        self,
        c: _Customer,
        dev: _Device | None,
        issue: str | None = None,
        order_id: str | None = None,
    ) -> dict[str, Any]:
        """Support Ticket Opened (web form or phone call); schedules the resolution."""
        rng = self._rng
        if issue is None:
            issue = rng.choice(_ISSUES)
        if order_id is None and c.orders and issue != "login_problem":
            order_id = c.orders[-1]
        ticket_id = f"tkt-{rng.getrandbits(32):08x}"
        props: dict[str, Any] = {
            "ticket_id": ticket_id,
            "issue_type": issue,
            "priority": "high" if c.persona.name == "frustrated" else "normal",
        }
        if order_id:
            props["order_id"] = order_id
        # Frustrated customers wait longer for a fix (part of why they are).
        hours = 1 + rng.random() * (12 if c.persona.name == "frustrated" else 4)
        self._schedule(c, int(hours * _HOUR_MS), "resolve", (ticket_id, issue, c.clock))
        if dev is None:
            return self._offline(c, "call_centre", "Support Ticket Opened", props)
        return self._track(c, dev, "Support Ticket Opened", props)

    def _support_call(
        self, c: _Customer, data: tuple[str, str | None] | None
    ) -> Iterator[dict[str, Any]]:
        issue, order_id = data if data is not None else (None, None)
        yield self._open_ticket(c, None, issue, order_id)

    def _resolve_ticket(self, c: _Customer, data: tuple[str, str, int]) -> Iterator[dict[str, Any]]:
        ticket_id, issue, opened_at = data
        rng = self._rng
        frustrated = c.persona.name == "frustrated"
        satisfaction = rng.randint(1, 3) if frustrated else rng.randint(3, 5)
        yield self._offline(c, "call_centre", "Support Ticket Resolved", {
            "ticket_id": ticket_id,
            "issue_type": issue,
            "resolution": _RESOLUTIONS.get(issue, "information_provided"),
            "satisfaction": satisfaction,
            "resolution_hours": round((c.clock - opened_at) / _HOUR_MS, 1),
        })  # fmt: skip
