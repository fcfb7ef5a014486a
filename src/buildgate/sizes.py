"""Memory sizes, read the way systemd reads ``MemoryMax=``: base 1024.

``2.5G`` is 2.5 GiB, ``512M`` is 512 MiB, a bare number is bytes.  Suffixes are
K, M, G, T, P, E in either case, optionally followed by ``B`` or ``iB`` (docker
and friends write ``2g`` or ``2GB`` and mean the same base-1024 thing).  A
percentage is taken of a base the caller supplies (the build budget).
"""

from __future__ import annotations

import re

from buildgate.errors import SizeError

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGTPE]?)(?:I?B)?$")
_PERCENT_RE = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%$")


def _fraction(digits: str) -> tuple[int, int]:
    """"2.5" -> (25, 10): exact, without importing decimal on every build."""
    whole, _, frac = digits.partition(".")
    return int(whole + frac or "0"), 10 ** len(frac)


def parse_size(text: str, percent_of: int | None = None) -> int:
    """Return the size in bytes; raise SizeError (a usage error) when it is not one.

    Zero and negative sizes are refused: a reservation or cap of nothing is a typo.
    """
    raw = text
    text = text.strip()
    if not text:
        raise SizeError(raw, "it is empty")
    if text.startswith("-"):
        raise SizeError(raw, "it is negative")
    m = _PERCENT_RE.match(text)
    if m:
        if percent_of is None:
            raise SizeError(raw, "a percentage is not allowed here")
        num, den = _fraction(m.group(1))
        if num <= 0:
            raise SizeError(raw, "it is zero")
        if num > 100 * den:
            raise SizeError(raw, "a percentage above 100% is more than the whole budget")
        return percent_of * num // (100 * den)
    m = _SIZE_RE.match(text.upper())
    if not m:
        raise SizeError(raw, "it is not a number with a unit")
    num, den = _fraction(m.group(1))
    value = num * 1024 ** _UNITS[m.group(2)] // den
    if value <= 0:
        raise SizeError(raw, "it is zero")
    if value >= 2**63:
        raise SizeError(raw, "it is too large")
    return value


def format_size(value: int | None) -> str:
    """Short human form, base 1024, like systemd's format_bytes: ``2.5G``, ``512M``."""
    if value is None:
        return "?"
    for suffix, power in (("E", 6), ("P", 5), ("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        unit = 1024**power
        if value >= unit:
            scaled = value / unit
            text = f"{scaled:.1f}".rstrip("0").rstrip(".")
            return text + suffix
    return f"{value}B"
