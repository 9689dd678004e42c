"""The topics a worker reads and writes, and their creation.

:func:`topic_specs` lists them (names from :mod:`rtim.names`), :func:`create_topics`
creates the missing ones; the worker does both at start-up, and so do the
demo, the bench and the tests on their brokers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from rtim.names import (
    CLICKSTREAM_TOPIC,
    DECISIONS_TOPIC,
    DLQ_TOPIC,
    MODELS_TOPIC,
    OFFERS_TOPIC,
    RESPONSES_TOPIC,
    TRAINING_TOPIC,
    trigger_topic,
)
from rtim.offers.catalog import load_catalog
from rtim.settings import KafkaConnection, Settings

_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")  # Kafka's own rule

#: Configs of the topics that need their own (applied when they are created).
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    # The newest catalog is all a worker needs (one key, one partition: one order).
    OFFERS_TOPIC: {"cleanup.policy": "compact"},
}


def topic_specs(settings: Settings) -> dict[str, int]:
    """The topics a worker reads and writes, with their partition counts."""
    channels = load_catalog(settings.catalog).channels
    n = settings.partitions
    specs = {
        CLICKSTREAM_TOPIC: n,
        # Co-partitioned with the clickstream: a customer's responses are joined by
        # the worker that owns the customer's context and open decisions.
        RESPONSES_TOPIC: n,
        DLQ_TOPIC: n,
        DECISIONS_TOPIC: n,
        TRAINING_TOPIC: n,
        MODELS_TOPIC: n,
        OFFERS_TOPIC: 1,
    }
    specs.update({trigger_topic(c): settings.partitions for c in sorted(channels)})
    return specs


async def create_topics(
    kafka: KafkaConnection | str,
    specs: Mapping[str, int],
    *,
    config: Mapping[str, Any] | None = None,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet. Idempotent.

    Parameters
    ----------
    kafka
        The connection (or bootstrap servers, ``host:port[,host:port]``).
    specs
        Topic name -> number of partitions. Existing topics are left as they are,
        even if their partition count differs.
    config
        Topic configs applied to every created topic (values are sent as strings), with
        those of :data:`TOPIC_CONFIGS` over them.
    replication_factor
        1 on the embedded broker; ``RTIM_REPLICATION_FACTOR`` for a worker's topics.
    timeout
        Seconds for the whole operation.

    Returns
    -------
    list of str
        The topics this call created.

    Raises
    ------
    ValueError
        For a name or partition count real Kafka would refuse; the embedded broker
        accepts them silently, so we check here to behave the same on both.
    """
    for name, partitions in specs.items():
        if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"invalid topic name {name!r}: use 1-249 of [a-zA-Z0-9._-]")
        if partitions < 1:
            raise ValueError(f"topic {name!r} needs at least one partition, not {partitions}")
    if not specs:
        return []
    configs = {k: str(v) for k, v in (config or {}).items()}
    new = [
        NewTopic(
            name, n, replication_factor, topic_configs={**configs, **TOPIC_CONFIGS.get(name, {})}
        )
        for name, n in specs.items()
    ]
    admin = AIOKafkaAdminClient(
        **KafkaConnection.parse(kafka).client_config(), request_timeout_ms=int(timeout * 1000)
    )
    async with asyncio.timeout(timeout):
        await admin.start()
        try:
            # Per-topic errors come back as codes in the response, not as exceptions.
            response = await admin.create_topics(new)
        finally:
            await admin.close()
    created = []
    for name, code, *rest in response.topic_errors:
        if code == 0:
            created.append(name)
        elif for_code(code) is not TopicAlreadyExistsError:
            message = rest[0] if rest else None
            raise for_code(code)(f"cannot create topic {name!r}: {message}")
    return created
