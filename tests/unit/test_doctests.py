"""The docstring examples of the core modules run and pass.

rtim.events.segment and rtim.events.deadletter have theirs checked in
test_segment.py and test_deadletter.py; this covers the rest of the pure core.
"""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    ("module", "at_least"),
    [("rtim.conditions", 3), ("rtim.decide.scoring", 5), ("rtim.engine", 5)],
)
def test_docstring_examples_run(module: str, at_least: int) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted >= at_least
    assert result.failed == 0
