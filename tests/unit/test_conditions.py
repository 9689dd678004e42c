"""Conditions as written in the catalog: every operator, missing data, bad text."""

from __future__ import annotations

from typing import Any

import pytest

from rtim.conditions import Condition, ConditionError, compile_all, compile_condition

# A context (after an event) plus the event under 'event', as conditions see them.
NS: dict[str, Any] = {
    "cart": {"items": {"p-1": [2, 40.0]}, "value": 80.0},
    "events": {"Product Viewed": 3, "Order Completed": 1, "Home": 1},
    "channels": {"app": {"n": 9, "last_ms": 1}, "web": {"n": 4, "last_ms": 2}},
    "affinity": {"shoes": 2.5},
    "orders": 2,
    "issues": 0,
    "traits": {"plan": "gold"},
    "pages": ["/", "/shoes"],
    "event": {
        "type": "track",
        "name": "Product Viewed",
        "channel": "web",
        "properties": {
            "category": "shoes",
            "price": 59.5,
            "coupon": None,
            "tags": ["sale", "new"],
            "title": "Trail runner 2",
            "status": "missing",
        },
    },
}


def holds(text: str, ns: dict[str, Any] = NS) -> bool:
    return compile_condition(text)(ns)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # == and !=
        ("cart.value == 80", True),
        ("cart.value == 79.99", False),
        ('event.properties.category == "shoes"', True),
        ("event.properties.category == shoes", True),  # bare YAML string
        ("event.properties.category == boots", False),
        ("traits.plan != silver", True),
        ("traits.plan != gold", False),
        # ordering operators, including the boundaries
        ("cart.value >= 80", True),
        ("cart.value >= 80.01", False),
        ("cart.value > 80", False),
        ("cart.value > 79.5", True),
        ("orders <= 2", True),
        ("orders <= 1", False),
        ("orders < 3", True),
        ("orders < 2", False),
        ("channels.app.n >= 8", True),
        ("channels.web.n >= 8", False),
        # in / not in a list
        ('traits.plan in ["gold", "platinum"]', True),
        ("traits.plan in [silver, bronze]", False),
        ("event.channel in [web, app]", True),
        ("orders in [1, 2, 3]", True),
        ("traits.plan not in [silver, bronze]", True),
        ("traits.plan not in [gold]", False),
        # contains: a list element or a substring
        ("event.properties.tags contains sale", True),
        ("event.properties.tags contains clearance", False),
        ("event.properties.title contains runner", True),
        ("event.properties.title contains boot", False),
        ("pages contains /shoes", True),
        # exists / missing: null counts as missing, zero does not
        ("traits.plan exists", True),
        ("issues exists", True),
        ("event.properties.coupon exists", False),
        ("event.properties.coupon missing", True),
        ("event.properties.discount missing", True),
        ("traits.plan missing", False),
    ],
)
def test_every_operator(text: str, expected: bool) -> None:
    assert holds(text) is expected


@pytest.mark.parametrize(
    "text",
    [
        "nope == 1",
        "nope != 1",
        "nope > 1",
        "nope >= 1",
        "nope < 1",
        "nope <= 1",
        "nope in [1, 2]",
        "nope not in [1, 2]",
        "nope contains 1",
        "nope exists",
        "cart.nope >= 0",
        "traits.email != someone",
        "events.Product Added >= 0",
        "event.properties.size == 42",
        "cart.value.cents == 0",  # walks into a number
        "pages.0 == /",  # lists are not indexed by paths
        "event.properties.coupon > 0",  # present but null
    ],
)
def test_a_path_that_does_not_resolve_makes_every_comparison_false(text: str) -> None:
    assert holds(text) is False


@pytest.mark.parametrize("text", ["nope missing", "cart.nope missing", "cart.value.cents missing"])
def test_missing_is_true_only_for_unresolved_paths(text: str) -> None:
    assert holds(text) is True


def test_empty_namespace_never_fires_a_comparison() -> None:
    assert compile_condition("cart.value >= 0")({}) is False
    assert compile_condition("issues == 0")({}) is False
    assert compile_condition("issues missing")({}) is True


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        ("events.Product Viewed >= 2", ("events", "Product Viewed"), True),
        ("events.Product Viewed >= 4", ("events", "Product Viewed"), False),
        ("events.Order Completed == 1", ("events", "Order Completed"), True),
        ("events.Product Added >= 1", ("events", "Product Added"), False),
        ("events . Product Viewed  >=  3", ("events", "Product Viewed"), True),
        ("events.Order Completed exists", ("events", "Order Completed"), True),
    ],
)
def test_keys_may_contain_spaces(text: str, path: tuple[str, ...], expected: bool) -> None:
    cond = compile_condition(text)
    assert cond.path == path
    assert cond(NS) is expected


@pytest.mark.parametrize(
    "text",
    [
        'cart.value >= "50"',  # str vs float
        "traits.plan > 3",  # str vs int
        "traits.plan <= 3",
        "event.properties.price contains 5",  # a float contains nothing
        "orders contains 1",
        "event.properties.tags > 1",  # list vs int
        "cart > 1",  # dict vs int
        "event.properties.title contains [a]",  # list in str
    ],
)
def test_type_mismatches_are_false_not_errors(text: str) -> None:
    assert holds(text) is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('orders == "2"', False),  # a number is not its string
        ('orders != "2"', True),
        ("cart.value == 80.0", True),  # 80 and 80.0 are the same number
        ("traits.plan in [1, 2]", False),
    ],
)
def test_equality_does_not_coerce_types(text: str, expected: bool) -> None:
    assert holds(text) is expected


@pytest.mark.parametrize(
    ("text", "op", "value"),
    [
        ("cart.value >= 50", ">=", 50),
        ("cart.value > 49.5", ">", 49.5),
        ('traits.plan == "gold"', "==", "gold"),
        ("traits.vip == true", "==", True),
        ("traits.plan in [gold, platinum]", "in", ["gold", "platinum"]),
        ("traits.plan not in [gold]", "not in", ["gold"]),
        ("event.properties.tags contains sale", "contains", "sale"),
        ("event.properties.coupon exists", "exists", None),
        ("event.properties.coupon missing", "missing", None),
        ('event.properties.query == "a >= b"', "==", "a >= b"),
    ],
)
def test_compiled_form(text: str, op: str, value: Any) -> None:
    cond = compile_condition(text)
    assert isinstance(cond, Condition)
    assert (cond.op, cond.value) == (op, value)
    assert cond.text == text


def test_text_is_kept_stripped_for_reason_codes() -> None:
    assert compile_condition("  cart.value >= 50  ").text == "cart.value >= 50"


def test_the_word_missing_after_a_comparison_is_a_value_not_the_operator() -> None:
    cond = compile_condition("event.properties.status == missing")
    assert (cond.path, cond.op, cond.value) == (("event", "properties", "status"), "==", "missing")
    assert cond(NS) is True
    assert cond({"event": {"properties": {}}}) is False
    assert compile_condition("event.properties.status != exists")(NS) is True


@pytest.mark.parametrize(
    "text",
    [
        "cart.value",
        "cart.value >=",
        ">= 50",
        "cart.value => 50",
        "cart.value >=50",
        "cart.value =! 50",
        "exists",
        "cart..value >= 1",
        "cart.value. >= 1",
        "traits.plan in gold",  # `in` needs a list
        'traits.plan in "gold"',
        "traits.plan not in 3",
        "traits.plan in {gold: 1}",
        "cart.value == [unclosed",
        "cart.value == {a: 1",
    ],
)
def test_malformed_conditions_raise_naming_the_text(text: str) -> None:
    with pytest.raises(ConditionError) as info:
        compile_condition(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", None, 42, ["cart.value >= 1"]])
def test_a_condition_must_be_a_non_empty_string(text: Any) -> None:
    with pytest.raises(ConditionError) as info:
        compile_condition(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("op", ["in", "not in"])
def test_in_needs_a_list(op: str) -> None:
    with pytest.raises(ConditionError, match="needs a list"):
        compile_condition(f"traits.plan {op} gold")
    assert compile_condition(f"traits.plan {op} [gold]")(NS) is (op == "in")


def test_condition_error_is_a_value_error() -> None:
    assert issubclass(ConditionError, ValueError)


def test_compile_all_accepts_none_a_string_or_a_list() -> None:
    assert compile_all(None, "x") == ()
    (one,) = compile_all("issues == 0", "x")
    assert one.text == "issues == 0"
    both = compile_all(["cart.value >= 50", "issues == 0"], "x")
    assert [c.text for c in both] == ["cart.value >= 50", "issues == 0"]
    assert all(c(NS) for c in both)


@pytest.mark.parametrize("texts", [{"cart.value": 50}, 42, ("issues == 0",)])
def test_compile_all_needs_a_list(texts: Any) -> None:
    with pytest.raises(ConditionError, match=r"^offer 'x'\.eligibility: conditions must be a list"):
        compile_all(texts, "offer 'x'.eligibility")


def test_compile_all_names_the_place_and_the_bad_condition() -> None:
    with pytest.raises(ConditionError) as info:
        compile_all(["issues == 0", "cart.value >>= 3"], "trigger 'cart'.if")
    message = str(info.value)
    assert message.startswith("trigger 'cart'.if: ")
    assert "'cart.value >>= 3'" in message


@pytest.mark.parametrize("text", ["cart.value >= nan", "cart.value < inf", "cart.value > .inf"])
def test_a_number_that_is_no_finite_number_is_refused(text: str) -> None:
    with pytest.raises(ConditionError, match="a number must be finite"):
        compile_condition(text)


def test_a_number_yaml_reads_as_a_string_is_still_compared_as_a_number() -> None:
    cond = compile_condition("cart.value >= 1e3")
    assert cond({"cart": {"value": 1200}}) and not cond({"cart": {"value": 999}})
