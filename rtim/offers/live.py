"""The live catalog: catalog versions as records of the compacted topic ``rtim.offers``.

``rtim offers apply FILE`` checks a catalog and publishes it as one record under
the one key :data:`CATALOG_KEY`: the YAML text, a version (the previous one plus
one), who applied it and when (schema ``topics/schemas/catalog.schema.json``).
Every worker reads the topic from the start and decides with the newest record
whose catalog it can load; one it cannot load (written by hand, or by a newer
RTIM) is refused, logged and counted, and the catalog in force stays.

The file a worker starts with (``RTIM_CATALOG``) is version 0: in force until
the topic has a catalog. It is not published: workers started with different
files would otherwise overwrite one another's, and a worker restarted with an
old file would take the live catalog back.

>>> value = encode_catalog("offers: []\\n", version=3, by="ops", at_ms=0)
>>> version, catalog = decode_catalog(value)
>>> version.version, version.by, catalog.offers
(3, 'ops', ())
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson

from rtim.offers.catalog import Catalog, CatalogError, catalog_from_text

#: The key of every catalog record: compaction keeps the newest one.
CATALOG_KEY = b"catalog"
CATALOG_FORMAT = 1


@dataclass(frozen=True, slots=True)
class CatalogVersion:
    """Which catalog is in force, and where it came from."""

    version: int
    #: ``rtim.offers`` (a published catalog) or the path of the start-up file.
    source: str
    by: str | None = None
    at_ms: int | None = None
    #: Offset of its record in rtim.offers (None for the start-up file).
    offset: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "applied_by": self.by,
            "applied_at": None if self.at_ms is None else _iso(self.at_ms),
            "offset": self.offset,
        }


def encode_catalog(text: str, *, version: int, by: str, at_ms: int) -> bytes:
    """The value of a catalog record (check the text first: :func:`catalog_from_text`)."""
    return orjson.dumps(
        {"format": CATALOG_FORMAT, "version": version, "by": by, "at_ms": at_ms, "yaml": text}
    )


def decode_catalog(
    value: bytes | None, offset: int | None = None
) -> tuple[CatalogVersion, Catalog]:
    """The version and catalog of a record; raises :class:`CatalogError` saying why not."""
    try:
        raw = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise CatalogError(f"not a catalog record: not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != CATALOG_FORMAT:
        raise CatalogError(f"not a catalog record of format {CATALOG_FORMAT}")
    version, text = raw.get("version"), raw.get("yaml")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CatalogError("catalog record: 'version' must be an integer >= 1")
    if not isinstance(text, str):
        raise CatalogError("catalog record: 'yaml' must be the catalog's text")
    by, at_ms = raw.get("by"), raw.get("at_ms")
    catalog = catalog_from_text(text, f"rtim.offers version {version}")
    return (
        CatalogVersion(
            version=version,
            source="rtim.offers",
            by=by if isinstance(by, str) else None,
            at_ms=at_ms if isinstance(at_ms, int) and not isinstance(at_ms, bool) else None,
            offset=offset,
        ),
        catalog,
    )


def previous_version(value: bytes | None) -> int:
    """The version a record carries, 0 if it is not a readable record (the next is +1)."""
    try:
        raw = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return 0
    version = raw.get("version") if isinstance(raw, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
