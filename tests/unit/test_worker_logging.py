"""A worker's log level is what libraries log at: at ``warning``, their debug calls
build no record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import faust
import pytest

from rtim.stream.worker import Worker


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize("level", ["warning", "error", "info"])
def test_debug_calls_of_libraries_are_dropped_before_a_record_is_built(
    root_logger: logging.Logger, level: str
) -> None:
    loop = asyncio.new_event_loop()
    try:
        app = faust.App("rtim-log-test", broker="kafka://127.0.0.1:1", autodiscover=False)
        worker = Worker(app, loglevel=level, loop=loop, redirect_stdouts=False, shutdown_timeout=5)
        worker._setup_logging()
    finally:
        loop.close()
    assert root_logger.getEffectiveLevel() == getattr(logging, level.upper())
    for name in ("aiokafka.conn", "aiokafka.consumer.fetcher", "faust", "mode", "rtim"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    assert worker.spinner is None
