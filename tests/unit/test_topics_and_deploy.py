"""topics/ and deploy/ must agree with the code.

These tests fail when a topic, channel, setting, metric, label or payload field changes
in rtim/ without the same change in the topic definitions (topics/topics.yaml,
topics/asyncapi.yaml), the JSON schemas (topics/schemas/), or the deployment files
(deploy/: compose, Prometheus rules, Grafana dashboard, Kubernetes manifests).
The payload tests validate real data: simulated events, and contexts and triggers
produced by the engine.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import orjson
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import rtim.engine
from rtim import metrics
from rtim.context import model as context_model
from rtim.decide.cloudevent import CONTENT_TYPE, TRIGGER_TYPE, trigger_event
from rtim.engine import Engine, Record
from rtim.events.deadletter import INTERNAL_ERROR
from rtim.events.segment import (
    EVENT_TYPES,
    MAX_CUSTOMER_ID_CHARS,
    REASONS,
    InvalidEvent,
    customer_key,
    parse_event,
)
from rtim.names import (
    CLICKSTREAM_TOPIC,
    CONTEXT_TABLE,
    DLQ_TOPIC,
    EVENT_CHANNELS,
    OFFER_CHANNELS,
    OFFERS_TOPIC,
    TRIGGER_TOPIC_PREFIX,
)
from rtim.offers.catalog import load_catalog
from rtim.settings import DEFAULT_CATALOG, Settings
from rtim.simulate import JourneySimulator
from rtim.stream.topics import topic_specs

ROOT = Path(__file__).resolve().parents[2]
TOPICS = ROOT / "topics"
SCHEMAS = TOPICS / "schemas"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

DEFAULTS = Settings.model_construct()  # the defaults, whatever RTIM_* the environment sets
SETTING_ENV_NAMES = {f"RTIM_{name.upper()}" for name in Settings.model_fields}


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_json(SCHEMAS / name))


def errors(name: str, instance: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(name).iter_errors(instance)]


def changelog_topic(app_id: str) -> str:
    """The changelog name Faust gives the context table (it is not a constant in rtim)."""
    import faust

    return faust.App(app_id).Table(CONTEXT_TABLE)._changelog_topic_name()


def code_topics() -> set[str]:
    """Every topic the code reads or writes with the default settings and catalog."""
    channels = load_catalog(DEFAULT_CATALOG).channels
    topics = {CLICKSTREAM_TOPIC, DLQ_TOPIC, changelog_topic(DEFAULTS.app_id)}
    topics |= {TRIGGER_TOPIC_PREFIX + c for c in channels}
    # and everything the worker creates at start-up
    topics |= set(topic_specs(DEFAULTS))
    return topics


@pytest.fixture(scope="module")
def topics_doc() -> dict[str, Any]:
    return load_yaml(TOPICS / "topics.yaml")


@pytest.fixture(scope="module")
def topics_by_name(topics_doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in topics_doc["topics"]}


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    return load_yaml(TOPICS / "asyncapi.yaml")


def local_ref(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def asyncapi_topics(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Topic name -> AsyncAPI channel, expanding parameterised addresses ({channel})."""
    out = {}
    for channel in doc["channels"].values():
        address = channel["address"]
        params = re.findall(r"\{(\w+)\}", address)
        if not params:
            out[address] = channel
            continue
        assert len(params) == 1, address
        param = channel["parameters"][params[0]]
        if "$ref" in param:
            param = local_ref(doc, param["$ref"])
        for value in param["enum"]:
            out[address.replace("{" + params[0] + "}", value)] = channel
    return out


# --------------------------------------------------------------------------- YAML / JSON


def all_files(*suffixes: str) -> list[Path]:
    return sorted(p for d in (TOPICS, DEPLOY) for p in d.rglob("*") if p.suffix in suffixes)


def test_every_yaml_file_parses() -> None:
    files = all_files(".yaml", ".yml")
    assert len(files) >= 10, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document is a mapping"


def test_every_json_file_parses() -> None:
    files = all_files(".json")
    assert {p.name for p in files} >= {
        "segment-event.schema.json",
        "trigger.cloudevent.schema.json",
        "customer-context.schema.json",
        "rtim.json",
    }
    for path in files:
        assert isinstance(load_json(path), dict), path


# --------------------------------------------------------------------------- topics


def test_code_topics_are_in_topics_yaml(topics_by_name: dict[str, Any]) -> None:
    missing = code_topics() - set(topics_by_name)
    assert not missing, f"topics the code uses but topics/topics.yaml lacks: {sorted(missing)}"


def test_code_topics_are_in_asyncapi(asyncapi: dict[str, Any]) -> None:
    missing = code_topics() - set(asyncapi_topics(asyncapi))
    assert not missing, f"topics the code uses but topics/asyncapi.yaml lacks: {sorted(missing)}"


def test_every_possible_trigger_channel_has_a_topic(
    topics_by_name: dict[str, Any], asyncapi: dict[str, Any]
) -> None:
    # A catalog may use any channel the catalog parser accepts, not only the sample's.
    wanted = {TRIGGER_TOPIC_PREFIX + c for c in OFFER_CHANNELS}
    assert wanted <= set(topics_by_name)
    assert wanted <= set(asyncapi_topics(asyncapi))
    listed = {t["channel"] for t in topics_by_name.values() if "channel" in t}
    assert listed == set(OFFER_CHANNELS)


def test_topics_yaml_entries_are_complete(topics_by_name: dict[str, Any]) -> None:
    for name, topic in topics_by_name.items():
        assert isinstance(topic["partitions"], int) and topic["partitions"] >= 1, name
        configs = topic["configs"]
        assert configs["cleanup.policy"] in {"delete", "compact", "compact,delete"}, name
        assert int(configs["retention.ms"]) >= -1, name
        assert topic["key"]["description"], name
        assert topic["value"]["description"], name
        schema = topic["value"].get("schema")
        if schema is not None:
            assert (TOPICS / schema).is_file(), f"{name}: {schema} does not exist"


def test_co_partitioned_topics_follow_rtim_partitions(topics_by_name: dict[str, Any]) -> None:
    changelog = changelog_topic(DEFAULTS.app_id)
    for name in (CLICKSTREAM_TOPIC, changelog):
        topic = topics_by_name[name]
        assert topic["partitions"] == DEFAULTS.partitions, name
        assert topic["partitions_setting"] == "RTIM_PARTITIONS", name
    assert changelog in topics_by_name[CLICKSTREAM_TOPIC]["co_partitioned_with"]
    assert CLICKSTREAM_TOPIC in topics_by_name[changelog]["co_partitioned_with"]
    # Every topic the worker creates gets RTIM_PARTITIONS partitions, but for rtim.offers
    # (one partition: one order of catalog versions).
    for name, partitions in topic_specs(DEFAULTS).items():
        assert topics_by_name[name]["partitions"] == partitions, name
        setting = topics_by_name[name].get("partitions_setting")
        assert setting == ("RTIM_PARTITIONS" if name != OFFERS_TOPIC else None), name


def test_changelog_is_compacted_and_named_after_the_app_id(topics_by_name: dict[str, Any]) -> None:
    topic = topics_by_name[changelog_topic(DEFAULTS.app_id)]
    assert topic["configs"]["cleanup.policy"] == "compact"
    assert topic["name_template"].format(app_id="shop") == changelog_topic("shop")


def test_topics_yaml_and_asyncapi_agree(
    topics_doc: dict[str, Any], topics_by_name: dict[str, Any], asyncapi: dict[str, Any]
) -> None:
    documented = asyncapi_topics(asyncapi)
    public = {n for n, t in topics_by_name.items() if t["role"] != "internal"}
    assert set(documented) == public
    for name, channel in documented.items():
        topic = topics_by_name[name]
        binding = channel["bindings"]["kafka"]
        assert binding["partitions"] == topic["partitions"], name
        assert binding["replicas"] == topics_doc["defaults"]["replication_factor"], name
        config = binding["topicConfiguration"]
        assert config["cleanup.policy"] == topic["configs"]["cleanup.policy"].split(","), name
        if "retention.ms" in config:
            assert config["retention.ms"] == int(topic["configs"]["retention.ms"]), name


def test_asyncapi_document(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    channels = asyncapi["channels"]
    for op_id, op in asyncapi["operations"].items():
        assert op["action"] in {"send", "receive"}, op_id
        channel_ref = op["channel"]["$ref"]
        assert channel_ref.removeprefix("#/channels/") in channels, op_id
        for message in op["messages"]:
            local_ref(asyncapi, message["$ref"])  # resolves
    # RTIM consumes the clickstream as the RTIM_APP_ID group and sends the rest.
    actions = {
        (local_ref(asyncapi, op["channel"]["$ref"])["address"], op["action"])
        for op in asyncapi["operations"].values()
    }
    assert (CLICKSTREAM_TOPIC, "receive") in actions
    assert (DLQ_TOPIC, "send") in actions
    assert (TRIGGER_TOPIC_PREFIX + "{channel}", "send") in actions
    group = asyncapi["operations"]["consumeClickstream"]["bindings"]["kafka"]["groupId"]
    assert group["enum"] == [DEFAULTS.app_id]
    for name, message in asyncapi["components"]["messages"].items():
        assert "key" in message["bindings"]["kafka"], f"{name}: Kafka key not described"
        payload = message["payload"]
        if "schema" in payload:
            ref = payload["schema"]["$ref"]
            assert (TOPICS / ref).is_file(), f"{name}: {ref} does not exist"
            assert payload["schemaFormat"].endswith("draft-2020-12")
            assert load_json(TOPICS / ref)["$schema"].endswith("/draft/2020-12/schema")


def test_dead_letter_headers_match_the_code(
    topics_by_name: dict[str, Any], asyncapi: dict[str, Any]
) -> None:
    from rtim.events.deadletter import dead_letter_headers
    from rtim.learn.attribution import RESPONSE_REASONS

    names = [k for k, _ in dead_letter_headers(topic="t", partition=0, offset=0, exc=KeyError())]
    assert topics_by_name[DLQ_TOPIC]["headers"]["names"] == names
    headers = asyncapi["components"]["messages"]["DeadLetter"]["headers"]
    assert headers["required"] == names
    reasons = headers["properties"]["rtim.errors.reason"]["enum"]
    response_only = [r for r in RESPONSE_REASONS if r not in REASONS]
    assert response_only == ["missing_field", "unknown_outcome"]
    assert reasons == [*REASONS, *response_only, INTERNAL_ERROR]


def test_trigger_headers_match_the_code(
    topics_by_name: dict[str, Any], asyncapi: dict[str, Any], engine_run: dict[str, Any]
) -> None:
    content_type = CONTENT_TYPE.decode()
    trigger_topic = topics_by_name[TRIGGER_TOPIC_PREFIX + "web"]
    assert trigger_topic["value"]["content_type"] == content_type
    message = asyncapi["components"]["messages"]["Trigger"]
    assert message["contentType"] == content_type
    assert message["headers"]["properties"]["content-type"]["const"] == content_type
    for trigger in engine_run["result"].triggers:
        names = [name for name, _ in trigger.headers]
        assert names == trigger_topic["headers"]["names"]
        assert names == message["headers"]["required"] == list(message["headers"]["properties"])
    params = asyncapi["components"]["parameters"]["channel"]["enum"]
    assert set(params) == set(OFFER_CHANNELS)


# --------------------------------------------------------------------------- schemas

SCHEMA_FILES = [
    "segment-event.schema.json",
    "trigger.cloudevent.schema.json",
    "customer-context.schema.json",
    "catalog.schema.json",
]


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = load_json(SCHEMAS / name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    for example in schema.get("examples", []):
        assert not errors(name, example)


def test_simulated_events_match_the_segment_schema() -> None:
    events = list(JourneySimulator(customers=5, seed=1).events(50))
    assert len(events) == 50
    for event in events:
        assert not errors("segment-event.schema.json", event), event
        # and RTIM accepts them (the simulator runs ahead of the wall clock: no skew check)
        parse_event(orjson.dumps(event), max_future_skew_ms=10**12)


NOW_MS = 1_714_564_800_000  # 2024-05-01T12:00:00Z, the clock for the examples below
BASE = {
    "type": "track",
    "event": "Product Added",
    "messageId": "m-1",
    "anonymousId": "a-7",
    "properties": {"price": 9.5},
    "context": {"page": {"path": "/shoes"}},
    "timestamp": "2024-05-01T11:59:00.250Z",
}


def variant(**changes: Any) -> dict[str, Any]:
    """BASE with fields replaced; a value of ... removes the field."""
    event = {**BASE, **changes}
    return {k: v for k, v in event.items() if v is not ...}


ACCEPTED = {
    "track": variant(),
    "page without name": variant(type="page", event=..., name=...),
    "page name null": variant(type="page", event=..., name=None),
    "screen": variant(type="screen", event=..., name="Home", context={"app": {"name": "Shop"}}),
    "identify": variant(type="identify", event=..., userId="u-1", traits={"plan": "gold"}),
    "group": variant(type="group", event=..., groupId="g-1", traits={"name": "ACME"}),
    "alias": variant(type="alias", event=..., userId="u-1", previousId="a-7"),
    "integer userId": variant(userId=42, anonymousId=...),
    "userId null, anonymousId set": variant(userId=None),
    "blank userId, anonymousId set": variant(userId="  "),
    "epoch milliseconds": variant(timestamp=NOW_MS - 1000),
    "offset and nanoseconds": variant(timestamp="2024-05-01T13:59:00.123456789+02:00"),
    "lower-case t and z": variant(timestamp="2024-05-01t11:59:00z"),
    "space separator": variant(timestamp="2024-05-01 11:59:00Z"),
    "originalTimestamp only": variant(timestamp=..., originalTimestamp="2024-05-01T11:59:00Z"),
    "timestamp null": variant(timestamp=None, originalTimestamp="2024-05-01T11:59:00Z"),
    "null objects": variant(properties=None, context=None, traits=None),
    "context.traits null": variant(context={"traits": None}),
    "extra Segment fields": variant(sentAt="2024-05-01T12:00:00Z", integrations={"All": True}),
}

REJECTED = {
    "no type": (variant(type=...), "unknown_type"),
    "unknown type": (variant(type="click"), "unknown_type"),
    "type not a string": (variant(type=3), "unknown_type"),
    "no messageId": (variant(messageId=...), "missing_id"),
    "blank messageId": (variant(messageId="  "), "missing_id"),
    "messageId not a string": (variant(messageId=7), "missing_id"),
    "no ids": (variant(anonymousId=...), "missing_id"),
    "null ids": (variant(anonymousId=None, userId=None), "missing_id"),
    "blank ids": (variant(anonymousId="", userId=" "), "missing_id"),
    "float userId": (variant(userId=1.5), "wrong_type"),
    "boolean anonymousId": (variant(anonymousId=True), "wrong_type"),
    "object userId": (variant(userId={"id": 1}), "wrong_type"),
    "track without event": (variant(event=...), "wrong_type"),
    "track with blank event": (variant(event="   "), "wrong_type"),
    "page with numeric name": (variant(type="page", event=..., name=5), "wrong_type"),
    "properties array": (variant(properties=[]), "wrong_type"),
    "context string": (variant(context="web"), "wrong_type"),
    "traits number": (variant(traits=3), "wrong_type"),
    "context.traits array": (variant(context={"traits": []}), "wrong_type"),
    "no timestamp": (variant(timestamp=...), "missing_timestamp"),
    "both timestamps null": (variant(timestamp=None, originalTimestamp=None), "missing_timestamp"),
    "no offset": (variant(timestamp="2024-05-01T11:59:00"), "bad_timestamp"),
    "not a time": (variant(timestamp="yesterday"), "bad_timestamp"),
    "epoch seconds": (variant(timestamp=NOW_MS // 1000), "bad_timestamp"),
    "fractional epoch": (variant(timestamp=NOW_MS + 0.5), "bad_timestamp"),
    "boolean timestamp": (variant(timestamp=True), "bad_timestamp"),
    "hour 24": (variant(timestamp="2024-05-01T24:00:00Z"), "bad_timestamp"),
    "bad timestamp not rescued": (
        variant(timestamp="soon", originalTimestamp="2024-05-01T11:59:00Z"),
        "bad_timestamp",
    ),
    "bad originalTimestamp": (variant(timestamp=..., originalTimestamp="noon"), "bad_timestamp"),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_segment_schema_accepts_what_rtim_accepts(case: str) -> None:
    event = ACCEPTED[case]
    assert not errors("segment-event.schema.json", event)
    parse_event(orjson.dumps(event), now_ms=NOW_MS)


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_segment_schema_rejects_what_rtim_dead_letters(case: str) -> None:
    event, reason = REJECTED[case]
    assert errors("segment-event.schema.json", event), f"schema accepts {event}"
    with pytest.raises(InvalidEvent) as exc:
        parse_event(orjson.dumps(event), now_ms=NOW_MS)
    assert exc.value.reason == reason


def test_segment_schema_is_stricter_where_it_says_so() -> None:
    # The schema's description says the parser tolerates these; producers must not rely on it.
    for lenient in (variant(type="Track"), variant(timestamp="2024-05-01T11:59Z")):
        assert errors("segment-event.schema.json", lenient)
        parse_event(orjson.dumps(lenient), now_ms=NOW_MS)


def test_segment_schema_enums_match_the_parser() -> None:
    schema = load_json(SCHEMAS / "segment-event.schema.json")
    assert set(schema["properties"]["type"]["enum"]) == EVENT_TYPES


def run_engine(catalog: Path, *, customers: int, seed: int, events: int) -> tuple[Engine, Any]:
    """The engine with this catalog, over simulated traffic; and its batch's result."""
    now_ms = int(time.time() * 1000)
    # Simulated time runs ahead of the clock: start in the past so nothing is clock_skew.
    sim = JourneySimulator(customers=customers, seed=seed, start_ms=now_ms - 30 * 86_400_000)
    records = []
    for offset, event in enumerate(sim.events(events)):
        key = customer_key(event).encode()
        records.append(Record(sum(key) % 4, offset, key, orjson.dumps(event), (), now_ms))
    engine = Engine(
        catalog=load_catalog(catalog), load=lambda p, k: None, source=f"/rtim/{DEFAULTS.app_id}"
    )
    return engine, engine.process(CLICKSTREAM_TOPIC, records)


@pytest.fixture(scope="module")
def engine_run() -> dict[str, Any]:
    """Run the engine on simulated traffic; keep its decisions, triggers and contexts."""
    decisions: list[Any] = []
    encode = rtim.engine.encode_trigger

    def spy(decision: Any, *, source: str) -> bytes:
        decisions.append(decision)
        return encode(decision, source=source)

    mp = pytest.MonkeyPatch()
    mp.setattr(rtim.engine, "encode_trigger", spy)
    try:
        engine, result = run_engine(DEFAULT_CATALOG, customers=5, seed=1, events=300)
    finally:
        mp.undo()
    assert not result.dead_letters, [d.reason for d in result.dead_letters]
    assert decisions, "no decision captured: does rtim.engine still call encode_trigger?"
    return {"engine": engine, "result": result, "decisions": decisions}


def test_trigger_cloudevents_match_the_schema(engine_run: dict[str, Any]) -> None:
    result = engine_run["result"]
    assert len({t.channel for t in result.triggers}) >= 3
    source = engine_run["engine"].source
    for decision in engine_run["decisions"]:
        event = json.loads(orjson.dumps(trigger_event(decision, source=source)))
        assert not errors("trigger.cloudevent.schema.json", event), event
    for trigger in result.triggers:  # what goes on the wire
        event = json.loads(trigger.value)
        assert not errors("trigger.cloudevent.schema.json", event), event
        assert trigger.topic == TRIGGER_TOPIC_PREFIX + event["data"]["channel"]
        assert dict(trigger.headers)["content-type"] == CONTENT_TYPE


def test_triggers_decided_under_a_contact_policy_match_the_schema() -> None:
    """The example catalog's policy (caps, levers, suppression) adds reason codes of its
    own (lever:, weight:, skipped:, suppressed:, raised:): the schema takes them all."""
    example = ROOT / "docs" / "catalog.example.yaml"
    _, result = run_engine(example, customers=40, seed=2, events=2_000)
    reasons = {
        r.split(":")[0] for t in result.triggers for r in orjson.loads(t.value)["data"]["reasons"]
    }
    assert {"lever", "weight"} <= reasons, reasons
    for trigger in result.triggers:
        event = json.loads(trigger.value)
        assert not errors("trigger.cloudevent.schema.json", event), event


def test_trigger_schema_rejects_broken_events(engine_run: dict[str, Any]) -> None:
    good = json.loads(engine_run["result"].triggers[0].value)
    broken = [
        {**good, "specversion": "0.3"},
        {**good, "type": "dev.rtim.trigger.v2"},
        {k: v for k, v in good.items() if k != "id"},
        {**good, "data": {**good["data"], "channel": "fax"}},
        {**good, "data": {k: v for k, v in good["data"].items() if k != "offer"}},
        {**good, "data": {**good["data"], "candidates": [["offer", "high"]]}},
        {**good, "time": "2026-01-01 10:00:00"},
    ]
    for event in broken:
        assert errors("trigger.cloudevent.schema.json", event), event


def test_trigger_schema_enums_match_the_code() -> None:
    schema = load_json(SCHEMAS / "trigger.cloudevent.schema.json")
    assert schema["properties"]["type"]["const"] == TRIGGER_TYPE
    decision = schema["$defs"]["decision"]["properties"]
    assert set(decision["channel"]["enum"]) == set(OFFER_CHANNELS)
    assert set(decision["event"]["properties"]["channel"]["enum"]) == set(EVENT_CHANNELS)
    assert set(decision["event"]["properties"]["type"]["enum"]) == EVENT_TYPES


def test_customer_contexts_match_the_schema(engine_run: dict[str, Any]) -> None:
    contexts = [
        orjson.loads(value)
        for per_partition in engine_run["result"].updates.values()
        for value in per_partition.values()
    ]
    assert len(contexts) >= 5
    for ctx in [context_model.new_context("c-1"), *contexts]:
        assert not errors("customer-context.schema.json", ctx), ctx
    assert errors("customer-context.schema.json", {**contexts[0], "email": "x@example.com"})
    assert errors("customer-context.schema.json", {**contexts[0], "src": [0]})


def test_context_schema_budgets_match_the_model() -> None:
    schema = load_json(SCHEMAS / "customer-context.schema.json")
    props = schema["properties"]
    assert set(schema["required"]) == set(context_model.new_context("c"))
    assert props["events"]["maxProperties"] == context_model.MAX_NAMES
    assert props["pages"]["maxItems"] == context_model.MAX_PAGES
    assert props["ids"]["maxLength"] == context_model.MAX_IDS * context_model.ID_TOKEN_CHARS
    assert props["cart"]["properties"]["items"]["maxProperties"] == context_model.MAX_CART_ITEMS
    assert props["affinity"]["maxProperties"] == context_model.MAX_CATEGORIES
    assert props["v"]["const"] == context_model.VERSION
    assert props["id"]["maxLength"] == MAX_CUSTOMER_ID_CHARS
    assert props["events"]["propertyNames"]["maxLength"] == context_model.MAX_NAME_CHARS
    assert props["pages"]["items"]["maxLength"] == context_model.MAX_PAGE_CHARS
    items = props["cart"]["properties"]["items"]
    assert items["propertyNames"]["maxLength"] == context_model.MAX_PRODUCT_ID_CHARS
    assert props["affinity"]["propertyNames"]["maxLength"] == context_model.MAX_CATEGORY_CHARS
    trait_string = props["traits"]["additionalProperties"]["oneOf"][0]
    assert trait_string["maxLength"] == context_model.MAX_TRAIT_CHARS
    assert str(context_model.MAX_CONTEXT_BYTES) in schema["description"]
    names = props["traits"]["propertyNames"]
    assert set(names["not"]["enum"]) == context_model.IDENTIFYING_TRAITS
    assert names["maxLength"] == context_model.MAX_TRAIT_NAME_CHARS
    assert props["traits"]["maxProperties"] == context_model.MAX_TRAITS
    assert set(props["channels"]["propertyNames"]["enum"]) == set(EVENT_CHANNELS)
    assert set(props["types"]["propertyNames"]["enum"]) == EVENT_TYPES


# --------------------------------------------------------------------------- metrics


def registry() -> dict[str, tuple[str, ...]]:
    """Series name -> label names, for every rtim_ metric registered by rtim.metrics."""
    labels = {
        m._name: tuple(m._labelnames)
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    series: dict[str, tuple[str, ...]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("rtim_"):
            continue
        # Metrics built at scrape time (rtim.metrics.GcPauses) name their labels in their samples.
        names = labels.get(family.name) or tuple(k for k in family.samples[0].labels if k != "le")
        if family.type == "counter":
            series[family.name + "_total"] = names
        elif family.type == "histogram":
            series[family.name + "_bucket"] = (*names, "le")
            series[family.name + "_sum"] = names
            series[family.name + "_count"] = names
        else:
            series[family.name] = names
    return series


def dashboard() -> dict[str, Any]:
    return load_json(DEPLOY / "grafana" / "dashboards" / "rtim.json")


def dashboard_exprs() -> list[str]:
    exprs = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    board = dashboard()
    walk(board["panels"])
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def all_exprs() -> list[tuple[str, str]]:
    return [("dashboard", e) for e in dashboard_exprs()] + [
        (f"alert {r['alert']}", r["expr"]) for r in alert_rules()
    ]


METRIC = re.compile(r"\brtim_[a-z_]+")
SELECTOR = re.compile(r"\b(rtim_[a-z_]+)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series


def test_dashboard_and_alerts_use_registered_metrics() -> None:
    known = registry()
    assert len(known) >= 14
    used = set()
    for where, expr in all_exprs():
        for name in METRIC.findall(expr):
            used.add(name)
            assert name in known, f"{where}: {name} is not a metric in rtim/metrics.py ({expr})"
    assert used, "no rtim_ metric found in the dashboard or the alerts"


def test_dashboard_and_alerts_use_existing_labels() -> None:
    known = registry()
    for where, expr in all_exprs():
        for name, matchers in SELECTOR.findall(expr):
            for label in MATCHER_LABEL.findall(matchers):
                assert label in (*known[name], *TARGET_LABELS), f"{where}: {name} has no {label}"
        in_expr = {label for name in METRIC.findall(expr) for label in known[name]}
        for group in GROUPING.findall(expr):
            for label in filter(None, (s.strip() for s in group.split(","))):
                assert label in in_expr | TARGET_LABELS, f"{where}: no metric has {label}: {expr}"


def test_dashboard_shows_every_metric() -> None:
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in registry()}
    shown = {
        re.sub(r"_(total|bucket|sum|count)$", "", n)
        for e in dashboard_exprs()
        for n in METRIC.findall(e)
    }
    missing = families - shown
    assert not missing, f"metrics with no panel in deploy/grafana/dashboards/rtim.json: {missing}"


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] and board["schemaVersion"] >= 36
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


def test_alert_rules_cover_the_failure_modes() -> None:
    rules = alert_rules()
    by_metric = {name for r in rules for name in METRIC.findall(r["expr"])}
    # worker not ready, lag, dead letters, latency, publish retries, nothing consumed
    assert {
        "rtim_worker_ready",
        "rtim_consumer_lag_records",
        "rtim_events_dead_lettered_total",
        "rtim_decision_latency_seconds_bucket",
        "rtim_publish_retries_total",
        "rtim_events_consumed_total",
    } <= by_metric
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_latency_alert_uses_the_objective_and_a_bucket_boundary() -> None:
    (rule,) = [r for r in alert_rules() if "rtim_decision_latency_seconds_bucket" in r["expr"]]
    threshold = float(re.search(r">\s*([0-9.]+)\s*$", rule["expr"].strip()).group(1))
    assert threshold == metrics.LATENCY_OBJECTIVE_S
    assert "histogram_quantile(0.99" in rule["expr"]
    # The threshold must be a bucket boundary, or the quantile is an interpolation.
    assert threshold in metrics.DECISION_LATENCY._upper_bounds
    for expr in dashboard_exprs():
        for le in re.findall(r'le="([^"]+)"', expr):
            assert float(le) in metrics.DECISION_LATENCY._upper_bounds


# --------------------------------------------------------------------------- deploy


def dockerfile() -> list[tuple[str, str]]:
    """deploy/Dockerfile as Docker reads it: (INSTRUCTION, arguments), in order."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continued instruction, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def image_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def the(instructions: list[tuple[str, str]], keyword: str) -> str:
    (args,) = [a for k, a in instructions if k == keyword]
    return args


def test_docker_image_runs_a_worker_as_users_expect() -> None:
    instructions = dockerfile()
    env = image_env(instructions)
    # The image's Python is the oldest that the package supports (the one CI must hold).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = re.fullmatch(r"python:(\d+)\.(\d+)[-\w.]*", instructions[0][1].split()[0])
    assert instructions[0][0] == "FROM" and base, instructions[0]
    major, minor = int(base[1]), int(base[2])
    supported = SpecifierSet(project["requires-python"])
    assert f"{major}.{minor}" in supported
    assert f"{major}.{minor - 1}" not in supported
    # Not root.
    assert the(instructions, "USER").split(":")[0] not in {"root", "0"}
    # The web port: the exposed one is the one the worker listens on.
    assert int(the(instructions, "EXPOSE")) == int(env.get("RTIM_WEB_PORT", DEFAULTS.web_port))
    assert int(env.get("RTIM_WEB_PORT", DEFAULTS.web_port)) == DEFAULTS.web_port
    # The context store lives on the volume.
    assert json.loads(the(instructions, "VOLUME")) == [env["RTIM_DATADIR"]]
    # The command is the worker.
    command = json.loads(the(instructions, "CMD"))
    assert command == ["rtim", "worker"]
    assert project["scripts"]["rtim"] == "rtim.cli:main"
    from rtim.cli import main

    assert "worker" in main.commands


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_docker_healthcheck_asks_the_workers_liveness(status: int, healthy: bool) -> None:
    # Run the HEALTHCHECK command as Docker would, in the image's environment, against
    # a stand-in for the worker's web server.
    instructions = dockerfile()
    options, _, command = the(instructions, "HEALTHCHECK").partition("CMD ")
    argv = json.loads(command)
    assert argv[0] == "python"
    handler = type("Probe", (_Probe,), {"status": status, "paths": []})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**image_env(instructions), "RTIM_WEB_PORT": str(server.server_port)}
        env["PATH"] = os.environ.get("PATH", "")
        result = subprocess.run(
            [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30, check=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert handler.paths == ["/health/live"]
    assert (result.returncode == 0) is healthy, result.stderr
    assert "--start-period=" in options  # the wait for the broker is not counted


def test_docker_build_context_holds_what_the_image_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for keyword, args in dockerfile():
        if keyword == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert source.rstrip("*").rstrip("/") in allowed, source


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "compose.yaml")


def compose_workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "command" not in svc and svc.get("image") == "rtim:dev"
    }


def test_compose_stack(compose: dict[str, Any], topics_by_name: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    workers = compose_workers(compose)
    assert len(workers) == 2
    ports, volumes = set(), set()
    for name, svc in workers.items():
        env = svc["environment"]
        unknown = set(env) - SETTING_ENV_NAMES
        assert not unknown, f"{name}: not RTIM settings: {unknown}"
        assert int(env["RTIM_PARTITIONS"]) == topics_by_name[CLICKSTREAM_TOPIC]["partitions"]
        port = int(env["RTIM_WEB_PORT"])
        ports.add(port)
        assert f"{port}:{port}" in svc["ports"]
        (volume,) = [v for v in svc["volumes"] if v.endswith(":" + env["RTIM_DATADIR"])]
        volumes.add(volume.split(":")[0])
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert len(ports) == 2 and len(volumes) == 2, "workers must not share a port or a datadir"
    assert set(volumes) <= set(compose["volumes"])
    topics_cmd = services["topics"]["command"]
    assert topics_cmd[:2] == ["python", "/opt/rtim/deploy/create_topics.py"]


def test_prometheus_scrapes_both_workers(compose: dict[str, Any]) -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "rtim"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    expected = {
        f"{name}:{svc['environment']['RTIM_WEB_PORT']}"
        for name, svc in compose_workers(compose).items()
    }
    assert targets == expected
    # The alert rules select job="rtim".
    assert any('job="rtim"' in r["expr"] for r in alert_rules())


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/rtim.yml")
    (provider,) = providers["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert (DEPLOY / "grafana/dashboards/rtim.json").is_file()


@pytest.fixture(scope="module")
def k8s() -> dict[str, Any]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text(encoding="utf-8")):
            objects[doc["kind"]] = doc
    generators = {g["name"]: g for g in kustomization["configMapGenerator"]}
    settings = dict(item.split("=", 1) for item in generators["rtim-settings"]["literals"])
    settings = {k: v.split("#")[0].strip() for k, v in settings.items()}
    return {"objects": objects, "generators": generators, "settings": settings}


def test_k8s_settings_are_real_settings(k8s: dict[str, Any], topics_by_name: dict) -> None:
    settings = k8s["settings"]
    assert set(settings) <= SETTING_ENV_NAMES, set(settings) - SETTING_ENV_NAMES
    Settings(**{k.removeprefix("RTIM_").lower(): v for k, v in settings.items()})  # valid values
    assert int(settings["RTIM_PARTITIONS"]) == topics_by_name[CLICKSTREAM_TOPIC]["partitions"]


def test_k8s_statefulset(k8s: dict[str, Any]) -> None:
    sts = k8s["objects"]["StatefulSet"]
    settings = k8s["settings"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == int(settings["RTIM_WEB_PORT"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert {e["configMapRef"]["name"] for e in container["envFrom"]} == {"rtim-settings"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == settings["RTIM_DATADIR"]
    assert Path(mounts["catalog"]) == Path(settings["RTIM_CATALOG"]).parent
    (catalog_volume,) = [v for v in pod["volumes"] if v["name"] == "catalog"]
    assert catalog_volume["configMap"]["name"] == "rtim-catalog"
    (init,) = pod["initContainers"]
    assert "/opt/rtim/deploy/create_topics.py" in init["command"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    service = k8s["objects"]["Service"]
    assert service["metadata"]["name"] == sts["spec"]["serviceName"]
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}


def test_k8s_catalog_configmap(k8s: dict[str, Any], topics_by_name: dict) -> None:
    (file_entry,) = k8s["generators"]["rtim-catalog"]["files"]
    key, _, path = file_entry.rpartition("=")
    assert (key or path) == Path(k8s["settings"]["RTIM_CATALOG"]).name
    catalog = load_catalog(K8S / path)  # a valid catalog
    for channel in catalog.channels:
        assert TRIGGER_TOPIC_PREFIX + channel in topics_by_name


def test_k8s_keda_scaler_is_capped_at_the_partitions(
    k8s: dict[str, Any], topics_by_name: dict
) -> None:
    scaled = k8s["objects"]["ScaledObject"]
    sts = k8s["objects"]["StatefulSet"]
    settings = k8s["settings"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    partitions = topics_by_name[CLICKSTREAM_TOPIC]["partitions"]
    assert spec["maxReplicaCount"] == partitions == int(settings["RTIM_PARTITIONS"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert sts["spec"]["replicas"] == spec["minReplicaCount"]
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["topic"] == CLICKSTREAM_TOPIC
    assert meta["consumerGroup"] == settings["RTIM_APP_ID"]
    assert meta["bootstrapServers"] == settings["RTIM_BROKER"]
    assert meta["allowIdleConsumers"] == "false"
    # KEDA's CRD types trigger metadata as map[string]string.
    assert all(isinstance(v, str) for v in meta.values()), meta


def test_create_topics_plan(topics_doc: dict[str, Any]) -> None:
    spec = importlib.util.spec_from_file_location("create_topics", DEPLOY / "create_topics.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    plans = {
        p.name: p
        for p in module.plan(
            topics_doc, partitions=DEFAULTS.partitions, app_id=DEFAULTS.app_id, replication_factor=1
        )
    }
    assert code_topics() <= set(plans)
    for name, partitions in topic_specs(DEFAULTS).items():
        assert plans[name].partitions == partitions
    for p in plans.values():
        assert int(p.configs["min.insync.replicas"]) <= 1, p
    other = {
        p.name: p
        for p in module.plan(topics_doc, partitions=8, app_id="shop", replication_factor=3)
    }
    changelog = other[changelog_topic("shop")]
    assert changelog.partitions == 8 and changelog.configs["cleanup.policy"] == "compact"
    assert other[CLICKSTREAM_TOPIC].partitions == 8
    assert other["shop-__assignor-__leader"].partitions == 1


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"value": None},
        {"offer_id": None},
        {"value": 1e13},
        {"value": -1e13},
        {"timestamp": "yesterday"},
        {"timestamp": "2026-01-01"},
        {"outcome": "Click"},
    ],
)
def test_the_response_schema_takes_what_the_worker_takes(change: dict[str, Any]) -> None:
    """A channel system that validates its responses against topics/ gets them joined;
    one the worker dead-letters, the schema refuses too."""
    from rtim.learn.attribution import InvalidResponse, parse_response

    body = {
        "decision_id": "d-1",
        "customer_id": "u-1",
        "outcome": "click",
        "timestamp": "2026-01-01T10:00:00Z",
        **change,
    }
    try:
        parse_response(orjson.dumps(body))
        taken = True
    except InvalidResponse:
        taken = False
    assert (not errors("response.schema.json", body)) == taken, (change, taken)
