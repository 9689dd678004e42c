"""Clickstream events: Segment-spec parsing and validation, dead letters."""

from __future__ import annotations

from rtim.events.deadletter import (
    INTERNAL_ERROR,
    MAX_MESSAGE_BYTES,
    DeadLetter,
    dead_letter,
    dead_letter_headers,
    error_reason,
)
from rtim.events.segment import (
    CHANNELS,
    EVENT_TYPES,
    REASONS,
    Event,
    InvalidEvent,
    customer_key,
    derive_channel,
    parse_event,
)

__all__ = [
    "CHANNELS",
    "EVENT_TYPES",
    "INTERNAL_ERROR",
    "MAX_MESSAGE_BYTES",
    "REASONS",
    "DeadLetter",
    "Event",
    "InvalidEvent",
    "customer_key",
    "dead_letter",
    "dead_letter_headers",
    "derive_channel",
    "error_reason",
    "parse_event",
]
