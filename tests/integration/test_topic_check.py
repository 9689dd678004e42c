"""A worker refuses a clickstream whose partitions do not match its table's."""

from __future__ import annotations

import asyncio

import pytest

from rtim.broker import EmbeddedBroker
from rtim.settings import Settings
from rtim.stream.topics import create_topics
from rtim.stream.worker import TopicMismatch, ensure_topics


def test_worker_refuses_a_clickstream_with_another_partition_count(tmp_path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        asyncio.run(create_topics(broker.bootstrap, {"rtim.clickstream": 2}))
        with pytest.raises(TopicMismatch, match="has 2 partitions but RTIM_PARTITIONS is 4"):
            asyncio.run(ensure_topics(Settings(broker=broker.bootstrap, partitions=4)))
        # With the matching count it goes through (and creates the other topics).
        asyncio.run(ensure_topics(Settings(broker=broker.bootstrap, partitions=2)))
