"""JSON for the queue's records, without ``import json`` on the hot path.

``import json`` pulls in ``re`` (json.decoder compiles its patterns at import):
~14 ms of every ``buildgate run`` and of every waiting build (see
docs/benchmarks.md).  The records are flat objects of strings, numbers,
booleans and nulls, so this module writes them itself, byte for byte as
``json.dumps(record, sort_keys=True)`` does, and reads them with the C scanner
that ``json.loads`` itself uses (``_json.make_scanner``).  Where that
accelerator is missing (not CPython), it falls back to the json module.
The unit tests check both directions against the json module.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:
    from typing import Any

_quote: Any = None
_make_scanner: Any = None
try:
    import _json

    _quote = _json.encode_basestring_ascii
    _make_scanner = _json.make_scanner
except ImportError:  # pragma: no cover - not CPython
    pass

_WHITESPACE = " \t\n\r"


class _Context:
    """What ``_json.make_scanner`` reads off a JSONDecoder: json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return float(name.replace("Infinity", "inf"))  # NaN, Infinity, -Infinity


_scan = _make_scanner(_Context()) if _make_scanner is not None else None


def dumps(record: dict[str, Any]) -> str:
    """``json.dumps(record, sort_keys=True)`` for a flat record."""
    if _quote is None:  # pragma: no cover - not CPython
        import json

        return json.dumps(record, sort_keys=True)
    parts = []
    for key in sorted(record):
        parts.append(f"{_quote(key)}: {_value(record[key])}")
    return "{" + ", ".join(parts) + "}"


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return str(_quote(value))
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"a record cannot hold {value!r}")
        return float.__repr__(value)
    raise TypeError(f"a record holds only strings, numbers, booleans and null, not {type(value).__name__}")


def loads(text: str) -> dict[str, Any]:
    """``json.loads(text)``, which must be an object; ValueError when it is not."""
    if _scan is None:  # pragma: no cover - not CPython
        import json

        obj = json.loads(text)
    else:
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            obj, end = _scan(text, start)
        except Exception:
            # Not JSON (a record cut off mid-write).  The C scanner words most
            # errors with json.decoder's JSONDecodeError, which it can find
            # only once json is imported (else it fails with SystemError), so
            # the json module reads it again and says what is wrong: this is
            # rare, so it may cost the import.
            import json

            obj = json.loads(text)
            end = len(text)
        if text[end:].strip(_WHITESPACE):
            raise ValueError("extra data after the JSON value")
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj
