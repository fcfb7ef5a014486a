from __future__ import annotations

import re

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


# The regexes sizes.py used before it parsed by hand (re costs every build
# ~10 ms to import): the hand parser must accept and read exactly what they did.
_OLD_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGTPE]?)(?:I?B)?$")
_OLD_PERCENT = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%$")
_OLD_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


def _old_parse(text: str, base: int) -> int | str:
    from fractions import Fraction

    text = text.strip()
    if not text or text.startswith("-"):
        return "error"
    m = _OLD_PERCENT.match(text)
    if m:
        value = int(base * Fraction(m.group(1)) / 100)
        return value if 0 < Fraction(m.group(1)) <= 100 else "error"
    m = _OLD_SIZE.match(text.upper())
    if not m:
        return "error"
    value = int(Fraction(m.group(1)) * 1024 ** _OLD_UNITS[m.group(2)])
    return value if 0 < value < 2**63 else "error"


def _new_parse(text: str, base: int) -> int | str:
    try:
        return parse_size(text, percent_of=base)
    except SizeError:
        return "error"


def test_the_hand_parser_reads_sizes_exactly_as_the_old_regexes() -> None:
    pieces = ["", "0", "1", "2", "25", ".", ".5", "2.", "2.5", "1.2.3", "x", "-1", " ", "\t", "٣"]
    units = ["", "k", "K", "m", "G", "T", "P", "E", "B", "b", "iB", "KB", "KiB", "kib", "GB", "X", "%", " %", "IB", "BB", "KK"]
    seen = 0
    for a in pieces:
        for gap in ("", " ", "  "):
            for u in units:
                text = a + gap + u
                assert _new_parse(text, 1000) == _old_parse(text, 1000), repr(text)
                seen += 1
    assert seen == len(pieces) * 3 * len(units)
