"""RTIM settings: every setting defined once, with its type, default and doc.

Each field is read from the environment variable ``RTIM_<NAME>`` (for example
``RTIM_BROKER``). ``rtim worker --help`` and the README list the same fields.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rtim.errors import ConfigError

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
    web_port: int = Field(
        6066, ge=0, le=65535, description="Port of /metrics, /health/live, /health/ready."
    )
    web_host: str = Field("0.0.0.0", description="Interface the web server binds to.")
    web_canonical_url: str = Field(
        "",
        description="URL other workers reach this worker's web server at (the decision API "
        "forwards a request to the worker that owns its customer); empty: "
        "http://<RTIM_WEB_HOST, or the host name if it is 0.0.0.0>:<RTIM_WEB_PORT>.",
    )
    api_answer: Literal["decided", "stored"] = Field(
        "decided",
        description="When the decision API answers: 'decided' (at once; the decision record "
        "and the customer's changed context go out with the worker's next batch, "
        "milliseconds later: a worker that loses the customer's partition in between hands "
        "the decision over to the new owner, one that dies forgets it) or 'stored' (once "
        "they are in Kafka and the store: a whole batch later, tens of milliseconds under "
        "load).",
    )
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
        gt=0,
        allow_inf_nan=False,
        le=31_536_000,
        description="Events stamped further than this in the future are dead-lettered "
        "(clock_skew); a decision request stamped further off the clock, either way, is "
        "refused.",
    )
    trigger_ttl_s: float = Field(
        900.0,
        gt=0,
        allow_inf_nan=False,
        le=31_536_000,
        description="How long a published trigger stays valid (CloudEvent expiry).",
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
        10.0,
        ge=1,
        allow_inf_nan=False,
        le=3600,
        description="Consumer group session timeout (how fast a dead worker is noticed).",
    )
    stall_error_s: float = Field(
        300.0,
        gt=0,
        allow_inf_nan=False,
        le=86_400,
        description="A partition fetched but not processed for this long is logged as an "
        "error (Faust's stream_processing_timeout).",
    )
    replication_factor: int = Field(
        1,
        ge=1,
        description="Replication factor of the topics RTIM creates, its table changelogs "
        "included (3 on a production cluster).",
    )
    max_record_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="Largest record the worker publishes (key, value and headers); a larger "
        "one is not sent and its cause is dead-lettered (refused), as when Kafka refuses a "
        "record. Keep it under the smallest max.message.bytes of RTIM's output topics and "
        "above the context ceiling (64 KiB).",
    )
    dedupe_window_s: float = Field(
        86_400.0,
        gt=0,
        description="A messageId is never applied twice within this much of its customer's "
        "event time; older repeats are dead-lettered (too_old). At most 1024 ids per customer.",
    )
    attribution_window_s: float = Field(
        86_400.0,
        gt=0,
        description="How long after a decision (event time) a conversion is credited to it, "
        "for offers whose catalog entry sets no attribution_window; a decision whose window "
        "ends without one is a negative example.",
    )
    idle_close_s: float = Field(
        60.0,
        gt=0,
        description="A partition that receives nothing for this long (wall-clock time) has "
        "its stream time moved on with the wall clock, so that attribution windows still "
        "close when traffic stops.",
    )
    model_snapshot_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often a worker publishes the snapshots of the offer models it "
        "learned since (they reach every worker's decisions through rtim.models).",
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="'at_least_once', or 'exactly_once' on a broker with transactions (Kafka, "
        "Redpanda): each batch's outputs and input offsets committed in Kafka transactions, "
        "the changelog read committed only. The worker refuses to start if the broker has "
        "no transactions.",
    )
    shutdown_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Longest a stopping worker waits for Kafka (last commit, leaving the "
        "group) before it exits with code 1; keep it under the orchestrator's grace period.",
    )

    @property
    def canonical_url(self) -> str:
        """The URL other workers reach this one at (``RTIM_WEB_CANONICAL_URL``)."""
        if self.web_canonical_url:
            return self.web_canonical_url.rstrip("/")
        host = self.web_host if self.web_host not in ("0.0.0.0", "::", "") else socket.gethostname()
        return f"http://{host}:{self.web_port}"

    @field_validator("web_canonical_url")
    @classmethod
    def _a_url(cls, value: str) -> str:
        """Empty, or an http(s) URL other workers can reach (scheme, host, no path)."""
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
            if parts.path.strip("/") or parts.query or parts.fragment:
                raise ValueError("must be the worker's root URL (no path, query or fragment)")
            try:
                parts.port  # noqa: B018 -- a port out of range raises here
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def kafka(self) -> KafkaConnection:
        """How every client of this worker connects to Kafka."""
        return KafkaConnection.parse(self.broker)


#: The default of every setting, whatever ``RTIM_*`` the environment sets; the
#: core's parameters default to these (so each default is written once, above).
DEFAULTS: Settings = Settings.model_construct()


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """How RTIM's Kafka clients connect: the one place for connection settings.

    Every client (the Faust app, the publisher, the end-offset probe, topic
    creation, the simulator, the bench, the CLI) is configured from
    :meth:`client_config` or, for Faust, :meth:`faust_config`. Security settings
    (``security_protocol``, SASL, SSL) become fields here, set from new
    :class:`Settings` fields in :meth:`Settings.kafka`, and entries of those two
    methods (aiokafka keyword arguments; Faust's ``broker_credentials``).

    >>> KafkaConnection.parse("k1:9092, k2:9092").client_config()
    {'bootstrap_servers': ['k1:9092', 'k2:9092']}
    """

    bootstrap_servers: tuple[str, ...]

    @classmethod
    def parse(cls, servers: str | KafkaConnection) -> KafkaConnection:
        """From ``host:port[,host:port]`` (an existing connection is returned as it is)."""
        if isinstance(servers, KafkaConnection):
            return servers
        found = tuple(s.strip() for s in servers.split(",") if s.strip())
        if not found:
            raise ConfigError(f"RTIM_BROKER={servers!r}: no bootstrap server (host:port)")
        for server in found:
            host, colon, port = server.rpartition(":")
            if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(
                    f"RTIM_BROKER={servers!r}: {server!r} is not host:port (a port 1-65535)"
                )
        return cls(found)

    def __str__(self) -> str:
        return ",".join(self.bootstrap_servers)

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments for every aiokafka client (producer, consumer, admin)."""
        return {"bootstrap_servers": list(self.bootstrap_servers)}

    def faust_config(self) -> dict[str, Any]:
        """Faust app settings for the same connection."""
        return {"broker": [f"kafka://{server}" for server in self.bootstrap_servers]}


def env_name(field: str) -> str:
    """The environment variable of a setting (``partitions`` -> ``RTIM_PARTITIONS``)."""
    return f"RTIM_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from ``RTIM_*`` (``overrides`` win, e.g. command-line options).

    An invalid value raises :class:`ConfigError` naming the variable, the value
    and what is expected:

    >>> try:
    ...     load_settings(partitions="four")
    ... except ConfigError as exc:
    ...     print(exc)
    RTIM_PARTITIONS='four': Input should be a valid integer, unable to parse string as an integer
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            value = overrides[field] if field in overrides else error.get("input")
            problems.append(f"{env_name(field)}={value!r}: {error['msg']}")
        raise ConfigError("; ".join(problems)) from None
    settings.kafka  # noqa: B018 -- RTIM_BROKER's form, checked with the rest (ConfigError)
    return settings


def describe() -> list[tuple[str, str, str]]:
    """Return (env name, default, doc) for every setting, for help texts and the README."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        rows.append((env_name(name), str(default), field.description or ""))
    return rows
