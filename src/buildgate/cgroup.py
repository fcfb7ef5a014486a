"""Reading cgroup memory files, on cgroup v2 and on the v1 memory controller.

The parsers are pure functions over file text so they can be tested with canned
v1 and v2 contents; the thin ``MemoryCgroup`` reader joins them to a root that
tests (and odd hosts) can override, psutil ``PROCFS_PATH``-style.

v2: memory.max, memory.events (oom_kill), memory.peak (kernel >= 5.19), memory.current
v1: memory.limit_in_bytes, memory.oom_control (oom_kill, kernel >= 4.13),
    memory.max_usage_in_bytes, memory.usage_in_bytes
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:  # the real thing for type checkers; see _records.py
    from dataclasses import dataclass
else:
    from buildgate._records import dataclass

#: Where cgroup hierarchies are mounted and where procfs is; overridable.
CGROUP_ROOT = os.environ.get("BUILDGATE_CGROUP_ROOT", "/sys/fs/cgroup")
PROC_ROOT = os.environ.get("BUILDGATE_PROC_ROOT", "/proc")

#: v1 reports "no limit" as the largest page-aligned signed 64-bit number.
_V1_UNLIMITED = 0x7FFFFFFFFFFFF000


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` -> {controller: path}; the v2 entry is keyed ``""``."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            result[""] = path
        for name in controllers.split(","):
            if name:
                result[name] = path
    return result


def parse_keyed(text: str) -> dict[str, int]:
    """Flat keyed files: memory.events, memory.oom_control, memory.stat."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                result[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return result


def parse_limit(text: str) -> int | None:
    """memory.max / memory.limit_in_bytes -> bytes, or None for no limit."""
    value = text.strip()
    if value == "max" or not value:
        return None
    number = int(value)
    if number >= _V1_UNLIMITED:
        return None
    return number


def oom_kills(text: str) -> int:
    """oom_kill count from v2 memory.events or v1 memory.oom_control text."""
    return parse_keyed(text).get("oom_kill", 0)


def parse_mountinfo_roots(text: str) -> dict[str, str]:
    """/proc/self/mountinfo -> {mount point: root within its filesystem}.

    For a cgroup mount the root is the cgroup the mount shows as its top.  It
    differs from "/" in containers and cgroup namespaces, and /proc/PID/cgroup
    paths must be made relative to it before joining them to the mount point.
    """
    roots: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5:
            roots[_unescape(fields[4])] = _unescape(fields[3])
    return roots


_OCTAL = frozenset("01234567")


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (``\\040`` is a space); by hand, as re costs
    every build ~10 ms to import."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and _OCTAL.issuperset(code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Layout:
    """Which hierarchy has the memory controller and where it is mounted."""

    version: int  # 2 or 1; 0 when there is no usable memory controller
    mount: str
    #: the cgroup shown at ``mount`` (mountinfo's root field)
    mount_root: str = "/"

    def dir_of(self, path: str) -> str:
        """Directory of cgroup ``path`` (as /proc/PID/cgroup names it)."""
        root = self.mount_root.rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root):]
        return os.path.join(self.mount, path.lstrip("/"))

    @property
    def memory_key(self) -> str:
        """The key of /proc/PID/cgroup that names the memory cgroup."""
        return "" if self.version == 2 else "memory"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError:
        return None


def detect_layout(root: str | None = None) -> Layout:
    """Probe the memory controller: pure v2, v1 (hybrid or legacy), or none."""
    root = root or CGROUP_ROOT
    mountinfo = _read(os.path.join(PROC_ROOT, "self", "mountinfo")) or ""
    roots = parse_mountinfo_roots(mountinfo)
    for candidate in (root, os.path.join(root, "unified")):
        controllers = _read(os.path.join(candidate, "cgroup.controllers"))
        if controllers is not None and "memory" in controllers.split():
            return Layout(2, candidate, roots.get(candidate, "/"))
    v1 = os.path.join(root, "memory")
    if os.path.exists(os.path.join(v1, "memory.limit_in_bytes")):
        return Layout(1, v1, roots.get(v1, "/"))
    return Layout(0, "")


class MemoryCgroup:
    """One memory cgroup, by its path relative to the hierarchy root."""

    def __init__(self, layout: Layout, path: str) -> None:
        self.layout = layout
        self.path = path
        self.dir = layout.dir_of(path)

    @classmethod
    def of_pid(cls, pid: int, layout: Layout | None = None) -> MemoryCgroup | None:
        layout = layout or detect_layout()
        if layout.version == 0:
            return None
        text = _read(os.path.join(PROC_ROOT, str(pid), "cgroup"))
        if text is None:
            return None
        path = parse_proc_cgroup(text).get(layout.memory_key)
        return None if path is None else cls(layout, path)

    def _file(self, v2: str, v1: str) -> str | None:
        return _read(os.path.join(self.dir, v2 if self.layout.version == 2 else v1))

    def exists(self) -> bool:
        return os.path.isdir(self.dir)

    def limit(self) -> int | None:
        text = self._file("memory.max", "memory.limit_in_bytes")
        return None if text is None else parse_limit(text)

    def oom_kills(self) -> int | None:
        text = self._file("memory.events", "memory.oom_control")
        return None if text is None else oom_kills(text)

    def peak(self) -> int | None:
        text = self._file("memory.peak", "memory.max_usage_in_bytes")
        return None if text is None or not text.strip() else int(text.strip())

    def current(self) -> int | None:
        text = self._file("memory.current", "memory.usage_in_bytes")
        return None if text is None or not text.strip() else int(text.strip())

    def pids(self) -> list[int]:
        text = _read(os.path.join(self.dir, "cgroup.procs"))
        return [] if text is None else [int(p) for p in text.split()]

    def populated(self) -> bool:
        if self.layout.version == 2:
            text = _read(os.path.join(self.dir, "cgroup.events"))
            if text is not None:
                return parse_keyed(text).get("populated", 0) == 1
        return bool(self.pids())
