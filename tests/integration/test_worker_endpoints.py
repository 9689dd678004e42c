"""A fresh worker, before any event: its probes answer, and every series that a dashboard
panel or an alert reads is already there at 0 (a panel shows 0, not "No data")."""

from __future__ import annotations

from rtim.events import INTERNAL_ERROR, REASONS
from rtim.learn.learner import LEARN_RESULTS
from rtim.names import CLICKSTREAM_TOPIC
from rtim.offers.catalog import load_catalog

from .support import TEST_CATALOG


def test_a_fresh_worker_answers_its_probes_and_counts_from_zero(workers) -> None:
    worker = workers().wait_ready()
    assert worker.status("/health/live") == 200
    assert worker.status("/health/ready") == 200
    samples = worker.metrics()  # /metrics, parsed as Prometheus parses it
    assert samples["rtim_worker_ready"] == 1
    for reason in (*REASONS, INTERNAL_ERROR):
        assert samples.get(f'rtim_events_dead_lettered_total{{reason="{reason}"}}') == 0, reason
    for stage in ("core", "publish", "store"):
        assert samples.get(f'rtim_batch_stage_seconds_count{{stage="{stage}"}}') == 0, stage
    assert samples.get(f'rtim_events_consumed_total{{topic="{CLICKSTREAM_TOPIC}"}}') == 0
    for result in LEARN_RESULTS:
        assert samples.get(f'rtim_examples_learned_total{{result="{result}"}}') == 0, result
    assert samples.get("rtim_model_snapshots_published_total") == 0
    assert samples.get("rtim_model_records_invalid_total") == 0
    assert worker.status("/v1/models") == 200
    for offer in load_catalog(TEST_CATALOG).offers:
        for channel in offer.channels:
            series = f'rtim_triggers_total{{channel="{channel}",offer="{offer.id}"}}'
            assert samples.get(series) == 0, series
