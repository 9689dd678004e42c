"""RTIM's Prometheus metrics: one place, ``rtim_`` prefix, base units.

No label ever carries a customer id or any other personal data: labels are
topics, partitions, channels, offers and error reasons only.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import time
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily

from rtim.engine import REKEY_REASONS
from rtim.events import INTERNAL_ERROR, REASONS
from rtim.learn.attribution import JOIN_RESULTS, OUTCOMES, RESPONSE_REASONS
from rtim.learn.learner import LEARN_RESULTS

#: The decision latency objective (event in Kafka -> trigger acknowledged by Kafka);
#: the histogram has a bucket boundary exactly there.
LATENCY_OBJECTIVE_S = 0.1

EVENTS_CONSUMED = Counter("rtim_events_consumed_total", "Clickstream records consumed.", ["topic"])
EVENTS_APPLIED = Counter("rtim_events_applied_total", "Valid events applied to a customer context.")
EVENTS_DUPLICATE = Counter(
    "rtim_events_duplicate_total",
    "Events not applied because already applied (same messageId, or redelivery).",
)
EVENTS_REKEYED = Counter(
    "rtim_events_rekeyed_total",
    "Valid events published again to the clickstream keyed by their customer id, by reason: "
    "key (keyed otherwise) or partition (on another partition than the id's).",
    ["reason"],
)
EVENTS_DEAD_LETTERED = Counter(
    "rtim_events_dead_lettered_total",
    "Records (clickstream events and responses) sent to the dead-letter topic, by reason.",
    ["reason"],
)
TRIGGERS_SENT = Counter(
    "rtim_triggers_total", "Triggers published, by channel and offer.", ["channel", "offer"]
)
DECISIONS_NO_OFFER = Counter(
    "rtim_decisions_no_offer_total",
    "Decision moments where no offer was eligible (the decision was to do nothing).",
)
OFFERS_REJECTED = Counter(
    "rtim_offers_rejected_total",
    "Offers a decision moment considered and did not make, by the kind of reason: "
    "not-valid-now, ineligible, suppressed, cooldown, no-consent, quiet-hours, capped "
    "(rtim/decide/policy.py).",
    ["reason"],
)
DECISIONS = Counter(
    "rtim_decisions_total",
    "Decisions made and recorded on rtim.decisions, by whether an offer was chosen.",
    ["offered"],
)
RESPONSES = Counter(
    "rtim_responses_total",
    "Valid responses consumed, by outcome and join result: joined (to an open decision), "
    "late (after its window, or once it closed), unknown (no such decision of that "
    "customer), duplicate (the same outcome again), early (stamped over a minute before "
    "its decision).",
    ["outcome", "result"],
)
TRAINING_EXAMPLES = Counter(
    "rtim_training_examples_total",
    "Closed decisions written to rtim.training, by label (positive, negative) and why "
    "they closed (conversion, dismissal, window, evicted).",
    ["label", "why"],
)
OPEN_WINDOWS = Gauge(
    "rtim_attribution_open_windows",
    "Customers of this worker's partitions with a decision whose attribution window is open, "
    "about: a decision a response closed early is counted until its window's end.",
)
DECISION_LATENCY = Histogram(
    "rtim_decision_latency_seconds",
    "End to end: clickstream record timestamp to trigger acknowledged by Kafka.",
    buckets=(0.005, 0.01, 0.025, 0.05, LATENCY_OBJECTIVE_S, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_SECONDS = Histogram(
    "rtim_batch_duration_seconds",
    "Time to process one fetched batch: core, persist, publish, acknowledge.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_STAGE_SECONDS = Histogram(
    "rtim_batch_stage_seconds",
    "Time per batch in each stage: core (decisioning), publish (until Kafka acks), store; "
    "fence (the membership checks before and after the publish, counted in publish too).",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_RECORDS = Histogram(
    "rtim_batch_records",
    "Records per processed batch.",
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
RECORDS_REFUSED = Counter(
    "rtim_records_refused_total",
    "Records Kafka refused (too large for the topic, invalid), or over RTIM_MAX_RECORD_BYTES; "
    "their causes are dead-lettered (reason refused).",
)
PUBLISH_RETRIES = Counter(
    "rtim_publish_retries_total", "Batches whose publish to Kafka failed and was retried."
)
BATCHES_FENCED = Counter(
    "rtim_batches_fenced_total",
    "Batches not stored because the group coordinator no longer counted this worker a "
    "member of the generation that fetched them (stage: before_publish, after_publish), "
    "or because another worker's producer fenced this one's (stage: transaction, with "
    "RTIM_PROCESSING_GUARANTEE=exactly_once).",
    ["stage"],
)
CHANGELOG_STALE_RECORDS = Counter(
    "rtim_changelog_stale_records_total",
    "Changelog records skipped by table recovery of a RocksDB store: older than the "
    "context already stored (a late write of a worker that had lost its partitions).",
)
CONSUMER_LAG = Gauge(
    "rtim_consumer_lag_records",
    "Records in the clickstream not yet processed, per partition (from fetch high watermarks).",
    ["topic", "partition"],
)
CONTEXT_CUSTOMERS = Gauge(
    "rtim_context_customers",
    "Customer contexts held by this worker's table (an estimate for RocksDB).",
)
CONTEXT_WRITES = Counter(
    "rtim_context_writes_total", "Customer context versions written (store + changelog)."
)
WORKER_READY = Gauge(
    "rtim_worker_ready", "1 when the worker has its partitions, has recovered and processes."
)
BROKER_UP = Gauge(
    "rtim_broker_up",
    "1 when the worker's probe reaches the Kafka cluster, 0 while it is unreachable.",
)
EXAMPLES_LEARNED = Counter(
    "rtim_examples_learned_total",
    "Training records taken by this worker's learner, by result: learned, duplicate (a "
    "decision learned before), invalid (not a training example; skipped).",
    ["result"],
)
MODEL_SNAPSHOTS_PUBLISHED = Counter(
    "rtim_model_snapshots_published_total",
    "Offer model snapshots this worker's learner published to the models topic.",
)
MODEL_RECORDS_INVALID = Counter(
    "rtim_model_records_invalid_total",
    "Records of the models topic that are neither a model snapshot nor a cursor (skipped).",
)
MODEL_SNAPSHOT_AGE = Gauge(
    "rtim_model_snapshot_age_seconds",
    "Seconds since the newest snapshot of each offer's model this worker decides with was made.",
    ["offer"],
)
MODEL_VERSION = Gauge(
    "rtim_model_version",
    "Examples learned by the newest snapshot of each offer's model this worker decides with.",
    ["offer"],
)
CATALOG_VERSION = Gauge(
    "rtim_catalog_version",
    "Version of the catalog this worker decides with (0: the file it started with).",
)
CATALOG_REJECTED = Counter(
    "rtim_catalog_rejected_total",
    "Records of rtim.offers this worker could not load (the catalog in force stays).",
)
#: Results of the decision API: decided here, answered as before (a request asked again
#: with its request_id), forwarded to the owner, a bad request, not the owner now (503),
#: or failed.
API_RESULTS = ("decided", "repeated", "forwarded", "invalid", "unavailable", "error")
API_REQUESTS = Counter(
    "rtim_api_requests_total",
    "Requests to the decision API (POST /v1/decide, GET /v1/customers/{id}), by result.",
    ["endpoint", "result"],
)
API_SECONDS = Histogram(
    "rtim_api_seconds",
    "Time to answer a decision API request on this worker (forwarding included).",
    ["endpoint"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
API_DECISIONS_HANDED_OVER = Counter(
    "rtim_api_decisions_handed_over_total",
    "Decision requests answered before they were stored (RTIM_API_ANSWER=decided) whose "
    "batch was then not stored (the worker lost their partition): handed over on "
    "rtim.responses to their customers' owner.",
)
API_DECISIONS_ADOPTED = Counter(
    "rtim_api_decisions_adopted_total",
    "Decisions handed over by another worker, by result: adopted (opened, counted as "
    "contacts and recorded here) or duplicate (the context had them already).",
    ["result"],
)
API_DECISIONS_LOST = Counter(
    "rtim_api_decisions_lost_total",
    "Decision requests answered before they were stored whose batch was then not stored, "
    "and that could not be handed over either: not in their customers' contexts, so "
    "neither counted as contacts nor learned (their records may be out).",
)

# A labelled series exists only once its labels are used: a dashboard panel or an alert
# on a reason no event has had yet would show "No data" instead of 0. Every label value
# known in advance is created at 0 here (channels and offers come from the catalog:
# :func:`start_at_zero`).
for _reason in dict.fromkeys((*REASONS, *RESPONSE_REASONS, INTERNAL_ERROR)):
    EVENTS_DEAD_LETTERED.labels(_reason)
for _reason in REKEY_REASONS:
    EVENTS_REKEYED.labels(_reason)
for _outcome in OUTCOMES:
    for _result in JOIN_RESULTS:
        RESPONSES.labels(_outcome, _result)
for _result in LEARN_RESULTS:
    EXAMPLES_LEARNED.labels(_result)
for _result in ("adopted", "duplicate"):
    API_DECISIONS_ADOPTED.labels(_result)
for _endpoint in ("decide", "customer"):
    for _result in API_RESULTS:
        API_REQUESTS.labels(_endpoint, _result)
#: The stages of :data:`BATCH_STAGE_SECONDS`, one child each.
BATCH_STAGES = {
    stage: BATCH_STAGE_SECONDS.labels(stage) for stage in ("core", "publish", "store", "fence")
}


def start_at_zero(topic: str, channel_offers: Iterable[tuple[str, str]]) -> None:
    """Create the series a worker will count into, at 0: its input topic and every
    (channel, offer) pair its catalog can trigger."""
    EVENTS_CONSUMED.labels(topic)
    for offered in ("yes", "no"):
        DECISIONS.labels(offered)
    for stage in ("before_publish", "after_publish", "transaction"):
        BATCHES_FENCED.labels(stage)
    for channel, offer in channel_offers:
        TRIGGERS_SENT.labels(channel, offer)


class GcPauses:
    """``rtim_gc_pause_seconds{generation}``: pauses of Python's cyclic garbage
    collector (every thread stops), as a histogram.

    The collector's callback only adds to plain lists: it may run inside any
    allocation, including one made while a prometheus_client metric holds its
    (non-reentrant) lock, so it must take no lock itself. The histogram is
    built when scraped.
    """

    name = "rtim_gc_pause_seconds"
    documentation = (
        "Pauses of Python's cyclic garbage collector (every thread stops), by generation."
    )
    buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
    generations = (0, 1, 2)

    def __init__(self) -> None:
        self._started = 0.0
        # Per generation: a count per bucket (not cumulative; the last is +Inf), and the sum.
        self._counts = [[0] * (len(self.buckets) + 1) for _ in self.generations]
        self._sums = [0.0 for _ in self.generations]

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` entry."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self._counts[generation][bisect.bisect_left(self.buckets, pause)] += 1
        self._sums[generation] += pause

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["generation"])
        bounds = [*(repr(b) for b in self.buckets), "+Inf"]
        for generation in self.generations:
            cumulative = list(itertools.accumulate(self._counts[generation]))
            family.add_metric(
                [str(generation)],
                list(zip(bounds, cumulative, strict=True)),
                sum_value=self._sums[generation],
            )
        yield family


GC_PAUSES = GcPauses()
REGISTRY.register(GC_PAUSES)


def observe_gc_pauses() -> None:
    """Time every collection of the cyclic garbage collector into ``rtim_gc_pause_seconds``."""
    if GC_PAUSES.on_gc not in gc.callbacks:
        gc.callbacks.append(GC_PAUSES.on_gc)


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
