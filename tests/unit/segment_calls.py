"""Segment calls as SDKs send them, shared by the core's unit tests."""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from rtim.events import Event, parse_event

_ids = itertools.count()


def segment_call(
    kind: str,
    name: str | None = None,
    *,
    ts: int,
    user: str = "u-1",
    message_id: str | None = None,
    id_prefix: str = "m",
    anonymous_id: str | None = None,
    properties: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    traits: dict[str, Any] | None = None,
    channel: str | None = None,
) -> dict[str, Any]:
    """One call as a dict; ``name`` is ``event`` for track, ``name`` for page and screen."""
    obj: dict[str, Any] = {
        "type": kind,
        "messageId": message_id or f"{id_prefix}-{next(_ids):08d}",
        "userId": user,
        "timestamp": ts,
    }
    if anonymous_id is not None:
        obj["anonymousId"] = anonymous_id
    if context is not None:
        obj["context"] = context
    if properties is not None:
        obj["properties"] = properties
    if channel is not None:
        obj["channel"] = channel
    if traits is not None:
        obj["traits"] = traits
    if kind == "track":
        obj["event"] = name
    elif name is not None:
        obj["name"] = name
    return obj


def parsed(obj: dict[str, Any]) -> Event:
    """The call through the real parser, at its own timestamp."""
    return parse_event(orjson.dumps(obj), now_ms=obj["timestamp"])
