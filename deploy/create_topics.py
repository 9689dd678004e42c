"""Create RTIM's Kafka topics from topics/topics.yaml, with their configs. Idempotent.

``rtim worker`` creates missing topics itself, but with the broker's default configs
and a replication factor of 1. Run this first so that they get the retention, the
cleanup policy (a compacted changelog) and the replication that topics.yaml sets.
Topics that already exist are left as they are, and reported.

Usage::

    python deploy/create_topics.py --replication-factor 3        # RTIM_* env for the rest
    python deploy/create_topics.py --bootstrap localhost:9092 --dry-run

The broker, the partition count and the app id default to RTIM_BROKER, RTIM_PARTITIONS
and RTIM_APP_ID, read by the worker's own Settings, so the topics match the workers; the
replication factor to RTIM_REPLICATION_FACTOR if it is set, else to topics.yaml's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TOPICS = Path(__file__).resolve().parent.parent / "topics" / "topics.yaml"


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    configs: dict[str, str]


def plan(
    doc: dict[str, Any], *, partitions: int, app_id: str, replication_factor: int
) -> list[TopicPlan]:
    """The topics to create: names for this app id, counts for this RTIM_PARTITIONS."""
    defaults = doc.get("defaults", {})
    plans = []
    for topic in doc["topics"]:
        template = topic.get("name_template")
        name = template.format(app_id=app_id) if template else topic["name"]
        if topic.get("partitions_setting") == "RTIM_PARTITIONS":
            count = partitions
        else:
            count = int(topic["partitions"])
        configs = {k: str(v) for k, v in defaults.get("configs", {}).items()}
        configs.update({k: str(v) for k, v in topic.get("configs", {}).items()})
        # min.insync.replicas above the replication factor makes every acks=all write
        # fail (NOT_ENOUGH_REPLICAS), e.g. on a single-broker development cluster.
        if "min.insync.replicas" in configs:
            configs["min.insync.replicas"] = str(
                min(int(configs["min.insync.replicas"]), replication_factor)
            )
        plans.append(TopicPlan(name, count, configs))
    return plans


async def create(bootstrap: str, plans: list[TopicPlan], replication_factor: int) -> None:
    from rtim.stream.topics import create_topics  # checks names and counts the way Kafka does

    for p in plans:
        created = await create_topics(
            bootstrap,
            {p.name: p.partitions},
            config=p.configs,
            replication_factor=replication_factor,
        )
        print(f"{'created' if created else 'exists '} {p.name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from rtim.settings import Settings

    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topics", type=Path, default=DEFAULT_TOPICS)
    parser.add_argument("--bootstrap", default=settings.broker)
    parser.add_argument("--partitions", type=int, default=settings.partitions)
    parser.add_argument("--app-id", default=settings.app_id)
    parser.add_argument(
        "--replication-factor",
        type=int,
        default=None,
        help="default: RTIM_REPLICATION_FACTOR, else topics.yaml defaults.replication_factor",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)

    doc = yaml.safe_load(args.topics.read_text(encoding="utf-8"))
    rf = args.replication_factor
    if rf is None and "replication_factor" in settings.model_fields_set:
        rf = settings.replication_factor
    rf = rf or int(doc.get("defaults", {}).get("replication_factor", 1))
    plans = plan(doc, partitions=args.partitions, app_id=args.app_id, replication_factor=rf)
    for p in plans:
        configs = ", ".join(f"{k}={v}" for k, v in sorted(p.configs.items()))
        print(f"{p.name}: {p.partitions} partitions x {rf} replicas; {configs}")
    if not args.dry_run:
        asyncio.run(create(args.bootstrap, plans, rf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
