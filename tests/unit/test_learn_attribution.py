import orjson
import pytest

from rtim.learn.attribution import Attributor, InvalidResponse, Pending, Response, parse_response

T0 = 1_780_000_000_000
HOUR = 3_600_000


def pending(decision_id="d1", customer="c1", offer="o1", at=T0, window=HOUR):
    return Pending(decision_id, customer, offer, ["f=1"], at, at + window)


def response(outcome, at, decision_id="d1"):
    return Response(decision_id, "c1", outcome, at)


def test_a_conversion_in_the_window_is_one_positive_example_learned_at_once():
    att = Attributor()
    att.decide(pending())
    assert att.respond(response("impression", T0 + 1000)) == ("joined", None)
    result, example = att.respond(response("conversion", T0 + 30 * 60_000))
    assert result == "joined"
    assert example is not None and example.converted and example.offer_id == "o1"
    assert example.features == ["f=1"] and example.why == "conversion"
    # the window ends later: nothing more is learned from this decision
    assert att.observe(T0 + 5 * HOUR) == []
    assert att.open_windows == 0


def test_a_conversion_after_the_window_is_late_and_not_learned():
    att = Attributor()
    att.decide(pending())
    assert att.respond(response("conversion", T0 + HOUR + 1)) == ("late", None)
    (negative,) = att.observe(T0 + HOUR + 2)
    assert not negative.converted
    # and once the window is closed, a conversion is late too, even stamped inside it
    assert att.respond(response("click", T0 + 10)) == ("late", None)
    assert att.counts["late"] == 2


def test_a_dismissal_in_the_window_closes_the_decision_as_a_negative_at_once():
    att = Attributor()
    att.decide(pending())
    result, example = att.respond(response("dismissal", T0 + 60_000))
    assert result == "joined"
    assert example is not None and not example.converted and example.why == "dismissal"
    assert example.closed_ms == T0 + 60_000 and example.features == ["f=1"]
    assert att.open_windows == 0 and att.counts["negative"] == 1
    # the customer said no: a later conversion is late, and the window's end adds nothing
    assert att.respond(response("conversion", T0 + 30 * 60_000)) == ("late", None)
    assert att.observe(T0 + 5 * HOUR) == []
    assert att.counts["positive"] == 0 and att.counts["negative"] == 1


def test_a_response_stamped_before_its_decision_is_early_and_not_learned():
    """A conversion stamped at the epoch, or ten minutes before the offer was made,
    cannot be its effect; a channel system's clock a few seconds behind still joins."""
    att = Attributor()
    att.decide(pending())
    assert att.respond(response("conversion", 0)) == ("early", None)
    assert att.respond(response("conversion", T0 - 10 * 60_000)) == ("early", None)
    assert att.counts["early"] == 2 and att.counts["positive"] == 0
    assert att.open_windows == 1
    # not remembered as seen: the real conversion, seconds "before" it, still joins
    result, example = att.respond(response("conversion", T0 - 5_000))
    assert result == "joined" and example is not None and example.converted


def test_a_response_for_a_decision_never_made_is_unknown():
    att = Attributor()
    att.decide(pending())
    assert att.respond(response("conversion", T0 + 5, decision_id="nope")) == ("unknown", None)
    other = Response("d1", "c2", "conversion", T0 + 6)  # another customer's response
    assert att.respond(other) == ("unknown", None)
    assert att.counts["unknown"] == 2
    assert att.open_windows == 1


def test_the_same_response_again_is_a_duplicate_and_learned_once():
    att = Attributor()
    att.decide(pending())
    assert att.respond(response("click", T0 + 5))[0] == "joined"
    assert att.respond(response("click", T0 + 6)) == ("duplicate", None)
    assert att.respond(response("conversion", T0 + 7))[1] is not None
    assert att.respond(response("conversion", T0 + 8)) == ("duplicate", None)
    assert att.counts["positive"] == 1 and att.counts["negative"] == 0


def test_no_response_is_a_negative_when_stream_time_passes_the_window_end():
    att = Attributor()
    att.decide(pending(window=HOUR))
    att.decide(pending("d2", "c2", at=T0 + 10, window=2 * HOUR))
    assert att.observe(T0 + HOUR - 1) == []  # a clickstream event of another customer
    (first,) = att.observe(T0 + HOUR)
    assert (first.decision_id, first.converted, first.why) == ("d1", False, "window")
    assert first.closed_ms == T0 + HOUR
    # stream time never goes back: an old event closes nothing and reopens nothing
    assert att.observe(T0) == []
    (second,) = att.observe(T0 + 3 * HOUR)
    assert second.decision_id == "d2"


def test_an_idle_partition_closes_windows_on_wall_clock_time():
    att = Attributor(idle_ms=60_000)
    wall = 5_000_000
    att.decide(pending(window=HOUR))
    att.observe(T0 + 1000, wall_ms=wall)
    assert att.tick(wall + 30_000) == []  # not idle long enough
    assert att.tick(wall + HOUR - 1001) == []  # idle, but the window is not over yet
    (negative,) = att.tick(wall + HOUR)
    assert negative.decision_id == "d1" and not negative.converted
    assert att.stream_ms == T0 + 1000 + HOUR


def test_a_busy_partition_ignores_the_wall_clock():
    att = Attributor(idle_ms=60_000)
    att.decide(pending(window=HOUR))
    att.observe(T0 + 1000, wall_ms=0)
    att.observe(T0 + 2000, wall_ms=10 * HOUR - 30_000)
    assert att.tick(10 * HOUR) == []


def test_a_replayed_decision_is_opened_once():
    att = Attributor()
    att.decide(pending())
    att.decide(pending())
    assert att.open_windows == 1
    assert len(att.observe(T0 + 2 * HOUR)) == 1
    att.decide(pending())  # after it closed, too
    assert att.open_windows == 0


def test_a_customer_with_too_many_open_decisions_closes_the_oldest_as_negative():
    att = Attributor(max_pending=3)
    for i in range(3):
        assert att.decide(pending(f"d{i}", at=T0 + i)) == []
    (evicted,) = att.decide(pending("d3", at=T0 + 3))
    assert (evicted.decision_id, evicted.converted, evicted.why) == ("d0", False, "evicted")
    assert att.open_windows == 3
    assert att.respond(response("conversion", T0 + 5, decision_id="d0")) == ("late", None)
    att.decide(pending("x", customer="c2", at=T0 + 4))  # another customer has its own budget
    assert att.open_windows == 4


def test_closed_decisions_are_forgotten_after_their_memory():
    att = Attributor(closed_memory_ms=HOUR)
    att.decide(pending(window=HOUR))
    att.observe(T0 + HOUR)
    assert att.respond(response("click", T0 + 5))[0] == "late"
    att.observe(T0 + 2 * HOUR)
    assert att.respond(response("impression", T0 + 5))[0] == "unknown"


def test_a_valid_response_is_parsed():
    r = parse_response(
        b'{"decision_id": "d", "customer_id": "c", "outcome": "conversion",'
        b' "timestamp": "2026-06-01T10:00:00.250+02:00", "value": 19.5}'
    )
    assert r == Response("d", "c", "conversion", 1_780_300_800_250, 19.5)


def _raw(**changes):
    record = {
        "decision_id": "d",
        "customer_id": "c",
        "outcome": "click",
        "timestamp": "2026-01-01T00:00:00Z",
    }
    record.update(changes)
    return orjson.dumps({k: v for k, v in record.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (b"{nope", "malformed_json", None),
        (b"[1]", "not_an_object", None),
        (_raw(decision_id=_DROP), "missing_field", "decision_id"),
        (_raw(decision_id=3), "wrong_type", "decision_id"),
        (_raw(customer_id=""), "wrong_type", "customer_id"),
        (_raw(outcome="buy"), "unknown_outcome", "outcome"),
        (_raw(timestamp="yesterday"), "bad_timestamp", "timestamp"),
        (_raw(timestamp=17), "bad_timestamp", "timestamp"),
        (_raw(value="10"), "wrong_type", "value"),
        (_raw(offer_id=["a"]), "wrong_type", "offer_id"),
        (_raw(offer_id=""), "wrong_type", "offer_id"),
        (_raw(value=1e300), "out_of_range", "value"),
        (_raw(pad="x" * 5000), "oversize", None),
    ],
)
def test_an_invalid_response_gets_its_reason(raw, reason, field):
    with pytest.raises(InvalidResponse) as exc:
        parse_response(raw)
    assert exc.value.reason == reason
    assert exc.value.field == field
