"""RTIM settings: every setting defined once, with its type, default and doc.

Each field is read from the environment variable ``RTIM_<NAME>`` (for example
``RTIM_BROKER``). ``rtim worker --help`` and the README list the same fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CATALOG = Path(__file__).parent / "data" / "catalog.yaml"


class Settings(BaseSettings):
    """Worker configuration, from ``RTIM_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="RTIM_", extra="ignore")

    broker: str = Field(
        "127.0.0.1:9092",
        description="Kafka bootstrap servers, comma separated (host:port[,host:port]).",
    )
    app_id: str = Field(
        "rtim",
        description="Consumer group id and prefix of the table changelog topics.",
    )
    web_port: int = Field(6066, description="Port of /metrics, /health/live, /health/ready.")
    web_host: str = Field("0.0.0.0", description="Interface the web server binds to.")
    datadir: Path = Field(
        Path("rtim-data"), description="Directory of the worker's table stores (RocksDB)."
    )
    store: Literal["rocksdb", "memory"] = Field(
        "rocksdb",
        description="Context table store: 'rocksdb' (durable on disk) or 'memory' "
        "(rebuilt from the changelog at every start).",
    )
    catalog: Path = Field(DEFAULT_CATALOG, description="Offers and trigger rules (YAML).")
    partitions: int = Field(
        4, ge=1, description="Partitions of the topics RTIM creates (clickstream, tables)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Worker log level."
    )
    max_event_bytes: int = Field(
        32_768, ge=256, description="Events larger than this are dead-lettered as oversize."
    )
    max_future_skew_s: float = Field(
        3600.0,
        description="Events stamped further than this in the future are dead-lettered "
        "(clock_skew).",
    )
    trigger_ttl_s: float = Field(
        900.0, description="How long a published trigger stays valid (CloudEvent expiry)."
    )
    max_fetch_records: int = Field(
        10_000, ge=1, description="Records fetched per poll; one poll is one core batch."
    )
    fetch_max_wait_ms: int = Field(
        25,
        ge=0,
        description="Longest a fetch waits for data at the broker; bounds idle latency.",
    )
    commit_interval_s: float = Field(1.0, gt=0, description="Offset commit interval.")
    cache_customers: int = Field(
        200_000, ge=1000, description="Decoded customer contexts kept in memory per worker."
    )
    session_timeout_s: float = Field(
        10.0, description="Consumer group session timeout (how fast a dead worker is noticed)."
    )
    shutdown_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Longest a stopping worker waits for Kafka (last commit, leaving the "
        "group) before it exits with code 1; keep it under the orchestrator's grace period.",
    )

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.broker.split(",") if s.strip()]


def describe() -> list[tuple[str, str, str]]:
    """Return (env name, default, doc) for every setting, for help texts and the README."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        rows.append((f"RTIM_{name.upper()}", str(default), field.description or ""))
    return rows
