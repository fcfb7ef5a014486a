from __future__ import annotations

import pytest

from buildgate.errors import SizeError, UsageError
from buildgate.sizes import format_size, parse_size

M = 1024**2
G = 1024**3


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1024", 1024),
        ("1K", 1024),
        ("512M", 512 * M),
        ("2.5G", int(2.5 * G)),
        ("2.5g", int(2.5 * G)),
        ("1T", 1024 * G),
        ("2GB", 2 * G),
        ("2GiB", 2 * G),
        (" 100M ", 100 * M),
        (".5G", G // 2),
    ],
)
def test_sizes_are_base_1024_like_systemd(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_percentage_is_of_the_given_base() -> None:
    assert parse_size("50%", percent_of=4 * G) == 2 * G
    assert parse_size("12.5%", percent_of=8 * G) == G


@pytest.mark.parametrize("text", ["", "0", "0M", "-1G", "abc", "1X", "1.2.3G", "G", "10%%"])
def test_bad_sizes_are_usage_errors_that_say_how(text: str) -> None:
    with pytest.raises(SizeError) as err:
        parse_size(text, percent_of=G if text.endswith("%") else None)
    assert isinstance(err.value, UsageError)
    assert "e.g. 2.5G" in str(err.value)
    assert "\n" not in str(err.value)


def test_percentage_needs_a_base_and_at_most_100() -> None:
    with pytest.raises(SizeError, match="not allowed"):
        parse_size("50%")
    with pytest.raises(SizeError, match="above 100%"):
        parse_size("150%", percent_of=G)
    with pytest.raises(SizeError, match="zero"):
        parse_size("0%", percent_of=G)


def test_format_size_round_trips_common_values() -> None:
    assert format_size(int(2.5 * G)) == "2.5G"
    assert format_size(512 * M) == "512M"
    assert format_size(100) == "100B"
    assert format_size(None) == "?"
    for text in ("2.5G", "512M", "1T", "3K"):
        assert format_size(parse_size(text)) == text
