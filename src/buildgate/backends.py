"""Where a build's cap comes from: the one choice point between systemd, raw
cgroupfs and lock-only, made by probing what this host can do (not its name).

* ``systemd``  — a transient scope in the build slice, over D-Bus (systemd.py).
* ``cgroupfs`` — hosts without systemd as init (containers, WSL, CI machines):
  buildgate makes ``SLICE/SCOPE`` directories in the memory hierarchy itself
  (cgroup v2 with a delegated subtree, or the v1 memory controller) and writes
  the same limits systemd would.
* ``none``     — nothing can be written: the queue still works, the build is
  NOT capped, and buildgate says so loudly every time.

Each backend starts a group of pids capped at ``mem`` and later stops it
(SIGTERM to every process, SIGKILL after ``stop_timeout``).
"""

from __future__ import annotations

import os
import time

from buildgate.cgroup import Layout, MemoryCgroup, detect_layout
from buildgate.errors import InternalFailure, Unavailable, UsageError

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:
    import signal
else:  # the C module: `signal` wraps it in enums, ~7 ms of every build (enum)
    import _signal as signal
if TYPE_CHECKING:
    from buildgate.config import Config
    from buildgate.systemd import Systemd

NAMES = ("systemd", "cgroupfs", "none")
_SYSTEM_BUS = "/run/dbus/system_bus_socket"


def systemd_usable() -> bool:
    from buildgate.systemd import PRIVATE_SOCKET, booted

    if not booted():
        return False
    return os.path.exists(PRIVATE_SOCKET if os.geteuid() == 0 else _SYSTEM_BUS) or os.path.exists(_SYSTEM_BUS)


def cgroupfs_parent(cfg: Config, layout: Layout) -> str | None:
    """The directory cgroupfs builds go under (their slice's parent), if usable."""
    if layout.version == 0:
        return None
    parent = cfg.cgroup_root or layout.mount
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return None
    if layout.version == 2 and v2_memory_blocked(parent) is not None:
        return None
    return parent


def v2_memory_blocked(parent: str) -> str | None:
    """Why cgroup v2 cannot give the memory controller to children of
    ``parent``, or None when it can.

    v2's "no internal processes" rule: a cgroup that has processes of its own
    cannot enable a controller for its children, except the real root.  That
    is exactly a container's cgroup namespace root with the container's init
    in it: writable, yet ``+memory`` in its cgroup.subtree_control fails
    (EBUSY).  Probing it here lets auto fall back instead of failing the build.
    """

    def read(name: str) -> str | None:
        try:
            with open(os.path.join(parent, name)) as fh:
                return fh.read()
        except OSError:
            return None

    if "memory" in (read("cgroup.subtree_control") or "").split():
        return None
    controllers = read("cgroup.controllers")
    if controllers is not None and "memory" not in controllers.split():
        return f"the memory controller is not available in {parent} (its parent does not delegate it)"
    # Only non-root cgroups have cgroup.type: the real root may always enable.
    if read("cgroup.type") is not None and (read("cgroup.procs") or "").split():
        return (f"{parent} has processes of its own, so cgroup v2 cannot enable memory for its children: "
                f"set cgroup_root to a delegated, empty cgroup")
    return None


def probe(cfg: Config, requested: str | None = None) -> str:
    """The backend to use: the one asked for (``--backend``, ``backend =``), or
    the first of systemd, cgroupfs, none that this host supports."""
    want = requested or cfg.backend
    if want not in ("auto", *NAMES):
        raise UsageError(f"unknown backend {want!r}: use auto, systemd, cgroupfs or none")
    if want == "systemd":
        if not systemd_usable():
            raise Unavailable(
                "systemd is not running as the init system here (no /run/systemd/system or no bus): "
                "use --backend cgroupfs or run on a systemd host"
            )
        return "systemd"
    if want == "cgroupfs":
        layout = detect_layout()
        if cgroupfs_parent(cfg, layout) is None:
            parent = cfg.cgroup_root or layout.mount
            why = v2_memory_blocked(parent) if layout.version == 2 and os.path.isdir(parent) else None
            raise Unavailable(
                (why + "; or use --backend none (uncapped)") if why else
                "no writable cgroup memory controller here: run as root, delegate a cgroup "
                "(cgroup_root in the config) or use --backend none (uncapped)"
            )
        return "cgroupfs"
    if want == "none":
        return "none"
    if systemd_usable():
        return "systemd"
    if cgroupfs_parent(cfg, detect_layout()) is not None:
        return "cgroupfs"
    return "none"


class Backend:
    name = "?"
    capped = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.layout = detect_layout()

    def connect(self) -> None:
        """Called once admitted: anything expensive happens here, not while waiting."""

    def slice_max(self) -> int | None:
        """MemoryMax of the build slice, for the budget (before admission)."""
        return None

    def start(self, scope: str, pids: list[int], mem: int, description: str) -> MemoryCgroup | None:
        raise NotImplementedError

    def stop(self, scope: str, cgroup_path: str | None, wait: bool = True) -> None:
        """Stop the build's processes.  ``wait=False`` only for a cgroup known
        to be empty: the scope's teardown may then finish after we return."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class SystemdBackend(Backend):
    name = "systemd"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.sd: Systemd | None = None

    def connect(self) -> None:
        from buildgate.systemd import Systemd

        if self.sd is None:
            self.sd = Systemd()

    def slice_max(self) -> int | None:
        # The active slice's cgroup holds the limit systemd applied: reading it
        # costs microseconds, `systemctl show` (for an inactive slice) ~10 ms.
        found, limit = _active_slice_limit(self.cfg.slice, self.layout)
        if found:
            return limit
        from buildgate.budget import query_slice_max

        return query_slice_max(self.cfg.slice)

    def start(self, scope: str, pids: list[int], mem: int, description: str) -> MemoryCgroup | None:
        from buildgate.runner import scope_properties

        self.connect()
        assert self.sd is not None
        props = scope_properties(self.cfg, mem, description, self.layout.version)
        self.sd.start_scope(scope, pids[0], props, extra_pids=pids[1:])
        cg = MemoryCgroup.of_pid(pids[0], self.layout)
        if cg is not None and self.layout.version == 1:
            # systemd ignores MemorySwapMax= on v1: cap memory+swap ourselves.
            _write_if_exists(cg.dir, "memory.memsw.limit_in_bytes", mem)
        return cg

    def stop(self, scope: str, cgroup_path: str | None, wait: bool = True) -> None:
        self.connect()
        assert self.sd is not None
        self.sd.stop_unit(scope, timeout=self.cfg.stop_timeout + 60, wait=wait)

    def close(self) -> None:
        if self.sd is not None:
            self.sd.close()
            self.sd = None


class CgroupfsBackend(Backend):
    name = "cgroupfs"

    def _slice_dir(self) -> str:
        parent = cgroupfs_parent(self.cfg, self.layout)
        if parent is None:
            raise Unavailable("no writable cgroup memory controller here: use --backend none (uncapped)")
        return os.path.join(parent, self.cfg.slice)

    def slice_max(self) -> int | None:
        cg_dir = os.path.join(cgroupfs_parent(self.cfg, self.layout) or "/nonexistent", self.cfg.slice)
        name = "memory.max" if self.layout.version == 2 else "memory.limit_in_bytes"
        try:
            with open(os.path.join(cg_dir, name)) as fh:
                from buildgate.cgroup import parse_limit

                return parse_limit(fh.read())
        except OSError:
            return None

    def start(self, scope: str, pids: list[int], mem: int, description: str) -> MemoryCgroup | None:
        slice_dir = self._slice_dir()
        scope_dir = os.path.join(slice_dir, scope)
        try:
            os.makedirs(slice_dir, exist_ok=True)
            if self.layout.version == 2:
                # v2 only lets a child use a controller its parent enabled for it.
                _enable_memory(os.path.dirname(slice_dir))
                _enable_memory(slice_dir)
            os.mkdir(scope_dir)
            if self.layout.version == 2:
                _write(scope_dir, "memory.max", mem)
                _write_if_exists(scope_dir, "memory.swap.max", 0)
                _write_if_exists(scope_dir, "memory.high", mem - max(mem // 16, 4 * 1024**2))
                _write_if_exists(scope_dir, "pids.max", self.cfg.tasks_max)
            else:
                _write(scope_dir, "memory.limit_in_bytes", mem)
                _write_if_exists(scope_dir, "memory.memsw.limit_in_bytes", mem)
            for pid in pids:
                _write(scope_dir, "cgroup.procs", pid)
        except OSError as exc:
            self._remove(scope_dir)
            raise InternalFailure(
                f"cannot set up cgroup {scope_dir} ({exc.strerror}): check `buildgate doctor`, "
                f"or use --backend none (uncapped)"
            ) from None
        return MemoryCgroup.of_pid(pids[0], self.layout)

    def stop(self, scope: str, cgroup_path: str | None, wait: bool = True) -> None:
        if cgroup_path is not None:
            scope_dir = self.layout.dir_of(cgroup_path)
        else:
            scope_dir = os.path.join(self._slice_dir(), scope)
        if not os.path.isdir(scope_dir):
            return
        cg = MemoryCgroup(self.layout, cgroup_path or "")
        cg.dir = scope_dir
        _kill_group(lambda: cg.pids(), self.cfg.stop_timeout, scope_dir)
        self._remove(scope_dir)

    @staticmethod
    def _remove(scope_dir: str) -> None:
        for _ in range(50):  # the kernel frees a cgroup a moment after its last task
            try:
                os.rmdir(scope_dir)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


class NoneBackend(Backend):
    """Lock-only: queue and reservation, no cap.  Leftovers are found because
    buildgate is their child subreaper (PR_SET_CHILD_SUBREAPER)."""

    name = "none"
    capped = False

    def start(self, scope: str, pids: list[int], mem: int, description: str) -> MemoryCgroup | None:
        return None

    def stop(self, scope: str, cgroup_path: str | None, wait: bool = True) -> None:
        _kill_group(lambda: descendants(os.getpid()), self.cfg.stop_timeout, None)


def slice_cgroup(name: str) -> str:
    """systemd's cgroup path of a slice, relative to its root: dashes nest
    (``a-b.slice`` lives in ``a.slice/a-b.slice``)."""
    stem = name[: -len(".slice")]
    if stem in ("", "-"):
        return ""
    parts = stem.split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def _active_slice_limit(name: str, layout: Layout) -> tuple[bool, int | None]:
    """(found, limit) from the slice's memory cgroup, if the slice is active.

    systemd's own root comes from PID 1's cgroup (``ROOT/init.scope``), so this
    is right on hosts and in containers alike; anything unexpected says
    "not found" and the caller asks systemd instead.
    """
    from buildgate.cgroup import PROC_ROOT, parse_limit, parse_proc_cgroup

    if layout.version == 0:
        return False, None
    try:
        with open(os.path.join(PROC_ROOT, "1", "cgroup")) as fh:
            init = parse_proc_cgroup(fh.read()).get(layout.memory_key, "")
    except OSError:
        return False, None
    if not init.endswith("/init.scope"):
        return False, None
    root = init[: -len("/init.scope")]
    directory = layout.dir_of(f"{root}/{slice_cgroup(name)}")
    try:
        with open(os.path.join(directory, "memory.max" if layout.version == 2 else "memory.limit_in_bytes")) as fh:
            return True, parse_limit(fh.read())
    except (OSError, ValueError):
        return False, None


def make(name: str, cfg: Config) -> Backend:
    return {"systemd": SystemdBackend, "cgroupfs": CgroupfsBackend, "none": NoneBackend}[name](cfg)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from /proc, one pass)."""
    from buildgate.cgroup import PROC_ROOT

    children: dict[int, list[int]] = {}
    for entry in os.listdir(PROC_ROOT):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(PROC_ROOT, entry, "stat")) as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if rest[0] == "Z":
            continue
        children.setdefault(int(rest[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def set_child_subreaper() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _kill_group(list_pids, stop_timeout: float, cgroup_dir: str | None) -> None:
    """SIGTERM everything, SIGKILL what is left after ``stop_timeout`` (as
    systemd stops a scope).  Looping catches processes forked meanwhile; on v2
    cgroup.kill (kernel >= 5.14) then kills the rest atomically."""
    deadline = time.monotonic() + stop_timeout
    sig = signal.SIGTERM
    while True:
        pids = list_pids()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGTERM and time.monotonic() >= deadline:
            sig = signal.SIGKILL
            if cgroup_dir:
                _write_if_exists(cgroup_dir, "cgroup.kill", 1)
        if time.monotonic() > deadline + 30:
            raise InternalFailure(f"processes {pids[:5]} survived SIGKILL for 30 s")
        time.sleep(0.02)


def _write(directory: str, name: str, value: object) -> None:
    with open(os.path.join(directory, name), "w") as fh:
        fh.write(str(value))


def _write_if_exists(directory: str, name: str, value: object) -> None:
    path = os.path.join(directory, name)
    if os.path.exists(path):
        try:
            _write(directory, name, value)
        except OSError:
            pass


def _enable_memory(directory: str) -> None:
    path = os.path.join(directory, "cgroup.subtree_control")
    with open(path) as fh:
        if "memory" in fh.read().split():
            return
    _write(directory, "cgroup.subtree_control", "+memory")
