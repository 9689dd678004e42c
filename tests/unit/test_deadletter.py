"""Dead-letter records: original bytes kept, Kafka Connect error headers added."""

from __future__ import annotations

from typing import Any

import pytest

from rtim.events import (
    INTERNAL_ERROR,
    MAX_MESSAGE_BYTES,
    REASONS,
    DeadLetter,
    InvalidEvent,
    dead_letter,
    dead_letter_headers,
    error_reason,
    parse_event,
)

CONNECT_KEYS = [
    "__connect.errors.topic",
    "__connect.errors.partition",
    "__connect.errors.offset",
    "__connect.errors.exception.class.name",
    "__connect.errors.exception.message",
    "__connect.errors.stage",
    "rtim.errors.reason",
]


class Boom(RuntimeError):
    pass


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no __str__ for you")


def headers_of(exc: BaseException, **kwargs: Any) -> dict[str, bytes]:
    kwargs.setdefault("topic", "clickstream")
    kwargs.setdefault("partition", 3)
    kwargs.setdefault("offset", 1234567)
    return dict(dead_letter_headers(exc=exc, **kwargs))


def test_headers_for_an_invalid_event() -> None:
    exc = InvalidEvent("wrong_type", "properties must be an object, got array", field="properties")
    headers = dead_letter_headers(topic="clickstream", partition=3, offset=1234567, exc=exc)
    assert [k for k, _ in headers] == CONNECT_KEYS
    assert dict(headers) == {
        "__connect.errors.topic": b"clickstream",
        "__connect.errors.partition": b"3",
        "__connect.errors.offset": b"1234567",
        "__connect.errors.exception.class.name": b"rtim.events.segment.InvalidEvent",
        "__connect.errors.exception.message": b"properties must be an object, got array",
        "__connect.errors.stage": b"validate",
        "rtim.errors.reason": b"wrong_type",
    }


@pytest.mark.parametrize(
    ("exc", "class_name", "message"),
    [
        (KeyError("customer"), b"KeyError", b"'customer'"),
        (ZeroDivisionError("division by zero"), b"ZeroDivisionError", b"division by zero"),
        (Boom("disk full"), f"{__name__}.Boom".encode(), b"disk full"),
        (ValueError("not an InvalidEvent"), b"ValueError", b"not an InvalidEvent"),
    ],
)
def test_other_exceptions_are_internal_errors(
    exc: BaseException, class_name: bytes, message: bytes
) -> None:
    headers = headers_of(exc, stage="apply")
    assert headers["rtim.errors.reason"] == b"internal_error"
    assert headers["__connect.errors.exception.class.name"] == class_name
    assert headers["__connect.errors.exception.message"] == message
    assert headers["__connect.errors.stage"] == b"apply"


def test_every_value_is_bytes_and_keys_are_str() -> None:
    for key, value in dead_letter_headers(topic="t", partition=0, offset=0, exc=Boom("x")):
        assert type(key) is str
        assert type(value) is bytes


def test_non_ascii_values_are_utf8() -> None:
    headers = headers_of(Boom("caf\u00e9 \u2603"), topic="clics-\u00e9t\u00e9")
    assert headers["__connect.errors.exception.message"] == "caf\u00e9 \u2603".encode()
    assert headers["__connect.errors.topic"] == "clics-\u00e9t\u00e9".encode()


@pytest.mark.parametrize(
    "text", ["x" * 10_000, "\u00e9" * 5_000, "\u2603" * 5_000, "a\U0001f600" * 3000]
)
def test_long_messages_are_cut_on_a_character_boundary(text: str) -> None:
    message = headers_of(Boom(text))["__connect.errors.exception.message"]
    assert len(message) <= MAX_MESSAGE_BYTES
    decoded = message.decode("utf-8")  # strict: no half character at the cut
    assert decoded.endswith("\u2026")
    assert text.startswith(decoded[:-1])
    assert len(message) > MAX_MESSAGE_BYTES - 8  # cut close to the limit, not far below


def test_message_at_the_limit_is_kept_whole() -> None:
    text = "y" * MAX_MESSAGE_BYTES
    assert headers_of(Boom(text))["__connect.errors.exception.message"] == text.encode()
    cut = headers_of(Boom(text + "y"))["__connect.errors.exception.message"]
    assert cut != (text + "y").encode() and cut.endswith("\u2026".encode())


def test_lone_surrogates_do_not_break_the_dead_letter() -> None:
    # e.g. a message quoting bytes decoded with errors="surrogateescape"
    message = headers_of(Boom("bad byte \udcff"))["__connect.errors.exception.message"]
    assert message == b"bad byte \\udcff"


def test_unprintable_and_empty_exceptions_still_get_a_message() -> None:
    unprintable = headers_of(Unprintable())["__connect.errors.exception.message"]
    assert b"Unprintable" in unprintable
    empty = headers_of(KeyError())["__connect.errors.exception.message"]
    assert b"KeyError" in empty


def test_error_reason() -> None:
    for reason in REASONS:
        assert error_reason(InvalidEvent(reason, "m")) == reason
    assert error_reason(Boom()) == INTERNAL_ERROR == "internal_error"
    assert error_reason(KeyboardInterrupt()) == INTERNAL_ERROR


# --------------------------------------------------------------------------
# dead_letter
# --------------------------------------------------------------------------


def test_dead_letter_keeps_the_original_record() -> None:
    key = b"user-1"
    value = b'{"type": "track", "properties": []}'
    original = [("traceparent", b"00-abc-def-01"), ("source", None), ("traceparent", b"dup")]
    snapshot = list(original)
    exc = InvalidEvent("wrong_type", "properties must be an object, got array")
    letter = dead_letter(
        key=key,
        value=value,
        original_headers=original,
        topic="clickstream",
        partition=1,
        offset=99,
        exc=exc,
    )
    assert isinstance(letter, DeadLetter)
    assert letter.key is key and letter.value is value
    # original headers first, in order, repeated keys and null values kept
    assert letter.headers[:3] == snapshot
    assert letter.headers[3:] == dead_letter_headers(
        topic="clickstream", partition=1, offset=99, exc=exc
    )
    assert letter.reason == "wrong_type"
    # the caller's list is neither modified nor reused
    assert original == snapshot
    assert letter.headers is not original


@pytest.mark.parametrize("original", [None, [], ()])
def test_dead_letter_without_original_headers(original: Any) -> None:
    letter = dead_letter(
        key=None,
        value=None,
        original_headers=original,
        topic="t",
        partition=0,
        offset=0,
        exc=Boom("x"),
    )
    assert [k for k, _ in letter.headers] == CONNECT_KEYS
    assert letter.key is None and letter.value is None
    assert letter.reason == "internal_error"


def test_dead_letter_accepts_any_iterable_of_headers() -> None:
    letter = dead_letter(
        key=b"k",
        value=b"v",
        original_headers=iter([("a", b"1")]),
        topic="t",
        partition=0,
        offset=5,
        exc=Boom("x"),
        stage="decide",
    )
    assert letter.headers[0] == ("a", b"1")
    assert dict(letter.headers)["__connect.errors.stage"] == b"decide"


def test_dead_lettering_twice_keeps_both_histories_newest_last() -> None:
    first = dead_letter(
        key=b"k",
        value=b"{",
        original_headers=None,
        topic="clickstream",
        partition=0,
        offset=7,
        exc=InvalidEvent("malformed_json", "bad"),
    )
    second = dead_letter(
        key=first.key,
        value=first.value,
        original_headers=first.headers,
        topic="clickstream.replay",
        partition=2,
        offset=1,
        exc=Boom("still bad"),
    )
    reasons = [v for k, v in second.headers if k == "rtim.errors.reason"]
    assert reasons == [b"malformed_json", b"internal_error"]
    # Kafka's lastHeader semantics: the last pair is the latest failure
    assert dict(second.headers)["__connect.errors.topic"] == b"clickstream.replay"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty"),
        (b"\xff\xfe{", "malformed_json"),
        (b"[]", "not_an_object"),
        (b'{"type": "click"}', "unknown_type"),
        (b"x" * 40_000, "oversize"),
    ],
)
def test_parse_failure_to_dead_letter(value: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(value, now_ms=0)
    letter = dead_letter(
        key=b"k",
        value=value,
        original_headers=[],
        topic="clickstream",
        partition=0,
        offset=11,
        exc=info.value,
    )
    headers = dict(letter.headers)
    assert letter.reason == reason
    assert headers["rtim.errors.reason"] == reason.encode()
    message = str(info.value).encode()
    assert len(message) <= MAX_MESSAGE_BYTES  # short enough to be kept whole
    assert headers["__connect.errors.exception.message"] == message
    assert letter.value is value
