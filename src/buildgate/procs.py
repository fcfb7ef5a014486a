"""Process identity that survives pid reuse: (pid, start time, boot id)."""

from __future__ import annotations

import os

from buildgate import cgroup


def parse_stat_starttime(text: str) -> int:
    """Field 22 of /proc/PID/stat (clock ticks since boot).

    comm (field 2) may contain spaces and parentheses, so split after the last ')'.
    """
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[19])


def starttime(pid: int) -> int | None:
    try:
        with open(os.path.join(cgroup.PROC_ROOT, str(pid), "stat"), encoding="utf-8", errors="replace") as fh:
            return parse_stat_starttime(fh.read())
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> str:
    try:
        with open(os.path.join(cgroup.PROC_ROOT, "sys/kernel/random/boot_id"), encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def same_process_alive(pid: int | None, start: int | None) -> bool:
    """True while ``pid`` is still the process that had start time ``start``.

    A zombie still counts as alive: its memory is gone but its parent has not
    reaped it yet, and it will be shortly.
    """
    if not pid or start is None:
        return False
    return starttime(pid) == start


def pidfd(pid: int) -> int | None:
    """A pidfd that polls readable when ``pid`` exits (Linux >= 5.3), or None."""
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        return None
