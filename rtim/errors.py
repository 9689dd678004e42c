"""Errors a user fixes by changing configuration, not code.

:class:`ConfigError` is what the ``rtim`` command turns into one line on
stderr and exit code 2 (the traceback only at debug level): its message names
what to change (the ``RTIM_*`` variable, the file and line, the option).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from typing import Any


class ConfigError(Exception):
    """A setting, file or option that cannot be used; the message says which and why."""


def unknown_fields(raw: dict[Any, Any], known: Collection[str]) -> str | None:
    """What to say of a mapping's fields that are not ``known`` (None if there are none):
    each as written, and the known field each is a likely misspelling of.

    >>> unknown_fields({"id": "o", "eligibilty": [], 3: "x"}, ["id", "eligibility"])
    "unknown field(s) ['3', 'eligibilty'] (did you mean 'eligibility' for 'eligibilty'?)"
    >>> unknown_fields({"id": "o"}, ["id"]) is None
    True
    """
    # Keys as text: YAML may give numbers, and a sort of mixed types would fail.
    unknown = sorted(str(key) for key in raw if key not in known)
    if not unknown:
        return None
    names = sorted(known)
    hints = [
        f"{close[0]!r} for {name!r}"
        for name in unknown
        if (close := difflib.get_close_matches(name, names, n=1, cutoff=0.75))
    ]
    said = f"unknown field(s) {unknown}"
    return f"{said} (did you mean {', '.join(hints)}?)" if hints else said
