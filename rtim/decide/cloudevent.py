"""Triggers out as CloudEvents 1.0, structured JSON mode (one JSON object per message)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from rtim.decide.arbitrate import Decision

TRIGGER_TYPE = "dev.rtim.trigger.v1"
CONTENT_TYPE = b"application/cloudevents+json; charset=UTF-8"


def iso_ms(epoch_ms: int) -> str:
    """RFC 3339 UTC time with milliseconds, as CloudEvents' ``time`` wants it.

    >>> iso_ms(1_764_064_800_123)
    '2025-11-25T10:00:00.123Z'
    """
    done = _ms_text.get(epoch_ms)
    if done is not None:
        # A trigger's time and expiry are the batch's (the same for all its triggers),
        # and a decision's record and trigger both give its event's time.
        return done
    if len(_ms_text) >= _SECONDS_CACHED:
        _ms_text.clear()
    seconds, millis = divmod(int(epoch_ms), 1000)
    text = _seconds_text.get(seconds)
    if text is None:
        # A trigger formats three times (now, expiry, its event's time), and a
        # batch's triggers share the first two: each second is formatted once.
        if len(_seconds_text) >= _SECONDS_CACHED:
            _seconds_text.clear()
        # Events' seconds are seldom seen twice, their days often: the day is
        # formatted once, the time of day by arithmetic (UTC days are 86,400 s).
        day, of_day = divmod(seconds, 86_400)
        date = _day_text.get(day)
        if date is None:
            if len(_day_text) >= _SECONDS_CACHED:
                _day_text.clear()
            date = _day_text[day] = time.strftime("%Y-%m-%dT", time.gmtime(day * 86_400))
        hours, of_hour = divmod(of_day, 3600)
        text = _seconds_text[seconds] = f"{date}{hours:02d}:{of_hour // 60:02d}:{of_hour % 60:02d}"
    done = _ms_text[epoch_ms] = f"{text}.{millis:03d}Z"
    return done


_SECONDS_CACHED = 4096
_ms_text: dict[int, str] = {}
_seconds_text: dict[int, str] = {}
_day_text: dict[int, str] = {}


def trigger_event(decision: Decision, *, source: str) -> dict[str, Any]:
    """The CloudEvent (as a dict) for a decision; ``expiry`` is an extension attribute."""
    offer = decision.offer
    if offer is None:
        raise ValueError("a decision of no offer has no trigger")
    event = decision.event
    expiry = iso_ms(decision.expires_ms)
    return {
        "specversion": "1.0",
        "id": decision.decision_id,
        "source": source,
        "type": TRIGGER_TYPE,
        "subject": decision.customer_id,
        "time": iso_ms(decision.decided_ms),
        "datacontenttype": "application/json",
        "expiry": expiry,
        "partitionkey": decision.customer_id,
        "data": {
            "decision_id": decision.decision_id,
            "customer_id": decision.customer_id,
            "channel": decision.channel,
            "offer": {
                "id": offer.id,
                "name": offer.name,
                "value": offer.value,
                "creative": offer.creative,
            },
            "score": decision.score,
            "propensity": decision.propensity,
            "trigger": decision.trigger.id,
            "reasons": decision.reasons,
            "top_features": decision.features,
            "candidates": decision.candidates,
            "expires_at": expiry,
            "event": {
                "message_id": event.message_id,
                "type": event.type,
                "name": event.name,
                "channel": event.channel,
                "timestamp": iso_ms(event.timestamp_ms),
            },
            "context": decision.snapshot,
        },
    }


def encode_trigger(decision: Decision, *, source: str) -> bytes:
    return orjson.dumps(trigger_event(decision, source=source))
