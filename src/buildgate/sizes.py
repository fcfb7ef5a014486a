"""Memory sizes, read the way systemd reads ``MemoryMax=``: base 1024.

``2.5G`` is 2.5 GiB, ``512M`` is 512 MiB, a bare number is bytes.  Suffixes are
K, M, G, T, P, E in either case, optionally followed by ``B`` or ``iB`` (docker
and friends write ``2g`` or ``2GB`` and mean the same base-1024 thing).  A
percentage is taken of a base the caller supplies (the build budget).
"""

from __future__ import annotations

from buildgate.errors import SizeError

# Parsed by hand, not with ``re``: importing re costs every build ~10 ms
# (docs/benchmarks.md).  The grammar is  NUMBER [space] [KMGTPE] [B | iB]  and
# NUMBER [space] %,  NUMBER being ASCII digits with at most one '.' ("2", "2.",
# "2.5", ".5").
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_DIGITS = frozenset("0123456789")


def _number(text: str) -> str | None:
    """``text`` if it is a NUMBER as above, else None."""
    whole, _, frac = text.partition(".")
    if not (whole or frac) or not _DIGITS.issuperset(whole) or not _DIGITS.issuperset(frac):
        return None
    return text


def _split_unit(text: str) -> tuple[str, str] | None:
    """Upper-cased ``2.5 GiB`` -> ("2.5", "G"); None when it is not a size."""
    if text.endswith("IB"):
        text = text[:-2]
    elif text.endswith("B"):
        text = text[:-1]
    unit = text[-1:] if text[-1:] in _UNITS else ""
    number = _number(text[: len(text) - len(unit)].rstrip())
    return None if number is None else (number, unit)


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
    percent = _number(text[:-1].rstrip()) if text.endswith("%") else None
    if percent is not None:
        if percent_of is None:
            raise SizeError(raw, "a percentage is not allowed here")
        num, den = _fraction(percent)
        if num <= 0:
            raise SizeError(raw, "it is zero")
        if num > 100 * den:
            raise SizeError(raw, "a percentage above 100% is more than the whole budget")
        return percent_of * num // (100 * den)
    size = _split_unit(text.upper())
    if size is None:
        raise SizeError(raw, "it is not a number with a unit")
    num, den = _fraction(size[0])
    value = num * 1024 ** _UNITS[size[1]] // den
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
