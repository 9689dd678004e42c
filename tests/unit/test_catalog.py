"""The offers catalog and trigger rules: the shipped sample, every check, matching, cooldowns."""

from __future__ import annotations

import calendar
import copy
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import rtim
from rtim.cli import main
from rtim.conditions import ConditionError, compile_all
from rtim.context.model import apply_event, new_context
from rtim.events import Event
from rtim.offers.catalog import (
    CHANNELS,
    Catalog,
    CatalogError,
    Offer,
    load_catalog,
    parse_catalog,
)
from rtim.triggers.rules import TriggerRule, fired_rules, first_failed, parse_rule

from .segment_calls import parsed, segment_call

SAMPLE = Path(rtim.__file__).parent / "data" / "catalog.yaml"


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1000


T0 = ms(2026, 11, 2, 9)


def event(
    kind: str = "track",
    name: str | None = None,
    *,
    ts: int = T0,
    channel: str | None = None,
    **props: Any,
) -> Event:
    return parsed(segment_call(kind, name, ts=ts, channel=channel, properties=props))


def context_after(*events: Event) -> dict[str, Any]:
    ctx = new_context("u-1")
    for offset, e in enumerate(events):
        apply_event(ctx, e, 0, offset)
    return ctx


# --------------------------------------------------------------------------
# The shipped sample
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> Catalog:
    return load_catalog(SAMPLE)


def test_the_shipped_sample_loads(sample: Catalog) -> None:
    assert sample.source == str(SAMPLE)
    assert len(sample.triggers) >= 1 and len(sample.offers) >= 1
    assert len({t.id for t in sample.triggers}) == len(sample.triggers)
    assert len({o.id for o in sample.offers}) == len(sample.offers)


def test_every_sample_offer_references_existing_triggers(sample: Catalog) -> None:
    trigger_ids = {t.id for t in sample.triggers}
    for offer in sample.offers:
        assert offer.triggers is None or offer.triggers <= trigger_ids, offer.id
        assert set(offer.channels) <= CHANNELS, offer.id


def test_every_sample_trigger_can_lead_to_an_offer(sample: Catalog) -> None:
    for trigger in sample.triggers:
        assert sample.offers_for(trigger.id), trigger.id


def test_every_sample_condition_reads_a_real_context_field(sample: Catalog) -> None:
    # A typo ("cart.valeu") would make a rule silently never fire.
    known = set(new_context("x")) | {"event"}
    conditions = [c for t in sample.triggers for c in t.conditions]
    conditions += [c for o in sample.offers for c in o.eligibility]
    assert conditions
    for cond in conditions:
        assert cond.path[0] in known, cond.text


def test_sample_cart_builder_decides_between_shipping_and_bundle(sample: Catalog) -> None:
    assert [o.id for o in sample.offers_for("cart-builder")] == ["free-shipping", "bundle-discount"]
    shipping = next(o for o in sample.offers if o.id == "free-shipping")
    assert shipping.channel_for("app") == "app"
    assert shipping.channel_for("email") == "web"
    assert sample.channels >= {"web", "app", "email", "call_centre"}


def test_load_catalog_accepts_a_string_path() -> None:
    assert load_catalog(str(SAMPLE)).offers == load_catalog(SAMPLE).offers


# --------------------------------------------------------------------------
# Checks, each error naming the place
# --------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "triggers": [
        {
            "id": "cart",
            "when": {"type": "track", "event": "Product Added"},
            "if": ["cart.value >= 100"],
        },
        {"id": "ticket", "when": {"event": "Support Ticket Opened"}, "cooldown": 0},
    ],
    "offers": [
        {
            "id": "ship",
            "name": "Free shipping",
            "channels": ["web", "app"],
            "value": 6,
            "triggers": ["cart"],
            "eligibility": ["issues == 0"],
        },
        {
            "id": "callback",
            "channels": "call_centre",
            "value": 25,
            "priority": 3,
            "triggers": "ticket",
        },
    ],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """BASE with one field set ('offers.0.channels') or deleted (value is DELETE)."""
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        if value is DELETE:
            del node[int(last)]
        else:
            node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()


def test_the_base_document_is_valid() -> None:
    catalog = parse_catalog(copy.deepcopy(BASE))
    assert [t.id for t in catalog.triggers] == ["cart", "ticket"]
    ship, callback = catalog.offers
    assert ship == Offer(
        id="ship",
        name="Free shipping",
        channels=("web", "app"),
        value=6.0,
        priority=1.0,
        category=None,
        triggers=frozenset({"cart"}),
        eligibility=ship.eligibility,
    )
    assert [c.text for c in ship.eligibility] == ["issues == 0"]
    assert (callback.name, callback.channels, callback.priority) == (
        "callback",
        ("call_centre",),
        3.0,
    )
    assert callback.triggers == frozenset({"ticket"})


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        # offers
        ("offers.0.colour", "red", ["offer 'ship'", "unknown field", "colour"]),
        ("offers.0.channels", ["web", "fax"], ["offer 'ship'", "unknown channel", "fax"]),
        ("offers.0.channels", "Web", ["offer 'ship'", "'Web'"]),
        ("offers.0.channels", [], ["offer 'ship'", "'channels'"]),
        ("offers.0.channels", DELETE, ["offer 'ship'", "'channels'"]),
        ("offers.0.triggers", ["cart", "carts"], ["offer 'ship'", "undefined trigger", "carts"]),
        ("offers.1.triggers", "tickets", ["offer 'callback'", "undefined trigger", "tickets"]),
        ("offers.0.triggers", 5, ["offer 'ship'", "'triggers'"]),
        ("offers.0.triggers", {"cart": 1}, ["offer 'ship'", "'triggers'"]),
        ("offers.0.triggers", [["cart"]], ["offer 'ship'", "'triggers'"]),
        ("offers.1.id", "ship", ["duplicate offer", "ship"]),
        ("offers.1.id", 7, ["offers[1]", "'id'"]),
        ("offers.0.id", "", ["offers[0]", "'id'"]),
        ("offers.1", "callback", ["offers[1]", "'id'"]),
        ("offers.0.valid_from", "next tuesday", ["offer 'ship'.valid_from", "next tuesday"]),
        ("offers.0.valid_to", "2026-02-30", ["offer 'ship'.valid_to", "2026-02-30"]),
        ("offers.0.valid_to", 20260101, ["offer 'ship'.valid_to", "20260101"]),
        ("offers.0.valid_from", ["2026-01-01"], ["offer 'ship'.valid_from"]),
        ("offers.0.value", -1, ["offer 'ship'", "'value'", "-1"]),
        ("offers.0.value", "12", ["offer 'ship'", "'value'"]),
        ("offers.0.value", True, ["offer 'ship'", "'value'"]),
        ("offers.0.priority", "high", ["offer 'ship'", "'priority'", "high"]),
        ("offers.0.creative", ["title"], ["offer 'ship'", "'creative'"]),
        (
            "offers.0.eligibility",
            ["issues == 0", "cart.value >>= 3"],
            ["offer 'ship'.eligibility", "'cart.value >>= 3'"],
        ),
        (
            "offers.0.eligibility",
            ["traits.plan in gold"],
            ["offer 'ship'.eligibility", "needs a list"],
        ),
        ("offers.0.eligibility", {"cart.value": 3}, ["offer 'ship'.eligibility", "list"]),
        # triggers
        ("triggers.1.id", "cart", ["duplicate trigger", "cart"]),
        ("triggers.0.id", None, ["triggers[0]", "'id'"]),
        ("triggers.0.cooldwn", 10, ["trigger 'cart'", "unknown field", "cooldwn"]),
        ("triggers.0.cooldown", -1, ["trigger 'cart'", "'cooldown'"]),
        ("triggers.0.cooldown", "1h", ["trigger 'cart'", "'cooldown'"]),
        (
            "triggers.0.when",
            {"type": "track", "evnt": "Product Added"},
            ["trigger 'cart'", "'when'", "unknown field(s) ['evnt']", "did you mean 'event'"],
        ),
        ("triggers.0.when", "Product Added", ["trigger 'cart'", "'when'"]),
        ("triggers.0.when", {"type": ["track", 3]}, ["trigger 'cart'.when.type"]),
        ("triggers.0.when", {"event": {"name": "x"}}, ["trigger 'cart'.when.event"]),
        ("triggers.0.when", {"properties": ["category"]}, ["trigger 'cart'", "when.properties"]),
        (
            "triggers.0.if",
            ["cart.value >= 100", "cart.value is big"],
            ["trigger 'cart'.if", "'cart.value is big'"],
        ),
        # the document
        ("offer", [], ["top level: unknown field", "offer"]),
        ("triggers", {"id": "cart"}, ["'triggers' and 'offers' must be lists"]),
        ("offers", "ship", ["'triggers' and 'offers' must be lists"]),
    ],
)
def test_errors_name_the_place(path: str, value: Any, expected: list[str]) -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog(with_change(path, value), source="offers.yaml")
    message = str(info.value)
    assert message.startswith("offers.yaml: "), message
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("valid_from", "valid_to"),
    [
        ("2026-06-01", "2026-06-01"),
        ("2026-06-02", "2026-06-01"),
        ("2026-06-01T12:00:00+00:00", "2026-06-01T13:00:00+02:00"),  # 11:00 UTC
    ],
)
def test_valid_from_must_be_before_valid_to(valid_from: str, valid_to: str) -> None:
    doc = with_change("offers.0.valid_from", valid_from)
    doc["offers"][0]["valid_to"] = valid_to
    with pytest.raises(CatalogError, match=r"offer 'ship': valid_from must be before valid_to"):
        parse_catalog(doc)


@pytest.mark.parametrize("offer_id", ["__shared__", "__cursor__.0"])
def test_an_offer_id_may_not_take_a_models_topic_key(offer_id: str) -> None:
    # its training records and snapshot would be the pooled model's or a cursor
    with pytest.raises(CatalogError, match=rf"offer '{offer_id}': .* may not begin with '__'"):
        parse_catalog(with_change("offers.0.id", offer_id))


@pytest.mark.parametrize("doc", [None, [], "offers", 3])
def test_the_document_must_be_a_mapping(doc: Any) -> None:
    with pytest.raises(CatalogError, match="must be a mapping"):
        parse_catalog(doc, source="x.yaml")


def test_an_empty_document_is_an_empty_catalog() -> None:
    assert parse_catalog({}) == Catalog(triggers=(), offers=())
    assert parse_catalog({"triggers": None, "offers": None}).offers == ()


def test_catalog_error_is_a_value_error_and_rule_errors_are_condition_errors() -> None:
    assert issubclass(CatalogError, ValueError)
    with pytest.raises(ConditionError, match=r"trigger 'x'"):
        parse_rule({"id": "x", "cooldown": -5}, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("triggers: [\n  - id: x\n", ":2: not valid YAML"),
        (
            "offers:\n  - id: o\n    channels: [web]\n    valid_to: 2026-02-30\n",
            ":4: not valid YAML: 2026-02-30: day is out of range",
        ),
        ("offers:\n  - id: o\n    channels: [web]\n    valid_to: 2026-13-01\n", ":4: not valid"),
        ("- just\n- a list\n", ": the catalog must be a mapping"),
        ("offers:\n  - id: o\n    channels: [fax]\n", ":2: offer 'o': unknown channel"),
        (
            "triggers: []\n\nofers: []\n",
            ":3: top level: unknown field(s) ['ofers'] (did you mean 'offers' for 'ofers'?)",
        ),
        # YAML 1.1 reads the key `on` as True; the error names it as written.
        (
            "triggers:\n  - id: t\n    on: {type: track}\n",
            ":3: trigger 't': unknown field(s) ['on']",
        ),
        (
            "triggers:\n  - id: t\n    when: {type: track}\n    cooldown: -1\n",
            ":4: trigger 't': 'cooldown' must be",
        ),
        (
            "triggers:\n  - id: t\n    when: {type: track}\n    if:\n      - 'orders >'\n",
            ":4: trigger 't'.if: cannot read condition 'orders >'",
        ),
        (
            "offers:\n  - id: o\n    channels: [web]\n  - id: p\n    channels: [web]\n"
            "  - id: o\n    channels: [app]\n",
            ":6: duplicate offer id(s) ['o']",
        ),
        (
            "offers: []\nlearning:\n  traits: [plan, email]\n",
            ":3: learning.traits: ['email'] identify a person",
        ),
        (
            "offers: []\nlearning:\n  features:\n    - {path: orders, encode: squared}\n",
            ":3: learning.features[0] (path 'orders'): unknown encoding 'squared'",
        ),
        (
            "offers:\n  - id: o\n    channels: [web]\n    attribution_window: 0\n",
            ":4: offer 'o': 'attribution_window' must be a number of seconds > 0",
        ),
    ],
)
def test_load_catalog_names_the_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad-catalog.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}{expected}"), str(info.value)


def test_an_unknown_field_is_named_as_written_with_the_field_it_likely_misspells() -> None:
    doc = {
        "triggers": [{"id": "t", "when": {"type": "track"}, "coldown": 5}],
        # A number as a key beside a name: YAML allows it, and the error must still come.
        "offers": [{"id": "o", "channels": ["web"], "eligibilty": [], 3: "x"}],
        "learning": {"trait": ["plan"]},
    }
    with pytest.raises(CatalogError) as info:
        parse_catalog(doc, source="x.yaml")
    lines = str(info.value).splitlines()
    assert lines == [
        "x.yaml: trigger 't': unknown field(s) ['coldown'] (did you mean 'cooldown' for "
        "'coldown'?)",
        "x.yaml: offer 'o': unknown field(s) ['3', 'eligibilty'] (did you mean 'eligibility' "
        "for 'eligibilty'?)",
        "x.yaml: learning: unknown field(s) ['trait'] (did you mean 'traits' for 'trait'?)",
    ], lines


def test_a_feature_option_its_encoding_does_not_take_is_named() -> None:
    spec = [{"path": "orders", "encode": "log2", 3: 1, "last": 2}]
    with pytest.raises(CatalogError, match=r"option\(s\) \['3', 'last'\] do not apply to encoding"):
        parse_catalog({"learning": {"features": spec}})


def test_every_error_of_a_catalog_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    """An author fixes a catalog in one go: each trigger, offer, placement and the learning
    section is checked, and an item in error does not make errors of what refers to it."""
    text = (
        "triggers:\n"
        "  - id: t\n"
        "    when: {type: track}\n"
        "    cooldown: -1\n"
        "offers:\n"
        "  - id: o\n"
        "    channels: [web]\n"
        "    triggers: [t]\n"
        "    value: -3\n"
        "  - id: p\n"
        "    channels: [fax]\n"
        "  - id: q\n"
        "    channels: [web]\n"
        "    triggers: [t]\n"
        "placements:\n"
        "  - id: home\n"
        "    channels: [web]\n"
        "    offers: [p, nowhere]\n"
        "learning:\n"
        "  traits: [email]\n"
    )
    path = tmp_path / "bad-catalog.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    lines = str(info.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [
        f"{path}:4",
        f"{path}:9",
        f"{path}:10",
        f"{path}:18",
        f"{path}:20",
    ], lines
    assert "trigger 't'" in lines[0] and "offer 'o'" in lines[1] and "'fax'" in lines[2]
    # The placement's error is the offer no item defines, not 'p' (defined, though in error).
    assert "nowhere" in lines[3] and "'p'" not in lines[3], lines[3]
    assert "identify a person" in lines[4]


def test_a_catalog_with_very_many_errors_lists_the_first_twenty() -> None:
    doc = {"offers": [{"id": f"o{i}", "channels": ["fax"]} for i in range(25)]}
    with pytest.raises(CatalogError) as info:
        parse_catalog(doc, source="x.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 5 more errors", lines[-3:]
    assert all("unknown channel" in line for line in lines[:20])


def test_rtim_offers_check_says_which_files_are_sound_without_a_broker(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("offers:\n  - id: o\n    channels: [web]\n", encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "offers:\n  - id: o\n    channels: [fax]\n  - id: p\n    channels: [web]\n    value: -1\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    ok = runner.invoke(main, ["offers", "check", str(good)])
    assert ok.exit_code == 0, ok.output
    assert ok.output == f"{good}: ok (0 triggers, 1 offers, 0 placements)\n"
    both = runner.invoke(main, ["offers", "check", str(bad), str(good)])
    assert both.exit_code == 2, both.output
    assert f"rtim: {bad}:2: offer 'o': unknown channel(s) ['fax']" in both.output
    assert f"\n{bad}:6: offer 'p': 'value' must be a finite number >= 0" in both.output
    assert f"{good}: ok" in both.output
    missing = runner.invoke(main, ["offers", "check", str(tmp_path / "nowhere.yaml")])
    assert missing.exit_code == 2 and "cannot read catalog" in missing.output


def test_load_catalog_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"cannot read catalog .*nowhere\.yaml"):
        load_catalog(tmp_path / "nowhere.yaml")


# --------------------------------------------------------------------------
# Offers: validity windows, channels, categories
# --------------------------------------------------------------------------


def test_validity_window_from_yaml_dates(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "offers:\n"
        "  - id: winter\n    channels: [web]\n"
        "    valid_from: 2026-12-01\n    valid_to: 2027-03-01\n"
        "  - id: always\n    channels: [web]\n",
        encoding="utf-8",
    )
    winter, always = load_catalog(path).offers
    start, end = ms(2026, 12, 1), ms(2027, 3, 1)
    assert (winter.valid_from_ms, winter.valid_to_ms) == (start, end)
    for moment, expected in [
        (start - 1, False),
        (start, True),
        (ms(2027, 1, 15, 12), True),
        (end - 1, True),
        (end, False),  # valid_to is exclusive
        (ms(2030, 1, 1), False),
    ]:
        assert winter.is_valid_at(moment) is expected, moment
        assert always.is_valid_at(moment) is True


@pytest.mark.parametrize(
    ("value", "expected_ms"),
    [
        ("2026-12-01", ms(2026, 12, 1)),
        ("2026-12-01T08:30:00", ms(2026, 12, 1, 8, 30)),  # no offset: UTC
        ("2026-12-01T08:30:00+02:00", ms(2026, 12, 1, 6, 30)),
        ("2026-12-01T08:30:00Z", ms(2026, 12, 1, 8, 30)),
    ],
)
def test_dates_are_utc_unless_they_say_otherwise(value: str, expected_ms: int) -> None:
    (offer,) = parse_catalog(
        {"offers": [{"id": "o", "channels": ["web"], "valid_from": value}]}
    ).offers
    assert offer.valid_from_ms == expected_ms
    assert offer.valid_to_ms is None
    assert not offer.is_valid_at(expected_ms - 1) and offer.is_valid_at(expected_ms)


@pytest.mark.parametrize(
    ("channels", "event_channel", "expected"),
    [
        (["web", "app"], "web", "web"),
        (["web", "app"], "app", "app"),
        (["web", "app"], "email", "web"),
        (["web", "app"], "server", "web"),
        (["call_centre", "email"], "web", "call_centre"),
        (["call_centre", "email"], "email", "email"),
        (["app"], "app", "app"),
    ],
)
def test_channel_for_falls_back_to_the_first_channel(
    channels: list[str], event_channel: str, expected: str
) -> None:
    (offer,) = parse_catalog({"offers": [{"id": "o", "channels": channels}]}).offers
    assert offer.channel_for(event_channel) == expected


def test_offers_without_triggers_are_considered_for_every_trigger() -> None:
    doc = copy.deepcopy(BASE)
    doc["offers"].append({"id": "anytime", "channels": ["email"], "category": "Shoes"})
    catalog = parse_catalog(doc)
    assert [o.id for o in catalog.offers_for("cart")] == ["ship", "anytime"]
    assert [o.id for o in catalog.offers_for("ticket")] == ["callback", "anytime"]
    assert [o.id for o in catalog.offers_for("unknown")] == ["anytime"]
    assert catalog.offers[-1].category == "shoes"
    assert catalog.channels == {"web", "app", "call_centre", "email"}


# --------------------------------------------------------------------------
# Trigger rules: patterns and cooldowns
# --------------------------------------------------------------------------

RULE = parse_rule(
    {
        "id": "shoe-add",
        "when": {
            "type": "track",
            "event": ["Product Added", "Product Viewed"],
            "channel": ["web", "app"],
            "properties": {"category": "shoes"},
        },
        "cooldown": 60,
    },
    0,
)


@pytest.mark.parametrize(
    ("e", "expected"),
    [
        (event("track", "Product Added", channel="web", category="shoes"), True),
        (event("track", "Product Viewed", channel="mobile", category="shoes"), True),
        (event("track", "Product Removed", channel="web", category="shoes"), False),
        (event("track", "Product Added", channel="email", category="shoes"), False),
        (event("track", "Product Added", channel="web", category="Shoes"), False),
        (event("track", "Product Added", channel="web"), False),
        (event("page", "Product Added", channel="web", category="shoes"), False),
    ],
)
def test_pattern_matching(e: Event, expected: bool) -> None:
    assert RULE.matches_pattern(e) is expected


def test_a_rule_without_a_pattern_matches_every_event() -> None:
    rule = parse_rule({"id": "all"}, 0)
    assert rule == TriggerRule(id="all")
    for e in (event("track", "X"), event("page"), event("identify")):
        assert rule.matches_pattern(e)


def test_page_rules_match_by_name() -> None:
    rule = parse_rule({"id": "pricing", "when": {"type": "page", "name": "Pricing"}}, 0)
    assert rule.matches_pattern(event("page", "Pricing"))
    assert not rule.matches_pattern(event("page", "Home"))
    assert not rule.matches_pattern(event("page"))


@pytest.mark.parametrize(
    ("cooldown", "raw"),
    [(None, {}), (0, {"cooldown": 0}), (60_000, {"cooldown": 60}), (1_500, {"cooldown": 1.5})],
)
def test_cooldown_is_read_in_seconds(cooldown: int | None, raw: dict[str, Any]) -> None:
    rule = parse_rule({"id": "r", **raw}, 0)
    assert rule.cooldown_ms == (3_600_000 if cooldown is None else cooldown)


def test_cooldown_counts_event_time_per_rule() -> None:
    ctx = new_context("u-1")
    assert RULE.cooled_down(ctx, T0)
    ctx["fired"]["shoe-add"] = T0
    assert not RULE.cooled_down(ctx, T0)
    assert not RULE.cooled_down(ctx, T0 + 59_999)
    assert RULE.cooled_down(ctx, T0 + 60_000)
    ctx["fired"] = {"other-rule": T0}
    assert RULE.cooled_down(ctx, T0)


def test_fired_rules_checks_conditions_on_the_context_after_the_event(sample: Catalog) -> None:
    views = [event("track", "Product Viewed", ts=T0 + i, category="shoes") for i in range(4)]
    fired_per_view = []
    ctx = new_context("u-1")
    for offset, e in enumerate(views):
        apply_event(ctx, e, 0, offset)
        fired = fired_rules(sample.triggers, e, ctx)
        fired_per_view.append([r.id for r in fired])
        for rule in fired:
            ctx["fired"][rule.id] = e.timestamp_ms
    # "events.Product Viewed >= 3": the third view fires; the fourth is in cooldown.
    assert fired_per_view == [[], [], ["browse-intent"], []]


def test_fired_rules_respects_conditions_that_read_the_event(sample: Catalog) -> None:
    ctx = context_after(event("track", "Product Added", product_id="p", price=120, quantity=1))
    e = event("track", "Product Added", product_id="q", price=5)
    apply_event(ctx, e, 0, 99)
    assert [r.id for r in fired_rules(sample.triggers, e, ctx)] == ["cart-builder"]
    ctx["fired"]["cart-builder"] = T0 - 1_799_000  # 29:59 ago, cooldown 30 min
    assert fired_rules(sample.triggers, e, ctx) == []
    rule = parse_rule({"id": "red", "if": ["event.properties.colour == red"], "cooldown": 0}, 0)
    assert fired_rules((rule,), event(colour="red", name="X"), ctx) == [rule]
    assert fired_rules((rule,), event(colour="blue", name="X"), ctx) == []


def test_a_cooldown_of_zero_fires_every_time(sample: Catalog) -> None:
    ctx = new_context("u-1")
    for offset in range(3):
        e = event("track", "Support Ticket Opened", ts=T0)
        apply_event(ctx, e, 0, offset)
        fired = fired_rules(sample.triggers, e, ctx)
        assert [r.id for r in fired] == ["service-issue"]
        ctx["fired"]["service-issue"] = T0


def test_conditions_see_the_context_and_the_event() -> None:
    e = event("track", "Product Viewed", channel="web", category="shoes")
    ctx = context_after(e)
    holding = compile_all(
        [
            "event.type == track",
            "event.name == Product Viewed",
            "event.channel == web",
            "event.properties.category == shoes",
            f"event.timestamp_ms == {T0}",
            "events.Product Viewed == 1",
        ],
        "test",
    )
    assert first_failed(holding, e, ctx) is None
    failing = compile_all(["events.Product Viewed == 1", "event.channel == app"], "test")
    assert first_failed(failing, e, ctx) is failing[1]
    assert "event" not in ctx  # the context itself is not changed


# --------------------------------------------------------------------------
# What the models learn from: the learning section
# --------------------------------------------------------------------------


def test_the_traits_kept_are_the_catalogs_allowlist() -> None:
    cat = parse_catalog({"learning": {"traits": ["plan", "loyalty"]}})
    assert cat.traits == ("plan", "loyalty")
    identify = parsed(
        segment_call(
            "identify",
            None,
            ts=T0,
            traits={"plan": "gold", "loyalty": "silver", "tier": "a", "email": "j@example.com"},
        )
    )
    ctx = new_context("u-1")
    apply_event(ctx, identify, 0, 0, traits=cat.traits)
    assert ctx["traits"] == {"plan": "gold", "loyalty": "silver"}
    # by default: plan, tier and segment
    default = new_context("u-1")
    apply_event(default, identify, 0, 0, traits=parse_catalog({}).traits)
    assert default["traits"] == {"plan": "gold", "tier": "a"}


@pytest.mark.parametrize("name", ["email", "Email", "firstName", "phone_number", "address"])
def test_no_allowlist_may_keep_a_trait_that_identifies_a_person(name: str) -> None:
    with pytest.raises(CatalogError, match="identify a person"):
        parse_catalog({"learning": {"traits": ["plan", name]}})


def test_the_features_are_the_catalogs_spec() -> None:
    spec = [{"path": "moment.channel", "encode": "category"}, {"path": "orders", "encode": "log2"}]
    cat = parse_catalog({"learning": {"features": spec}})
    assert [(e.path, e.encode) for e in cat.features.entries] == [
        ("moment.channel", "category"),
        ("orders", "log2"),
    ]
    assert parse_catalog({}).features.entries[0].path == "moment.channel"  # the default spec
