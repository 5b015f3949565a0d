"""The load generator's mixed-duration workload: parsed strictly, and replayed identically for every policy."""
import pytest

from benchmarks.load import parse_seconds, request_duration


def test_audio_seconds_is_a_number_or_a_range():
    assert parse_seconds("5") == (5.0, 5.0)
    assert parse_seconds("1-10") == (1.0, 10.0)
    for bad in ("0", "10-1", "-3", "a-b"):
        with pytest.raises(ValueError):
            parse_seconds(bad)


def test_request_durations_replay_and_cover_the_range():
    fixed = [request_duration((5.0, 5.0), 3, i) for i in range(20)]
    assert fixed == [5.0] * 20
    first = [request_duration((1.0, 10.0), 3, i) for i in range(200)]
    assert first == [request_duration((1.0, 10.0), 3, i) for i in range(200)]  # every policy sees the same requests
    assert first != [request_duration((1.0, 10.0), 4, i) for i in range(200)]
    assert all(1.0 <= d <= 10.0 for d in first) and min(first) < 2.0 and max(first) > 9.0
