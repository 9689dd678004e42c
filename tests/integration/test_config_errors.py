"""A configuration error stops ``rtim worker`` with one line that says what to fix.

Each case runs the real command: exit code 2, a single ``rtim: ...`` line on
stderr naming the ``RTIM_*`` variable or the catalog file and line, and no
traceback (that comes only with ``RTIM_LOG_LEVEL=debug``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtim.broker import EmbeddedBroker
from rtim.stream.process import free_port
from rtim.stream.topics import create_topics

pytestmark = pytest.mark.integration

#: A port nothing listens on: a worker pointed there has no broker.
NO_BROKER = f"127.0.0.1:{free_port()}"


def rtim_worker(tmp_path: Path, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run ``rtim worker`` until it exits; (exit code, stderr)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("RTIM_")}
    full.update(
        RTIM_BROKER=NO_BROKER,
        RTIM_DATADIR=str(tmp_path / "data"),
        RTIM_WEB_HOST="127.0.0.1",
        RTIM_WEB_PORT=str(free_port()),
    )
    full.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "rtim", "worker"],
        env=full,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stderr.decode()


def assert_one_line(code: int, stderr: str, *expected: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("rtim: "), stderr
    for part in expected:
        assert part in lines[0], stderr
    return lines[0]


CATALOGS = {
    "yaml_syntax": (
        "triggers:\n  - id: a\n    when: {type: track\noffers: []\n",
        ":4: not valid YAML",
    ),
    "unknown_field": (
        "triggers:\n  - id: a\n    when: {type: track}\n    iff: ['cart.value > 1']\n",
        ":4: trigger 'a': unknown field(s) ['iff']",
    ),
    "bad_condition": (
        "offers:\n  - id: o\n    channels: [web]\n    eligibility:\n      - 'cart.value >= '\n",
        ":4: offer 'o'.eligibility: cannot read condition 'cart.value >= '",
    ),
}


@pytest.mark.parametrize("case", sorted(CATALOGS))
def test_catalog_error_names_file_and_line(case: str, tmp_path: Path) -> None:
    text, expected = CATALOGS[case]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(text, encoding="utf-8")
    code, stderr = rtim_worker(tmp_path, {"RTIM_CATALOG": str(catalog)})
    assert_one_line(code, stderr, f"{catalog}{expected}")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RTIM_PARTITIONS", "four"), ("RTIM_STORE", "disk"), ("RTIM_WEB_PORT", "http")],
)
def test_bad_setting_names_the_variable(variable: str, value: str, tmp_path: Path) -> None:
    code, stderr = rtim_worker(tmp_path, {variable: value})
    line = assert_one_line(code, stderr, f"{variable}='{value}'")
    assert "partitions" not in line.replace("RTIM_PARTITIONS", "")  # not pydantic's field name


def test_unusable_datadir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory", encoding="utf-8")
    datadir = tmp_path / "file" / "data"
    code, stderr = rtim_worker(tmp_path, {"RTIM_DATADIR": str(datadir)})
    assert_one_line(code, stderr, f"RTIM_DATADIR='{datadir}'")


def test_debug_level_shows_the_traceback(tmp_path: Path) -> None:
    code, stderr = rtim_worker(tmp_path, {"RTIM_PARTITIONS": "0", "RTIM_LOG_LEVEL": "debug"})
    assert code == 2
    assert "Traceback" in stderr
    assert stderr.splitlines()[-1].startswith("rtim: RTIM_PARTITIONS=")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as started:
        yield started


def test_taken_web_port(broker: EmbeddedBroker, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, stderr = rtim_worker(
            tmp_path, {"RTIM_BROKER": broker.bootstrap, "RTIM_WEB_PORT": str(port)}
        )
    assert_one_line(code, stderr, f"RTIM_WEB_PORT={port}", "in use")


def test_partition_count_mismatch(broker: EmbeddedBroker, tmp_path: Path) -> None:
    asyncio.run(create_topics(broker.bootstrap, {"rtim.clickstream": 2}))
    code, stderr = rtim_worker(tmp_path, {"RTIM_BROKER": broker.bootstrap, "RTIM_PARTITIONS": "4"})
    assert_one_line(code, stderr, "has 2 partitions but RTIM_PARTITIONS is 4")


def test_log_level_reaches_the_worker(tmp_path: Path) -> None:
    """RTIM_LOG_LEVEL=debug: the worker logs at debug (seen here while it waits for a broker)."""

    def first_lines(level: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtim", "worker"],
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("RTIM_")},
                "RTIM_BROKER": NO_BROKER,
                "RTIM_DATADIR": str(tmp_path / level),
                "RTIM_WEB_HOST": "127.0.0.1",
                "RTIM_WEB_PORT": str(free_port()),
                "RTIM_LOG_LEVEL": level,
            },
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        seen = b""
        deadline = time.monotonic() + 30
        try:
            # Until the first warning (the worker waiting for its broker).
            while b" WARNING " not in seen and time.monotonic() < deadline:
                seen += proc.stderr.read() or b""
                proc.poll()
                assert proc.returncode is None, seen.decode()
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
        assert b" WARNING " in seen, seen.decode()
        return seen.decode()

    assert " DEBUG " in first_lines("debug")
    assert " DEBUG " not in first_lines("info")


def test_exactly_once_needs_a_broker_with_transactions(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The embedded broker has no transactions (InitProducerId with a transactional id
    answers UnknownError): a worker asked for exactly-once refuses to start, before it
    consumes anything, and says what to use instead."""
    code, stderr = rtim_worker(
        tmp_path,
        {"RTIM_BROKER": broker.bootstrap, "RTIM_PROCESSING_GUARANTEE": "exactly_once"},
    )
    assert_one_line(
        code,
        stderr,
        f"RTIM_BROKER={broker.bootstrap} does not support transactions",
        "use RTIM_PROCESSING_GUARANTEE=at_least_once",
    )
