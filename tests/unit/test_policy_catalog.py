"""The catalog's contact policy sections: what loads, and line-precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtim.offers.catalog import CatalogError, load_catalog
from rtim.offers.policy import DEFAULT_SUPPRESSION, OUTBOUND, duration_ms

OFFERS = """\
offers:
  - id: bundle
    channels: [web, email]
    group: loyalty
  - id: recovery
    channels: [call_centre, email]
    kind: service
"""

GOOD = (
    OFFERS
    + """\
policy:
  timezone: Europe/London
  quiet_hours: {from: "21:00", to: "08:00"}
  consent:
    default: {email: false, sms: false}
    categories: {Advertising: [email, sms, push]}
  caps:
    - {id: daily-total, max: 3, per: 1d}
    - {id: email-daily, channel: email, max: 1, per: 1d}
    - {id: offer-weekly, scope: offer, max: 1, per: 7d}
    - {id: loyalty-weekly, group: loyalty, max: 2, per: 1w}
  dismissal_cooldown: 3d
groups: {loyalty: {priority: 1.2}}
weights:
  - {id: big-cart, when: "cart.value >= 100", factor: 1.5, offers: [bundle]}
"""
)


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return load_catalog(path)


def test_a_full_policy_loads(tmp_path: Path) -> None:
    cat = load(tmp_path, GOOD)
    policy = cat.policy  # type: ignore[attr-defined]
    assert policy.timezone == "Europe/London" and policy.quiet == (21 * 60, 8 * 60)
    assert policy.outbound == frozenset(OUTBOUND)
    assert [c.id for c in policy.caps] == [
        "daily-total",
        "email-daily",
        "offer-weekly",
        "loyalty-weekly",
    ]
    assert policy.contact_horizon_ms == duration_ms("7d", "x")
    assert policy.dismissal_horizon_ms == duration_ms("3d", "x")
    assert policy.groups == {"loyalty": 1.2}
    # No suppression section, an offer of kind service: the default rule is in force.
    assert [s.id for s in policy.suppression] == [DEFAULT_SUPPRESSION]
    assert policy.suppression[0].raise_ == ("recovery",)


def test_the_example_has_a_policy_and_the_sample_catalog_none() -> None:
    root = Path(__file__).parents[2]
    example = load_catalog(root / "docs/catalog.example.yaml").policy
    assert example is not None
    assert [s.raise_ for s in example.suppression] == [("service-recovery",)]
    assert load_catalog(root / "rtim/data/catalog.yaml").policy is None


@pytest.mark.parametrize("text", ["1d12h", "30m", "45s", "2w", "1.5h"])
def test_durations(text: str) -> None:
    assert duration_ms(text, "x") > 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("group: loyalty\n", "group: loyalty\n    kind: upsell\n"),
         ":5: offer 'bundle': 'kind' must be one of"),
        (("timezone: Europe/London", "timezone: Europe/Londres"),
         ":9: policy.timezone: unknown time zone 'Europe/Londres'"),
        (("timezone: Europe/London", "timezone: Europe"),
         ":9: policy.timezone: unknown time zone 'Europe'"),
        (('to: "08:00"', 'to: "8 am"'),
         ":10: policy.quiet_hours.to: '8 am' is not a time of day"),
        (("default: {email: false", "default: {fax: false"),
         ":12: policy.consent.default: unknown channel(s) ['fax']"),
        (("Advertising: [email, sms, push]", "Advertising: [email, pigeon]"),
         ":13: policy.consent.categories.Advertising: unknown channel(s) ['pigeon']"),
        (("max: 1, per: 1d}", "max: 1, per: 1 day}"),
         ":16: policy.caps[1] 'email-daily'.per: '1 day' is not a duration"),
        (("max: 3, per: 1d}", "max: 300, per: 1d}"),
         ":15: policy.caps[0] 'daily-total': 'max' must be a whole number from 0 to 64"),
        (("group: loyalty, max: 2", "group: loyal, max: 2"),
         ":18: cap 'loyalty-weekly': unknown group 'loyal'"),
        (("scope: offer", "scope: everyone"), ":17: policy.caps[2] 'offer-weekly': 'scope' is"),
        (("dismissal_cooldown: 3d", "dismissal_cooldown: 3"),
         ":19: policy.dismissal_cooldown: 3 is not a duration"),
        (("priority: 1.2", "priority: -1"),
         ":20: groups.loyalty: 'priority' must be a finite number > 0"),
        (('"cart.value >= 100"', '"cart.value >="'),
         ":22: weight 'big-cart'.when: cannot read condition"),
        (("offers: [bundle]", "offers: [bundel]"),
         ":22: weight 'big-cart'.offer: unknown offer(s) ['bundel']"),
        (("  dismissal_cooldown", "  cooldown"), ":19: policy: unknown field(s) ['cooldown']"),
    ],
)  # fmt: skip
def test_policy_errors_name_the_line(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(CatalogError) as info:
        load(tmp_path, GOOD.replace(old, new, 1))
    assert str(info.value).startswith(f"{tmp_path / 'catalog.yaml'}{expected}"), str(info.value)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("suppression:\n  - {id: s, when: 'issues > 0', suppress: {kind: sale}}\n",
         ":9: suppression 's'.suppress.kind: unknown kind(s) ['sale']"),
        ("suppression:\n  - {id: s, when: 'issues > 0', suppress: {}, raise: recovery}\n",
         ":9: suppression 's'.suppress: name offer(s), group(s) or kind(s)"),
        ("suppression:\n  - {id: s, when: 'issues > 0', suppress: {kind: sales},"
         " raise: [nothing]}\n",
         ":9: suppression 's'.raise: unknown offer(s) ['nothing']"),
        ("suppression:\n  - {id: s, when: 'issues > 0', suppress: {kind: service},"
         " raise: recovery}\n",
         ":9: suppression 's': raises ['recovery'], which it suppresses"),
        ("suppression:\n  - id: s\n    when: 'issues > 0'\n    suppress: {kind: sales}\n"
         "  - id: s\n    when: 'orders > 0'\n    suppress: {kind: sales}\n",
         ":12: duplicate suppression rule id(s) ['s']"),
    ],
)  # fmt: skip
def test_suppression_errors_name_the_line(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(CatalogError) as info:
        load(tmp_path, OFFERS + extra)
    assert str(info.value).startswith(f"{tmp_path / 'catalog.yaml'}{expected}"), str(info.value)


def test_offer_ids_and_group_names_fit_the_context_budget(tmp_path: Path) -> None:
    long = "x" * 65
    with pytest.raises(CatalogError, match=r":2: offer 'x+'...: an offer id is at most 64"):
        load(tmp_path, OFFERS.replace("id: bundle", f"id: {long}"))
    with pytest.raises(CatalogError, match=r":4: offer 'bundle': 'group' must be a name of"):
        load(tmp_path, OFFERS.replace("group: loyalty", f"group: {long}"))


def test_an_offers_own_caps_and_cooldown_name_the_line(tmp_path: Path) -> None:
    text = OFFERS + "    cooldown: 2h\n    caps:\n      - {max: 1, per: 1d}\n      - {max: 1}\n"
    with pytest.raises(CatalogError) as info:
        load(tmp_path, text)
    assert ":11: offer 'recovery'.caps[1]: 'per' is required" in str(info.value)
    cat = load(tmp_path, text.replace("      - {max: 1}\n", ""))
    recovery = cat.offers[1]  # type: ignore[attr-defined]
    assert recovery.cooldown_ms == 2 * 3_600_000
    assert [(c.max, c.per_ms, c.offer) for c in recovery.caps] == [(1, 86_400_000, "recovery")]
