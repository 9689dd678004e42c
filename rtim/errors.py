"""Errors a user fixes by changing configuration, not code.

:class:`ConfigError` is what the ``rtim`` command turns into one line on
stderr and exit code 2 (the traceback only at debug level): its message names
what to change (the ``RTIM_*`` variable, the file and line, the option).
"""

from __future__ import annotations


class ConfigError(Exception):
    """A setting, file or option that cannot be used; the message says which and why."""
