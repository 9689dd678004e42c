import pytest

from rtim.context.model import new_context
from rtim.learn.features import (
    DEFAULT_SPEC,
    FeatureBuilder,
    FeatureSpecError,
    log2_bucket,
    parse_spec,
)

NOW = 1_780_000_000_000


def shopper():
    ctx = new_context("c1")
    ctx["first_ms"] = NOW - 3 * 86_400_000
    ctx["n"] = 12
    ctx["orders"] = 2
    ctx["traits"] = {"plan": "gold", "segment": "family"}
    ctx["cart"] = {"items": {"p1": [1.0, 60.0], "p2": [2.0, 20.0]}, "value": 100.0}
    ctx["affinity"] = {"shoes": 9.0, "electronics": 0.7}
    ctx["pages"] = ["/c/shoes/12", "/c/shoes/14", "/c/bags/1/detail"]
    ctx["issues"] = 1
    return ctx


def test_default_features_encode_the_context_and_the_moment_as_keys():
    shared = FeatureBuilder().shared(shopper(), channel="app", trigger="cart-builder", now_ms=NOW)
    assert set(shared) == {
        "moment.channel=app",
        "moment.trigger=cart-builder",
        "traits.plan=gold",
        "traits.segment=family",
        "n~4",
        "orders~2",
        "first_ms@<7d",
        "cart.value~7",
        "cart.items~2",
        "issues=yes",
        "pages=c/shoes",
        "pages=c/bags",
    }


def test_an_empty_context_still_has_its_moment_and_no_missing_values():
    shared = FeatureBuilder().shared(new_context("c2"), channel="web", trigger="t", now_ms=NOW)
    assert "cart=empty" in shared
    assert "issues=no" in shared
    assert "first_ms@never" in shared
    assert not any(k.startswith("traits.") for k in shared)


def test_a_builder_that_met_thousands_of_pages_still_keys_each_by_its_path():
    # Page keys are remembered per page met: past the builder's memory they are
    # forgotten and formatted again, never mixed up.
    builder = FeatureBuilder()
    ctx = new_context("c3")
    for i in range(5_000):
        ctx["pages"] = [f"/p/prd-{i}/detail", f"/c/cat-{i % 7}/", "/"]
        shared = builder.shared(ctx, channel="web", trigger="t", now_ms=NOW)
        assert [k for k in shared if k.startswith("pages")] == [
            f"pages=p/prd-{i}",
            f"pages=c/cat-{i % 7}",
            "pages=",
        ]


def test_the_offer_adds_its_category_affinity_and_offers_without_one_add_nothing():
    builder = FeatureBuilder()
    ctx = shopper()
    shared = builder.shared(ctx, channel="web", trigger="t", now_ms=NOW)
    assert builder.for_offer(shared, ctx, "shoes") == [*shared, "affinity~4"]
    assert builder.for_offer(shared, ctx, "electronics") == [*shared, "affinity~1"]
    assert builder.for_offer(shared, ctx, "garden") == [*shared, "affinity~0"]
    assert builder.for_offer(shared, ctx, None) == shared
    assert "affinity~4" not in shared  # the shared list is not changed


def test_the_keys_of_all_candidates_at_once_are_each_candidates_own():
    ctx = shopper()
    ctx["views"] = {"shoes": 3, "garden": "many"}  # not a number: the lowest bucket
    categories = ["shoes", None, "electronics", "shoes", "garden"]
    two = FeatureBuilder(
        parse_spec(
            [
                {"path": "affinity", "encode": "offer_affinity", "max": 2},
                {"path": "views", "encode": "offer_affinity"},
            ]
        )
    )
    assert two.owns(ctx, categories) == [
        ("affinity~2", "views~2"),
        (),
        ("affinity~1", "views~0"),
        ("affinity~2", "views~2"),
        ("affinity~0", "views~0"),
    ]
    for builder in (FeatureBuilder(), two):
        assert builder.owns(ctx, categories) == [builder.own(ctx, c) for c in categories]


def test_log2_buckets():
    assert [log2_bucket(v, 5) for v in (-1, 0, 0.5, 1, 2, 3, 4, 7, 8, 10_000)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 5,
    ]  # fmt: skip


def test_a_spec_from_plain_data_encodes_only_what_it_names():
    spec = parse_spec(
        [
            {"path": "traits.plan", "encode": "category"},
            {"path": "issues", "encode": "log2", "max": 3},
        ]
    )
    assert FeatureBuilder(spec).shared(shopper(), channel="web", trigger="t", now_ms=NOW) == [
        "traits.plan=gold",
        "issues~1",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "non-empty list"),
        (
            [{"path": "cart", "encode": "bogus"}],
            "features[0] (path 'cart'): unknown encoding 'bogus'",
        ),
        ([{"path": "", "encode": "flag"}], "features[0]: 'path' must be"),
        ([{"path": "moment.weather", "encode": "category"}], "path 'moment.weather'"),
        ([{"path": "pages", "encode": "recent", "depth": 0}], "option 'depth' must be"),
        ([{"path": "n", "encode": "flag", "max": 3}], "path 'n'): option(s) ['max'] do not apply"),
        (["cart"], "features[0]: must be a mapping"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_entry(data, message):
    with pytest.raises(FeatureSpecError) as exc:
        parse_spec(data)
    assert message in str(exc.value)


def test_the_default_spec_has_one_per_offer_entry():
    assert [e.path for e in DEFAULT_SPEC.entries if e.per_offer] == ["affinity"]
