from pathlib import Path
from typing import Any

import orjson
import yaml

from rtim.engine import Engine, Record
from rtim.learn.evaluate import CATEGORIES, NEW_OFFER, Market
from rtim.learn.evaluate_worker import Feed, Scoreboard, _caught_up, _wave_end, market_catalog
from rtim.learn.features import FeatureBuilder
from rtim.names import CLICKSTREAM_TOPIC
from rtim.offers.catalog import load_catalog


def test_the_calls_of_a_moment_give_the_worker_the_moments_features() -> None:
    market = Market(3)
    feed = Feed(3)
    builder = FeatureBuilder()
    for i in range(1500):
        m = market.moment()
        feed.calls(i, m)
        ctx = feed.contexts[m.customer.id]
        moment: dict[str, Any] = dict(channel=m.channel, trigger=m.trigger, now_ms=m.at_ms)
        # All but the number of events seen, which the market's truth does not read.
        offline = [f for f in builder.shared(m.ctx, **moment) if not f.startswith("n~")]
        assert [f for f in builder.shared(ctx, **moment) if not f.startswith("n~")] == offline
        for cat in CATEGORIES:
            want = m.ctx["affinity"].get(cat, 0.0)
            assert abs(ctx["affinity"].get(cat, 0.0) - want) <= 0.25 + 1e-9, (i, cat)


def test_the_market_catalog_decides_each_moment_once_on_its_trigger(tmp_path: Path) -> None:
    market = Market(4)
    moments = [market.moment() for _ in range(400)]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(market_catalog(moments[200].at_ms)))
    catalog = load_catalog(path)
    assert {t.id for t in catalog.triggers} == {"browse", "cart", "service"}
    store: dict[bytes, bytes] = {}
    engine = Engine(catalog=catalog, load=lambda p, k: store.get(k))
    feed = Feed(4)
    offset = 0
    for i, m in enumerate(moments):
        records = []
        for call in feed.calls(i, m):
            records.append(Record(0, offset, call["userId"].encode(), orjson.dumps(call)))
            offset += 1
        result = engine.process(CLICKSTREAM_TOPIC, records)
        assert not result.dead_letters
        for items in result.updates.values():
            store.update(items)
        [decision] = [orjson.loads(d.value) for d in result.decisions]
        assert decision["message_id"] == Feed.moment_id(feed.prefix, i)
        assert decision["trigger"] == m.trigger and decision["decided_ms"] == m.at_ms
        offered = {c["offer_id"] for c in decision["candidates"]}
        assert offered == {o.id for o in Scoreboard(400).offers(i)}
        assert (NEW_OFFER in offered) == (i >= 200)


def test_a_wave_ends_before_it_would_close_the_window_of_a_response_to_come() -> None:
    times = [1000 * k for k in range(10)]  # moments at 0 s, 1 s, ... 9 s

    def response(ts: int, window_end: int) -> tuple[int, int, int, bytes, bytes]:
        return (ts, 0, window_end, b"c", b"{}")

    assert _wave_end(times, 0, 5, []) == 5
    assert _wave_end(times, 8, 5, []) == 10
    # A response stamped at 2.5 s of a decision whose window ends at 3.5 s: the moment
    # at 4 s would close that window, so the wave stops before it (the response goes
    # before the next wave).
    assert _wave_end(times, 0, 8, [response(2500, 3500)]) == 4
    # A window ending at a moment's time closes at that moment.
    assert _wave_end(times, 0, 8, [response(2500, 3000)]) == 3
    # A response after its window (late whoever sends it when) does not cut a wave.
    assert _wave_end(times, 0, 8, [response(5000, 3000)]) == 8
    # The shortest wave: one moment.
    assert _wave_end(times, 3, 8, [response(3200, 3900)]) == 4


def test_a_wave_waits_until_every_offer_and_the_pooled_model_learned_every_example() -> None:
    """Each example is learned twice, by its offer's model and by the pooled one: the
    pooled model's version alone reaching the examples written is not caught up."""
    written = {'rtim_training_examples_total{label="negative",why="window"}': 10.0}
    responses = {'rtim_events_consumed_total{topic="rtim.responses"}': 4.0}
    caught_up = _caught_up(4)
    pooled_only = {
        'rtim_model_version{offer="__shared__"}': 10.0,
        'rtim_model_version{offer="a"}': 3.0,
        'rtim_model_version{offer="b"}': 2.0,
    }
    assert not caught_up({**written, **responses, **pooled_only})
    offers_too = {**pooled_only, 'rtim_model_version{offer="b"}': 7.0}
    assert caught_up({**written, **responses, **offers_too})
    assert not caught_up({**written, **offers_too})  # the responses not taken in yet
