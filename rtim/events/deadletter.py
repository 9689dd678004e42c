"""Dead-letter records: the original record plus headers saying why it failed.

The headers follow the Kafka Connect convention (``errors.deadletterqueue.
context.headers.enable``), so the tools that already read Connect's dead-letter
queues (kcat, Connect's own replay tooling, UIs) show RTIM's too. One header is
added: ``rtim.errors.reason``, the :class:`~rtim.events.segment.InvalidEvent`
reason code (``internal_error`` for any other exception), so the DLQ can be
filtered and counted without parsing messages.

The original key, value and headers are kept byte for byte, so a fixed record
can be replayed as it was. Kafka allows a header key to repeat; the error
headers are appended after the original ones, so a record dead-lettered twice
(replayed, failed again) carries both histories, and ``lastHeader(key)`` (Java)
or the last matching pair gives the newest one.

Pure functions: building a dead letter never raises, whatever the exception.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rtim.events.segment import InvalidEvent
from rtim.learn.attribution import InvalidResponse

__all__ = [
    "INTERNAL_ERROR",
    "MAX_MESSAGE_BYTES",
    "REFUSED",
    "DeadLetter",
    "dead_letter",
    "dead_letter_headers",
    "error_reason",
    "without_value",
]

#: ``rtim.errors.reason`` for an exception that is not an InvalidEvent (a bug).
INTERNAL_ERROR = "internal_error"
#: ``rtim.errors.reason`` of an event whose output Kafka refused.
REFUSED = "refused"
#: Longest ``__connect.errors.exception.message`` value, in bytes. Messages can
#: quote record content; a dead letter should not grow by kilobytes because of it.
MAX_MESSAGE_BYTES = 1024

_ELLIPSIS = "…".encode()

Header = tuple[str, bytes]


@dataclass(slots=True)
class DeadLetter:
    """A record to produce to the dead-letter topic.

    Attributes
    ----------
    key, value : bytes or None
        The original record's key and value, untouched.
    headers : list of (str, bytes)
        The original headers followed by the error headers.
    reason : str
        The ``rtim.errors.reason`` header value, as a str (for metrics).
    partition : int or None
        The partition of the failed record (exactly-once processing publishes the
        dead letter in that partition's transaction).
    """

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    reason: str
    partition: int | None = None


def error_reason(exc: BaseException) -> str:
    """Return ``exc.reason`` for an InvalidEvent or InvalidResponse, else ``internal_error``.

    Examples
    --------
    >>> error_reason(InvalidEvent("empty", "record value is empty"))
    'empty'
    >>> error_reason(KeyError("x"))
    'internal_error'
    """
    if isinstance(exc, (InvalidEvent, InvalidResponse)):
        return exc.reason
    return INTERNAL_ERROR


def _class_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    # Connect writes the fully qualified Java class name; the Python
    # equivalent is module.qualname, without the noise of "builtins.".
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _message(exc: BaseException) -> bytes:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not lose the dead letter
        text = ""
    if not text:
        # KeyError() or an exception whose __str__ failed: the class name is
        # still better than an empty header.
        text = f"<{type(exc).__name__} with no message>"
    # backslashreplace: a message may carry lone surrogates (from data decoded
    # with surrogateescape), which strict UTF-8 encoding would refuse.
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return data
    # Cut on a character boundary: decoding with "ignore" drops a partial
    # trailing character instead of leaving invalid UTF-8 in the header.
    cut = data[: MAX_MESSAGE_BYTES - len(_ELLIPSIS)].decode("utf-8", "ignore").encode()
    return cut + _ELLIPSIS


def dead_letter_headers(
    *,
    topic: str,
    partition: int,
    offset: int,
    exc: BaseException,
    stage: str = "validate",
) -> list[tuple[str, bytes]]:
    """Return the error headers describing why a record was dead-lettered.

    Parameters
    ----------
    topic, partition, offset : str, int, int
        Where the failed record was read from.
    exc : BaseException
        Why it failed.
    stage : str
        The processing step that failed (``validate``, ``apply``, ...).

    Returns
    -------
    list of (str, bytes)
        ``__connect.errors.topic``, ``.partition``, ``.offset``,
        ``.exception.class.name``, ``.exception.message``, ``.stage`` and
        ``rtim.errors.reason``, in that order; values are UTF-8, numbers in
        decimal (as Connect writes them), the message cut to
        :data:`MAX_MESSAGE_BYTES`.

    Examples
    --------
    >>> headers = dict(dead_letter_headers(
    ...     topic="clickstream", partition=3, offset=42,
    ...     exc=InvalidEvent("malformed_json", "record value is not valid JSON")))
    >>> headers["__connect.errors.offset"], headers["rtim.errors.reason"]
    (b'42', b'malformed_json')
    """
    return [
        ("__connect.errors.topic", topic.encode("utf-8", "backslashreplace")),
        ("__connect.errors.partition", str(partition).encode()),
        ("__connect.errors.offset", str(offset).encode()),
        ("__connect.errors.exception.class.name", _class_name(exc).encode()),
        ("__connect.errors.exception.message", _message(exc)),
        ("__connect.errors.stage", stage.encode("utf-8", "backslashreplace")),
        ("rtim.errors.reason", error_reason(exc).encode()),
    ]


def dead_letter(
    *,
    key: bytes | None,
    value: bytes | None,
    original_headers: Iterable[tuple[str, bytes | None]] | None,
    topic: str,
    partition: int,
    offset: int,
    exc: BaseException,
    stage: str = "validate",
) -> DeadLetter:
    """Build the dead letter of a record that failed.

    Parameters
    ----------
    key, value : bytes or None
        The failed record's key and value; kept as they are (same objects).
    original_headers : iterable of (str, bytes) or None
        The failed record's headers, kept first and in order (Kafka header
        values may be None; they are kept as None).
    topic, partition, offset, exc, stage
        As for :func:`dead_letter_headers`.

    Returns
    -------
    DeadLetter
        ``headers`` is a new list; the caller's list is not modified.
    """
    # Kafka header values may be None; they are kept as they came.
    headers: list[tuple[str, bytes]] = list(original_headers or ())  # type: ignore[arg-type]
    headers.extend(
        dead_letter_headers(topic=topic, partition=partition, offset=offset, exc=exc, stage=stage)
    )
    return DeadLetter(
        key=key, value=value, headers=headers, reason=error_reason(exc), partition=partition
    )


def without_value(letter: DeadLetter, exc: BaseException) -> DeadLetter:
    """The dead letter to publish when Kafka refused ``letter`` (too large for the
    dead-letter topic): the same key and headers, no value, and the refusal's
    exception, stage (``publish``) and reason (``refused``) appended.

    >>> big = DeadLetter(b"u1", b"x" * 2_000_000, [("rtim.errors.reason", b"oversize")], "oversize")
    >>> small = without_value(big, ValueError("too large"))
    >>> small.value is None, small.headers[-1]
    (True, ('rtim.errors.reason', b'refused'))
    """
    headers = list(letter.headers)
    headers.append(("__connect.errors.exception.class.name", _class_name(exc).encode()))
    headers.append(("__connect.errors.exception.message", _message(exc)))
    headers.append(("__connect.errors.stage", b"publish"))
    headers.append(("rtim.errors.reason", REFUSED.encode()))
    return DeadLetter(letter.key, None, headers, REFUSED, letter.partition)
