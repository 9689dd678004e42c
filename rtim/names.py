"""Names the core and the Kafka shell share: topics and channels, each defined here only.

Plain constants (no Kafka in here): the core names the trigger topic of a
channel, the shell creates and subscribes to the topics, the catalog checks
offer channels, the parser derives event channels.
"""

from __future__ import annotations

#: The Segment clickstream RTIM consumes.
CLICKSTREAM_TOPIC = "rtim.clickstream"
#: Dead letters: records RTIM could not use, with the reason in their headers.
DLQ_TOPIC = "rtim.dlq"
#: Triggers go to ``rtim.triggers.<channel>``, one topic per offer channel.
TRIGGER_TOPIC_PREFIX = "rtim.triggers."
#: Decision records: every decision, its candidates and what it was scored on (by customer).
DECISIONS_TOPIC = "rtim.decisions"
#: Channel systems' responses to decisions (by customer; co-partitioned with the clickstream).
RESPONSES_TOPIC = "rtim.responses"
#: The header of a decision record handed over on ``rtim.responses`` by a worker that
#: answered a decision request but could not store it, for the customer's owner to adopt.
HANDOVER_HEADER = "rtim.handover"
#: Closed decisions to learn from, keyed by offer id (:mod:`rtim.learn.attribution`).
TRAINING_TOPIC = "rtim.training"
#: Model snapshots, keyed by offer id (compacted where the broker compacts).
MODELS_TOPIC = "rtim.models"
#: The live catalog: its versions under one key (compacted), read by every worker.
OFFERS_TOPIC = "rtim.offers"
#: The Faust table of customer contexts.
CONTEXT_TABLE = "customers"

#: Channels an offer can be delivered on (each has a trigger topic).
OFFER_CHANNELS: frozenset[str] = frozenset(
    {"web", "app", "email", "sms", "push", "call_centre", "store"}
)
#: Every channel an event can come from: the offer channels, and sources no offer goes to.
EVENT_CHANNELS: frozenset[str] = OFFER_CHANNELS | {"service", "server"}


def trigger_topic(channel: str) -> str:
    """The topic of a channel's triggers.

    >>> trigger_topic("email")
    'rtim.triggers.email'
    """
    return TRIGGER_TOPIC_PREFIX + channel


def changelog_topic(app_id: str) -> str:
    """The changelog topic of the context table (Faust names it after the app id).

    >>> changelog_topic("rtim")
    'rtim-customers-changelog'
    """
    return f"{app_id}-{CONTEXT_TABLE}-changelog"
