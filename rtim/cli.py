"""The ``rtim`` command."""

from __future__ import annotations

import os

import click

from rtim.settings import Settings, describe


def _settings_help() -> str:
    return "\n".join(f"  {env} (default {default}): {doc}" for env, default, doc in describe())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """RTIM: a streaming real-time interaction manager.

    Watches every customer's clickstream, keeps a live context per customer,
    decides in milliseconds which offer fits the moment, and publishes the
    decision as a CloudEvent trigger to Kafka.
    """


@main.command(epilog="Settings (environment variables):\n\n" + _settings_help())
@click.option("--broker", help="Kafka bootstrap servers (overrides RTIM_BROKER).")
@click.option("--web-port", type=int, help="Web port (overrides RTIM_WEB_PORT).")
@click.option("--datadir", help="Table storage directory (overrides RTIM_DATADIR).")
def worker(broker: str | None, web_port: int | None, datadir: str | None) -> None:
    """Run a worker against RTIM_BROKER (a Kafka or Redpanda cluster).

    Workers with the same RTIM_APP_ID form one consumer group: start more to
    scale out (up to one per clickstream partition).
    """
    from rtim.stream.worker import run_worker

    overrides = {"broker": broker, "web_port": web_port, "datadir": datadir}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    run_worker(settings)


@main.command()
@click.option("--port", type=int, default=None, help="Port to listen on (default: a free one).")
def broker(port: int | None) -> None:
    """Run the embedded Kafka-compatible broker (memory only) until Ctrl-C."""
    from rtim.broker import run_forever

    run_forever(port)


if __name__ == "__main__":  # pragma: no cover
    main()
