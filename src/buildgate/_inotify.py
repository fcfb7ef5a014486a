"""A minimal inotify binding (ctypes), so a waiting build sleeps in the kernel.

ctypes is loaded only when an instance is made: an uncontended build never
waits, and need not pay for it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:
    from typing import Any

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000

_libc = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


class Inotify:
    def __init__(self) -> None:
        fd = _lib().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = _errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd

    def add(self, path: str, mask: int) -> int:
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = _errno()
            raise OSError(err, os.strerror(err), path)
        return int(wd)

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        """Discard pending events: the caller rescans the state anyway."""
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return
            except BlockingIOError:
                return

    def read(self) -> list[tuple[int, int, str]]:
        """The pending events as (wd, mask, name); empty when there are none."""
        data = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        return parse_events(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_events(data: bytes) -> list[tuple[int, int, str]]:
    """``struct inotify_event`` records -> (wd, mask, name); the name is NUL-padded."""
    import struct

    events = []
    offset = 0
    while offset + 16 <= len(data):
        wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
        raw = data[offset + 16: offset + 16 + length]
        events.append((wd, mask, raw.split(b"\0", 1)[0].decode("utf-8", "replace")))
        offset += 16 + length
    return events
