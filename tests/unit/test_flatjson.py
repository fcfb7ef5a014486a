"""buildgate._flatjson against the json module it stands in for."""

from __future__ import annotations

import json

import pytest

from buildgate import _flatjson

RECORDS = [
    {},
    {"seq": 1, "pid": 4242, "pid_start": None, "boot": "3f2a", "uid": 0, "name": "web",
     "mem": 2684354560, "argv": "npx astro build", "cwd": "/srv/site", "state": "waiting",
     "t_enqueued": 1764820000.123456, "t_admitted": None, "keep_leftovers": False, "owner": "root"},
    {"argv": "sh -c 'echo \"hi\"\\n\ttab'", "cwd": "/srv/ü/😀/\x01\x1f\x7f", "big": 2**70,
     "neg": -5, "zero": -0.0, "tiny": 5e-324, "huge": 1.7976931348623157e308, "t": True},
    {"z": 1, "a": 2, "m": "\u2028\u2029\ud800"},
]


@pytest.mark.parametrize("record", RECORDS)
def test_dumps_writes_what_json_dumps_sort_keys_writes(record: dict) -> None:
    assert _flatjson.dumps(record) == json.dumps(record, sort_keys=True)


@pytest.mark.parametrize("record", RECORDS)
def test_loads_reads_what_json_loads_reads(record: dict) -> None:
    text = json.dumps(record)
    assert _flatjson.loads(text) == json.loads(text)
    assert _flatjson.loads(" \n" + text + "\n ") == record


@pytest.mark.parametrize("text", ["", "   ", "{", '{"a": 1', '{"a": }', '{"a" 1}', "{}x", '{} {}',
                                  "nul", '{"a": "\x01"}', "\ufeff{}", "[1, 2]", '"str"', "12",
                                  "null", '{"a": 1,}', "{'a': 1}", '{"seq": 2, "state": "runn', '"abc',
                                  '{"a": 1e', '{"a": tru', '{"a": "\\u12'])
def test_anything_but_one_json_object_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        _flatjson.loads(text)
    try:  # the json module refuses it too, or it is valid JSON that is not an object
        assert not isinstance(json.loads(text), dict)
    except ValueError:
        pass


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1], {"a": 1}, b"x", object()])
def test_dumps_refuses_what_a_record_cannot_hold(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        _flatjson.dumps({"k": value})


def test_reading_a_record_does_not_import_json_or_re() -> None:
    import subprocess
    import sys

    code = ("import sys; from buildgate import _flatjson; "
            "r = _flatjson.loads(_flatjson.dumps({'a': 'b', 'n': 1.5})); "
            "print(sorted(m for m in ('json', 're', 'typing') if m in sys.modules), r)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[] {'a': 'b', 'n': 1.5}", out.stderr


def test_a_record_cut_off_mid_write_is_a_value_error_in_a_fresh_interpreter() -> None:
    """Where json is not imported yet (every buildgate run): the C scanner
    cannot word its error without json.decoder, so it must not leak a
    SystemError (seen in the integration suite before the fallback)."""
    import subprocess
    import sys

    code = ("import sys; from buildgate import _flatjson\n"
            "for text in ['{\"seq\": 2, \"state\": \"runn', '\"abc', '{\"a\": 1e', '{', '[1]', '']:\n"
            "    assert 'json' not in sys.modules or text != '{\"seq\": 2, \"state\": \"runn'\n"
            "    try:\n"
            "        _flatjson.loads(text)\n"
            "    except ValueError:\n"
            "        continue\n"
            "    raise SystemExit(f'no ValueError for {text!r}')\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
