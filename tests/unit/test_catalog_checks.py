"""The catalog's bounds, each error naming the line: finite numbers and durations, a key
given once, cap ids used once, aliases and nesting within reason; policy errors listed
with the others."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from rtim.cli import main
from rtim.offers.catalog import MAX_ALIASED_VALUES, MAX_DEPTH, Catalog, CatalogError, load_catalog
from rtim.offers.policy import MAX_DURATION_MS, duration_ms
from rtim.triggers.rules import parse_rule

ROOT = Path(__file__).parents[2]

OFFER = """\
offers:
  - id: o
    channels: [web]
"""


def load(tmp_path: Path, text: str) -> Catalog:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return load_catalog(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(CatalogError) as info:
        load(tmp_path, text)
    message = str(info.value)
    prefix = f"{tmp_path / 'catalog.yaml'}:"
    assert all(line.startswith(prefix) for line in message.splitlines()), message
    return message.replace(prefix, ":")


def test_the_shipped_catalogs_pass_rtim_offers_check() -> None:
    files = [*sorted((ROOT / "rtim/data").glob("*.yaml")), ROOT / "docs/catalog.example.yaml"]
    assert len(files) >= 3
    result = CliRunner().invoke(main, ["offers", "check", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok (") == len(files), result.output


# --------------------------------------------------------------------------
# Every number and duration is finite
# --------------------------------------------------------------------------

SECONDS = MAX_DURATION_MS // 1000


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf", "1.0e+309", "1" + "0" * 400])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (OFFER + "    value: {}\n", ":4: offer 'o': 'value' must be a finite number >= 0, got "),
        (OFFER + "    priority: {}\n",
         ":4: offer 'o': 'priority' must be a finite number >= 0, got "),
        (OFFER + "    attribution_window: {}\n",
         f":4: offer 'o': 'attribution_window' must be a number of seconds > 0 and at most "
         f"{SECONDS}, got "),
        (OFFER + "groups:\n  g:\n    priority: {}\n",
         ":6: groups.g: 'priority' must be a finite number > 0, got "),
        (OFFER + "weights:\n  - id: w\n    when: 'orders > 0'\n    factor: {}\n",
         ":7: weight 'w': 'factor' must be a finite number > 0, got "),
        ("triggers:\n  - id: t\n    cooldown: {}\n",
         f":3: trigger 't': 'cooldown' must be a number of seconds from 0 to {SECONDS}, got "),
    ],
)  # fmt: skip
def test_a_number_that_is_not_finite_is_refused_on_its_line(
    tmp_path: Path, text: str, expected: str, bad: str
) -> None:
    message = error_of(tmp_path, text.replace("{}", bad))
    assert message.startswith(expected), message
    assert "\n" not in message, message


def test_finite_numbers_still_load(tmp_path: Path) -> None:
    cat = load(
        tmp_path,
        "triggers:\n  - id: t\n    cooldown: 1.5\n"
        + OFFER
        + "    value: 0\n    priority: 2.5\n    attribution_window: 86400\n"
        + "groups: {g: {priority: 1.2}}\n",
    )
    assert cat.triggers[0].cooldown_ms == 1500
    offer = cat.offers[0]
    assert (offer.value, offer.priority, offer.attribution_window_ms) == (0.0, 2.5, 86_400_000)
    assert cat.policy is not None and cat.policy.groups == {"g": 1.2}


@pytest.mark.parametrize("cooldown", [True, float("nan"), float("inf"), SECONDS + 1, -1])
def test_a_trigger_cooldown_is_a_finite_number_of_seconds(cooldown: object) -> None:
    with pytest.raises(ValueError, match=r"trigger 'r': 'cooldown' must be a number of seconds"):
        parse_rule({"id": "r", "cooldown": cooldown}, 0)
    assert parse_rule({"id": "r", "cooldown": SECONDS}, 0).cooldown_ms == MAX_DURATION_MS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (OFFER + "    cooldown: 36501d\n",
         ":4: offer 'o'.cooldown: a duration is at most 36500d, got '36501d'"),
        (OFFER + "    cooldown: " + "9" * 400 + "s\n",
         ":4: offer 'o'.cooldown: a duration is at most 36500d, got '999"),
        (OFFER + "    caps: [{max: 1, per: 5300w}]\n",
         ":4: offer 'o'.caps[0].per: a duration is at most 36500d, got '5300w'"),
        (OFFER + "policy:\n  dismissal_cooldown: 40000d\n",
         ":5: policy.dismissal_cooldown: a duration is at most 36500d, got '40000d'"),
    ],
)  # fmt: skip
def test_a_duration_is_at_most_a_hundred_years(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(expected), message


def test_the_longest_duration_loads() -> None:
    assert duration_ms("36500d", "x") == MAX_DURATION_MS


# --------------------------------------------------------------------------
# A key is given once, at any level
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (OFFER + "    cooldown: 1800s\n    cooldown: 60s\n",
         ":5: not valid YAML: key 'cooldown' given twice, on lines 4 and 5"),
        ("offers: []\noffers: []\n",
         ":2: not valid YAML: key 'offers' given twice, on lines 1 and 2"),
        (OFFER + "    creative: {title: a, text: b, title: c}\n",
         ":4: not valid YAML: key 'title' given twice, on lines 4 and 4"),
        (OFFER + "policy:\n  quiet_hours:\n    from: '21:00'\n    to: '08:00'\n    from: '22:00'\n",
         ":8: not valid YAML: key 'from' given twice, on lines 6 and 8"),
        # YAML 1.1 reads `on` as true; as a key it is the name as written, once.
        ("triggers:\n  - id: t\n    on: 1\n    'on': 2\n",
         ":4: not valid YAML: key 'on' given twice, on lines 3 and 4"),
    ],
)  # fmt: skip
def test_a_key_given_twice_is_refused_naming_both_lines(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert error_of(tmp_path, text) == expected


def test_a_key_a_merge_brings_in_may_be_given_again(tmp_path: Path) -> None:
    text = (
        "offers:\n"
        "  - &base\n    id: o\n    channels: [web]\n    value: 2\n"
        "  - <<: *base\n    id: p\n    value: 3\n"
    )
    cat = load(tmp_path, text)
    assert [(o.id, o.value, o.channels) for o in cat.offers] == [
        ("o", 2.0, ("web",)),
        ("p", 3.0, ("web",)),
    ]
    message = error_of(tmp_path, text + "    value: 4\n")
    assert message == ":9: not valid YAML: key 'value' given twice, on lines 8 and 9"


# --------------------------------------------------------------------------
# Cap ids
# --------------------------------------------------------------------------


def test_a_cap_id_used_twice_is_refused_on_its_second_use(tmp_path: Path) -> None:
    caps = (
        "policy:\n  caps:\n"
        "    - {id: daily-total, max: 3, per: 1d}\n"
        "    - {id: email-daily, channel: email, max: 1, per: 1d}\n"
    )
    assert [c.id for c in load(tmp_path, OFFER + caps).policy.caps] == [  # type: ignore[union-attr]
        "daily-total",
        "email-daily",
    ]
    twice = caps + "    - {id: daily-total, max: 1, per: 7d}\n"
    assert error_of(tmp_path, OFFER + twice) == ":8: duplicate cap id(s) ['daily-total']"


# --------------------------------------------------------------------------
# Aliases and nesting
# --------------------------------------------------------------------------


def laughs(levels: int) -> str:
    """A creative whose every level is ten aliases of the one before ("billion laughs")."""
    rows = ['      l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return OFFER + "    creative:\n" + "\n".join(rows) + "\n"


def test_aliases_that_expand_beyond_the_bound_are_refused_where_they_cross_it(
    tmp_path: Path,
) -> None:
    # Values added by aliases: 10 x 11 (l1), + 10 x 111 (l2), + 10 x 1111 (l3): 12,330;
    # l4 adds 111,110 and crosses MAX_ALIASED_VALUES at its first alias's list, line 9.
    assert MAX_ALIASED_VALUES == 100_000
    message = error_of(tmp_path, laughs(9))
    assert message == (
        ":9: aliases expand to more than 100000 values (at *l3); "
        "write the repeated parts out, or repeat less"
    ), message
    creative = load(tmp_path, laughs(4)).offers[0].creative
    assert len(creative["l3"]) == 10 and creative["l3"][0][0][0][0] == "lol"


def test_an_alias_inside_the_value_it_names_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, OFFER + "    creative:\n      loop: &a [1, *a]\n")
    assert message == ":5: alias *a is inside the value it names"


def test_values_nested_too_deep_are_refused_with_or_without_aliases(tmp_path: Path) -> None:
    # The creative's mapping is the fourth value down (document, offers, offer, creative),
    # its x a list holding lists: MAX_DEPTH - 4 of them fit.
    def nested(lists: int) -> str:
        return OFFER + "    creative: {x: " + "[" * lists + "]" * lists + "}\n"

    load(tmp_path, nested(MAX_DEPTH - 4))
    refused = f":4: values nested more than {MAX_DEPTH} deep"
    assert error_of(tmp_path, nested(MAX_DEPTH - 3)) == refused
    assert error_of(tmp_path, nested(600)) == refused  # a Python RecursionError before
    # Each list one deeper than the one it aliases: l{i} is i + 2 values deep, and its
    # alias sits 5 down, so the alias in l45 (line 50) would make 5 + 46.
    chained = "".join(f"      l{i}: &l{i} [*l{i - 1}]\n" for i in range(1, 60))
    text = OFFER + "    creative:\n      l0: &l0 [x]\n"
    message = error_of(tmp_path, text + chained)
    assert message == f":50: values nested more than {MAX_DEPTH} deep (at *l44, expanded)"
    load(tmp_path, text + chained[: chained.index("  l45")])


# --------------------------------------------------------------------------
# Policy errors are listed with the others
# --------------------------------------------------------------------------


def test_policy_errors_are_listed_with_the_offers_errors_one_per_section(tmp_path: Path) -> None:
    text = (
        "offers:\n"
        "  - id: o\n"
        "    channels: [fax]\n"  # 2: in error, still lends its id and group
        "    group: loyalty\n"
        "  - id: p\n"
        "    channels: [web]\n"
        "policy:\n"
        "  timezone: Mars/Olympus\n"  # 8
        "  caps:\n"
        "    - {id: g, group: loyalty, max: 1, per: 1d}\n"
        "groups:\n"
        "  loyalty: {priority: -1}\n"  # 12
        "weights:\n"
        "  - {id: w, when: 'orders > 0', factor: 2, offers: [o, q]}\n"  # 14
        "suppression:\n"
        "  - {id: s, when: 'issues > 0', suppress: {offer: o}, raise: p}\n"
    )
    lines = error_of(tmp_path, text).splitlines()
    assert lines == [
        ":2: offer 'o': unknown channel(s) ['fax']; known: " + lines[0].split("known: ", 1)[1],
        ":12: groups.loyalty: 'priority' must be a finite number > 0, got -1",
        ":14: weight 'w'.offer: unknown offer(s) ['q']; known: ['o', 'p']",
        ":8: policy.timezone: unknown time zone 'Mars/Olympus' (an IANA name, like Europe/London)",
    ], lines
