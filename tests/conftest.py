"""Shared fixtures: one embedded broker per test session, unique topic names."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator

import pytest

from rtim.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A started embedded broker shared by the session; always stopped at the end.

    Its state is shared too, so tests must use their own topics (see ``topic_name``).
    The log is kept under pytest's temp dir for post-mortems.
    """
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as started:
        yield started


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> Callable[..., str]:
    """Factory for topic names unique across the session, readable in broker logs.

    ``topic_name()`` -> ``"test_foo-1a2b3c4d"``; ``topic_name("changelog")`` ->
    ``"test_foo-changelog-5e6f7a8b"``.
    """
    # Kafka allows [a-zA-Z0-9._-] and at most 249 characters.
    test = re.sub(r"[^a-zA-Z0-9._-]+", "_", request.node.name)[:80]

    def make(suffix: str = "") -> str:
        parts = [test, suffix, uuid.uuid4().hex[:8]]
        return "-".join(p for p in parts if p)

    return make
