"""The inotify event parser over packed records, and one real event round trip."""

from __future__ import annotations

import struct

from buildgate._inotify import IN_CLOSE_WRITE, IN_DELETE, IN_MOVED_TO, Inotify, parse_events


def _event(wd: int, mask: int, name: str, pad: int = 16) -> bytes:
    raw = name.encode()
    raw += b"\0" * (pad - len(raw) % pad if name else 0)
    return struct.pack("iIII", wd, mask, 0, len(raw)) + raw


def test_parse_events_splits_records_and_strips_the_padding() -> None:
    data = _event(1, IN_MOVED_TO, "12.json") + _event(1, IN_DELETE, "3.lock") + _event(2, IN_CLOSE_WRITE, "")
    assert parse_events(data) == [(1, IN_MOVED_TO, "12.json"), (1, IN_DELETE, "3.lock"),
                                  (2, IN_CLOSE_WRITE, "")]
    assert parse_events(b"") == []
    assert parse_events(data[:10]) == []  # a short read never yields a half record


def test_inotify_reports_the_names_in_a_directory(tmp_path) -> None:
    ino = Inotify()
    try:
        wd = ino.add(str(tmp_path), IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE)
        (tmp_path / "x.tmp").write_text("1")
        (tmp_path / "x.tmp").rename(tmp_path / "7.json")
        (tmp_path / "7.json").unlink()
        names = [(w, name) for w, _mask, name in ino.read()]
        assert names == [(wd, "x.tmp"), (wd, "7.json"), (wd, "7.json")], names
        assert ino.read() == []
    finally:
        ino.close()
