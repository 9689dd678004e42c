from pathlib import Path
from typing import Any

import orjson
import yaml

from rtim.engine import Engine, Record
from rtim.learn.evaluate import CATEGORIES, NEW_OFFER, Market
from rtim.learn.evaluate_worker import Feed, Scoreboard, market_catalog
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
