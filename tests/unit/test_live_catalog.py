"""The live catalog in a worker: the newest loadable version is swapped in, a bad record
is refused and counted, and the catalog in force stays."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from rtim import metrics
from rtim.offers.catalog import Catalog
from rtim.offers.live import CATALOG_KEY, CatalogVersion, encode_catalog
from rtim.settings import KafkaConnection
from rtim.stream.catalog import LiveCatalog


def record(offset: int, value: bytes, key: bytes = CATALOG_KEY) -> SimpleNamespace:
    return SimpleNamespace(offset=offset, key=key, value=value)


def catalog(version: int, offer: str) -> bytes:
    return encode_catalog(
        f"offers:\n  - {{id: {offer}, channels: [web]}}\n", version=version, by="ops", at_ms=0
    )


def test_the_newest_loadable_catalog_is_swapped_in_and_a_bad_one_is_refused() -> None:
    swapped: list[Catalog] = []

    async def swap(new: Catalog) -> None:
        swapped.append(new)

    async def run() -> LiveCatalog:
        live = LiveCatalog(
            KafkaConnection.parse("127.0.0.1:1"),
            client_id="t",
            current=CatalogVersion(0, "start.yaml"),
            swap=swap,
        )
        await live.take([record(0, catalog(1, "a")), record(1, catalog(2, "b"))])
        assert [[o.id for o in c.offers] for c in swapped] == [["b"]]  # one swap per fetch
        refused = metrics.CATALOG_REJECTED._value.get()
        bad = encode_catalog("offers: [{id: c, channels: [fax]}]", version=3, by="x", at_ms=0)
        await live.take([record(2, bad), record(3, b"{oops"), record(4, b"x", key=b"other")])
        assert metrics.CATALOG_REJECTED._value.get() == refused + 2
        return live

    live = asyncio.run(run())
    assert len(swapped) == 1, "the refused versions changed nothing"
    assert (live.current.version, live.current.offset) == (2, 1)
    assert metrics.CATALOG_VERSION._value.get() == 2
