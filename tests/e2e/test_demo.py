"""`rtim demo`, the README's main command, as a newcomer runs it."""

from __future__ import annotations

import re
import subprocess
import sys

from rtim.stream.process import free_port

TRIGGER_LINE = re.compile(
    r"^\d{2}:\d{2}:\d{2}\.\d{3}\s+(web|app|email|call_centre|store)\s+\S+\s+\S+\s+score=\d"
)


def test_demo_shows_triggers_flowing_and_metrics_moving_then_stops_cleanly() -> None:
    """Triggers are printed, the metrics line moves, the demo's channel systems answer the
    triggers and the worker's models learn from the answers; then everything stops."""
    port = free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rtim",
            "demo",
            "--duration",
            "20",
            "--rate",
            "200",
            "--web-port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert f"http://127.0.0.1:{port}/metrics" in out
    triggers = [line for line in out.splitlines() if TRIGGER_LINE.match(line)]
    assert len(triggers) >= 5, out
    status = re.findall(r"-- events consumed ([\d,]+) \| customers ([\d,]+)", out)
    assert status, out
    consumed = [int(c.replace(",", "")) for c, _ in status]
    assert consumed[-1] > 0 and consumed == sorted(consumed)  # moving forward
    summary = re.search(
        r"sent ([\d,]+) events, received ([\d,]+) triggers, .* sent back ([\d,]+) responses", out
    )
    assert summary and int(summary[2].replace(",", "")) >= len(triggers), out
    # The channel systems answered, the worker joined the answers to its decisions, and
    # the conversions and dismissals closed some as examples that the models learned.
    learning = re.findall(r"\| responses ([\d,]+) \| examples ([\d,]+) \(([\d,]+) positive\)", out)
    assert learning, out
    responses, examples, positives = (int(v.replace(",", "")) for v in learning[-1])
    assert int(summary[3].replace(",", "")) >= responses > 0, out
    assert examples > 0 and 0 <= positives <= examples, out
    models = re.findall(r"^  (\S+)\s+([\d,]+)\s+([\d,]+)\s+[\d.]+%", out, re.MULTILINE)
    assert any(offer != "__shared__" and int(n.replace(",", "")) > 0 for offer, n, _ in models), out
    # Everything it started is gone: the port is free again.
    import socket

    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
