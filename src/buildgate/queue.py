"""The host-wide build queue: strict FIFO admission by memory reservation.

Layout of the state directory (``/run/buildgate`` by default, on tmpfs)::

    mutex          flock'ed (briefly) around every scan/decide/write
    seq            the ticket counter
    q/N.lock       held (flock LOCK_EX) by the buildgate process of ticket N
    q/N.json       ticket N's record, replaced atomically by rename

Why it is crash-safe without any cleanup step:

* A ticket is alive while its holder's flock on ``N.lock`` is held; the kernel
  drops that lock when the holder dies, however it dies.  A waiting buildgate
  killed with SIGKILL therefore simply stops counting; the next scan deletes
  its files.
* A *running* ticket whose holder died keeps its reservation while the build's
  main process (pid + start time + boot id, so pid reuse cannot fool it) is
  alive: the build still uses memory under its cap, and admitting another one
  next to it would be the very overcommit buildgate exists to prevent.  When
  that process exits, the next scan stops the scope (so leftovers die) and
  frees the reservation.
* Lock fds are close-on-exec and never reach the build, so a daemon the build
  leaves behind cannot hold the queue (the classic ``flock`` failure).

Waiting costs nothing: a waiter sleeps in ``select`` on an inotify watch of
``q/`` (a holder that exits closes its writable lock fd: IN_CLOSE_WRITE; a
record that changes is renamed in: IN_MOVED_TO; one that goes: IN_DELETE) and
on pidfds of orphaned builds.  Scanners only open files read-only, so scans do
not wake anybody.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import time

from buildgate import _flatjson, procs
from buildgate.errors import PermissionProblem, QueueTimeout, WouldBlock

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:  # the real thing for type checkers; see _records.py
    from dataclasses import asdict, dataclass, field, fields, replace
    from typing import Callable
else:
    from buildgate._records import asdict, dataclass, field, fields, replace

if TYPE_CHECKING:
    from buildgate._inotify import Inotify

WAITING = "waiting"
ADMITTED = "admitted"
STARTING = "starting"
RUNNING = "running"

#: How often a waiter re-checks when the only thing it waits for has no kernel
#: notification (leftovers kept with --keep-leftovers on cgroup v1).
_NO_EVENT_POLL = 10.0

#: A lock closed but still held is probed again after 1, 2, 4 ... ms; the
#: holder is mid-exit, so the first retry almost always sees it gone.  Twelve
#: retries span ~4 s, for a dying holder whose CPU the host took away.
_RECHECK_FIRST = 0.001
_RECHECKS = 12


@dataclass(frozen=True)
class Entry:
    seq: int
    pid: int
    pid_start: int | None
    boot: str
    uid: int
    name: str
    mem: int
    argv: str
    cwd: str
    state: str = WAITING
    t_enqueued: float = 0.0
    t_admitted: float | None = None
    scope: str | None = None
    cgroup: str | None = None
    main_pid: int | None = None
    main_start: int | None = None
    keep_leftovers: bool = False
    backend: str = "systemd"
    #: the user the build runs as (the helper's caller, or whoever ran buildgate)
    owner: str = ""
    #: Set by a scanner, not stored: the holder died but the build still runs.
    orphan: bool = field(default=False, compare=False)

    @property
    def holds_memory(self) -> bool:
        return self.state != WAITING

    @property
    def who(self) -> str:
        pid = self.main_pid if self.orphan and self.main_pid else self.pid
        owner = f", {self.owner}" if self.owner and self.owner != "root" else ""
        return f"{self.name} (pid {pid}{owner})"

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("orphan")
        return _flatjson.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Entry:
        data = _flatjson.loads(text)
        known = {k: v for k, v in data.items() if k in _FIELD_NAMES and k != "orphan"}
        return cls(**known)


_FIELD_NAMES = frozenset(f.name for f in fields(Entry))


@dataclass(frozen=True)
class Decision:
    """Why a ticket may or may not start now (pure data, see ``admission``)."""

    ok: bool
    ahead: tuple[Entry, ...]  # waiting tickets before this one
    holders: tuple[Entry, ...]  # tickets holding a reservation
    used: int
    budget: int
    mem: int

    @property
    def reason(self) -> str:
        if self.ok:
            return "ok"
        return "queue" if self.ahead else "memory"


def admission(entries: list[Entry], seq: int, mem: int, budget: int) -> Decision:
    """Strict FIFO: start when no earlier ticket still waits and the memory fits.

    A big ticket at the head is never overtaken by small ones behind it: those
    see it in ``ahead`` and wait too (no barging).
    """
    ahead = tuple(e for e in entries if e.seq < seq and not e.holds_memory)
    holders = tuple(e for e in entries if e.seq != seq and e.holds_memory)
    used = sum(e.mem for e in holders)
    ok = not ahead and used + mem <= budget
    return Decision(ok, ahead, holders, used, budget, mem)


# --------------------------------------------------------------------------
# the state directory


def _check_owned(path: str, st: os.stat_result, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise PermissionProblem(
            f"{what} {path} is a symlink: remove it (rm {path}) so buildgate can recreate it"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionProblem(f"{what} {path} is not a directory: remove it (rm {path})")
    if st.st_uid not in (0, os.geteuid()):
        raise PermissionProblem(
            f"{what} {path} is owned by uid {st.st_uid}, not root: chown root {path}"
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise PermissionProblem(
            f"{what} {path} is world-writable (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"chmod o-w {path}"
        )


def prepare_state_dir(path: str) -> None:
    """Create the state directory if needed and refuse one that is unsafe.

    Anyone who can write there can fake or delete tickets, so a symlink, a
    foreign owner or a world-writable mode is an error, not something to use.
    """
    for sub, what in ((path, "state directory"), (os.path.join(path, "q"), "queue directory")):
        try:
            os.mkdir(sub, 0o755)
        except FileExistsError:
            pass
        except FileNotFoundError:
            try:
                os.makedirs(sub, 0o755, exist_ok=True)
            except OSError as exc:
                raise PermissionProblem(
                    f"cannot create {what} {sub} ({exc.strerror}): create it (mkdir -p {sub}) "
                    f"or set state_dir in the config"
                ) from None
        except PermissionError:
            raise PermissionProblem(
                f"cannot create {what} {sub}: permission denied: run as root "
                f"(or ask the admin to run buildgate setup)"
            ) from None
        try:
            st = os.lstat(sub)
        except OSError as exc:
            raise PermissionProblem(f"cannot stat {what} {sub}: {exc.strerror}") from None
        _check_owned(sub, st, what)
        if not os.access(sub, os.W_OK | os.X_OK):
            raise PermissionProblem(
                f"cannot write to {what} {sub}: run as root (or as a member of its group)"
            )


class _Mutex:
    """flock(LOCK_EX) on the mutex file for a ``with`` block.  A class, not
    contextlib.contextmanager: contextlib costs every build ~5 ms to import."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = _open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionProblem(f"{path} is a symlink: remove it (rm {path})") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionProblem(f"cannot open {path}: permission denied: run as root") from None
        raise


class Queue:
    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.qdir = os.path.join(state_dir, "q")
        self.boot = procs.boot_id()

    # -- locking ------------------------------------------------------------

    def mutex(self) -> _Mutex:
        """``with queue.mutex():`` the queue's short critical sections."""
        return _Mutex(os.path.join(self.dir, "mutex"))

    # -- records ------------------------------------------------------------

    def _path(self, seq: int, ext: str) -> str:
        return os.path.join(self.qdir, f"{seq}.{ext}")

    def _write(self, entry: Entry) -> None:
        """Atomic replace; the temp file lives outside q/ so writing it wakes nobody."""
        tmp = os.path.join(self.dir, f".{entry.seq}.json.tmp")
        fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, entry.to_json().encode())
        finally:
            os.close(fd)
        os.rename(tmp, self._path(entry.seq, "json"))

    def _next_seq(self) -> int:
        path = os.path.join(self.dir, "seq")
        fd = _open_nofollow(path, os.O_RDWR | os.O_CREAT)
        try:
            raw = os.read(fd, 64).decode("ascii", "replace").strip()
            try:
                last = int(raw)
            except ValueError:
                last = 0
            # A lost or corrupt counter must never reuse a live number.
            existing = [int(n.split(".")[0]) for n in os.listdir(self.qdir) if n.split(".")[0].isdigit()]
            seq = max([last, *existing]) + 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, f"{seq}\n".encode())
            return seq
        finally:
            os.close(fd)

    def enter(self, **fields: object) -> Ticket:
        """Take the next place in the queue (state: waiting)."""
        with self.mutex():
            seq = self._next_seq()
            lock_fd = _open_nofollow(self._path(seq, "lock"), os.O_RDWR | os.O_CREAT | os.O_EXCL)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            me = os.getpid()
            fields.setdefault("uid", os.getuid())
            if not fields.get("owner"):
                fields["owner"] = _user_name(int(fields["uid"]))  # type: ignore[call-overload]
            entry = Entry(
                seq=seq,
                pid=me,
                pid_start=procs.starttime(me),
                boot=self.boot,
                t_enqueued=time.time(),
                **fields,  # type: ignore[arg-type]
            )
            self._write(entry)
        return Ticket(self, entry, lock_fd)

    # -- scanning -----------------------------------------------------------

    def _holder_alive(self, seq: int) -> bool:
        try:
            fd = os.open(self._path(seq, "lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # read-only close: IN_CLOSE_NOWRITE, which nobody watches
        return False

    def _remove(self, seq: int) -> None:
        for ext in ("json", "lock"):
            try:
                os.unlink(self._path(seq, ext))
            except FileNotFoundError:
                pass

    def scan(self, readonly: bool = False) -> tuple[list[Entry], list[Entry]]:
        """Live tickets in queue order, and orphans whose scopes need stopping.

        Call with the mutex held.  Dead tickets are deleted on the way, unless
        ``readonly`` (a non-root ``status``: records are replaced atomically, so
        a scan without the mutex still sees whole records).
        """
        for name in [] if readonly else os.listdir(self.dir):
            if name.endswith(".tmp"):  # a writer died between write and rename
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass
        live: list[Entry] = []
        to_reap: list[Entry] = []
        seqs = sorted({int(n.split(".")[0]) for n in os.listdir(self.qdir) if n.split(".")[0].isdigit()})
        for seq in seqs:
            try:
                with open(self._path(seq, "json"), encoding="utf-8") as fh:
                    entry: Entry | None = Entry.from_json(fh.read())
            except FileNotFoundError:
                entry = None
            except (ValueError, TypeError):
                entry = None
            if self._holder_alive(seq):
                if entry is not None:
                    live.append(entry)
                continue
            verdict = _orphan_verdict(entry, self.boot)
            if verdict == "reserved":
                assert entry is not None
                live.append(replace(entry, orphan=True))
            elif verdict == "reap":
                assert entry is not None
                live.append(replace(entry, orphan=True))  # reserved until its scope is gone
                to_reap.append(entry)
            elif not readonly:
                self._remove(seq)
        return live, to_reap

    def forget(self, seq: int) -> None:
        with self.mutex():
            self._remove(seq)

    def snapshot(self) -> tuple[list[Entry], list[Entry]]:
        if not os.access(self.dir, os.W_OK):
            return self.scan(readonly=True)
        with self.mutex():
            return self.scan()


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _orphan_verdict(entry: Entry | None, boot: str) -> str:
    """What to do with a ticket whose buildgate is gone: keep, reap or drop."""
    if entry is None or entry.boot != boot or entry.state in (WAITING, ADMITTED):
        return "drop"
    if procs.same_process_alive(entry.main_pid, entry.main_start):
        return "reserved"
    if entry.cgroup:
        from buildgate.cgroup import MemoryCgroup, detect_layout

        layout = detect_layout()
        if layout.version and MemoryCgroup(layout, entry.cgroup).populated():
            # Leftovers of a build whose buildgate died.  With --keep-leftovers
            # they keep the reservation until they end; otherwise they are
            # stopped, exactly as a live buildgate would have done.
            return "reserved" if entry.keep_leftovers else "reap"
    return "drop"


if TYPE_CHECKING:
    Progress = Callable[[Decision], None]


class Ticket:
    """This process's place in the queue; closing the lock fd gives it up."""

    def __init__(self, queue: Queue, entry: Entry, lock_fd: int) -> None:
        self.queue = queue
        self.entry = entry
        self.lock_fd: int | None = lock_fd
        self.legacy_fd: int | None = None
        self._inotify: Inotify | None = None

    @property
    def seq(self) -> int:
        return self.entry.seq

    def update(self, **changes: object) -> None:
        with self.queue.mutex():
            self.entry = replace(self.entry, **changes)  # type: ignore[arg-type]
            self.queue._write(self.entry)

    def release(self) -> None:
        """Leave the queue and free the reservation."""
        if self.lock_fd is None:
            return
        self.queue.forget(self.seq)
        self._close()

    def detach(self) -> None:
        """Stop holding the ticket but leave its record: the build's processes now
        keep the reservation alive (see ``_orphan_verdict``)."""
        self._close()

    def _close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        if self.legacy_fd is not None:
            os.close(self.legacy_fd)
            self.legacy_fd = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    # -- waiting ------------------------------------------------------------

    def _try_legacy(self, legacy_lock: str) -> bool:
        """Hold the legacy flock shared: plain ``flock L`` holders exclude us."""
        if self.legacy_fd is None:
            try:
                self.legacy_fd = os.open(legacy_lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise PermissionProblem(
                    f"cannot open legacy lock {legacy_lock} ({exc.strerror}): fix its "
                    f"permissions or set legacy_lock = \"\" in the config"
                ) from None
        try:
            fcntl.flock(self.legacy_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def wait(
        self,
        budget: int,
        deadline: float | None,
        legacy_lock: str = "",
        progress: Progress | None = None,
        refresh: float | None = None,
        reap: Callable[[Entry], bool] | None = None,
        wake_fds: tuple[int, ...] = (),
        on_wake: Callable[[], None] | None = None,
    ) -> Decision:
        """Block until this ticket may start; mark it admitted and return.

        ``deadline`` is a time.monotonic() value; 0 means do not wait at all
        (--no-wait).  Raises WouldBlock / QueueTimeout without ever admitting.
        """
        from buildgate._inotify import (
            IN_CLOSE_NOWRITE,
            IN_CLOSE_WRITE,
            IN_DELETE,
            IN_MOVED_TO,
            IN_Q_OVERFLOW,
            Inotify,
        )

        # The uncontended case needs no watch at all.  Otherwise each watch is
        # added *before* the scan that decides to sleep, so no change is missed.
        ino: Inotify | None = None
        q_wd = -1
        legacy_watched = False
        pidfds: dict[int, int] = {}
        last_key: object = None
        last_report = 0.0
        # Tickets whose lock was just closed for writing (IN_CLOSE_WRITE) while
        # the next scan still saw it held.  The kernel queues that event
        # *before* it drops the flock (__fput: fsnotify_close, then
        # locks_remove_file), so a waiter woken on another CPU can probe the
        # lock in between, see its holder "alive" and, the event consumed,
        # sleep forever behind a dead ticket.  Such a ticket is probed again
        # soon, with backoff, until its lock goes or RECHECKS run out (then it
        # really is alive: something else opened the lock file for writing).
        closed: set[int] = set()
        legacy_closed = False  # the same for the legacy lock (plain flock(1))
        legacy_wd = -1
        rechecks = 0
        try:
            while True:
                decision = None
                to_reap: list[Entry] = []
                legacy_blocked = False
                if ino is not None:
                    # Woken by a change in q/ (every waiter is, by every change):
                    # look without the mutex first, so that a crowd of waiters
                    # does not queue on it in front of the one that may start.
                    # Records are replaced atomically; a read-only scan deletes
                    # nothing, and only an admission needs the mutex.
                    live, to_reap = self.queue.scan(readonly=True)
                    decision = admission(live, self.seq, self.entry.mem, budget)
                    if decision.ok or to_reap:
                        decision = None
                if decision is None:
                    with self.queue.mutex():
                        live, to_reap = self.queue.scan()
                        decision = admission(live, self.seq, self.entry.mem, budget)
                        if decision.ok and legacy_lock and not self._try_legacy(legacy_lock):
                            legacy_blocked = True
                        if decision.ok and not legacy_blocked:
                            self.entry = replace(self.entry, state=ADMITTED, t_admitted=time.time())
                            self.queue._write(self.entry)
                            return decision
                reaped = False
                unreapable = False
                for entry in to_reap:
                    # Outside the mutex: stopping a scope can take seconds.
                    if reap is not None and reap(entry):
                        self.queue.forget(entry.seq)
                        reaped = True
                    else:
                        unreapable = True
                if reaped:
                    continue
                if closed or legacy_closed:
                    closed.intersection_update(e.seq for e in live if not e.orphan)
                    legacy_closed = legacy_closed and legacy_blocked
                    if (closed or legacy_closed) and rechecks < _RECHECKS:
                        rechecks += 1
                    else:
                        closed.clear()
                        legacy_closed = False
                        rechecks = 0
                if legacy_blocked:
                    decision = replace(decision, holders=(*decision.holders, _legacy_holder(legacy_lock)))
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    if deadline == 0:
                        raise WouldBlock(describe(decision, "cannot start now"))
                    raise QueueTimeout(now, describe(decision, "gave up waiting"))
                key = (decision.reason, [e.seq for e in decision.ahead], [(e.seq, e.orphan) for e in decision.holders])
                if progress is not None and (key != last_key or (refresh and now - last_report >= refresh)):
                    progress(decision)
                    last_key, last_report = key, now

                # -- sleep until something that matters happens ----------
                if ino is None:
                    ino = self._inotify = Inotify()
                    q_wd = ino.add(self.queue.qdir, IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE)
                    continue
                if legacy_blocked and not legacy_watched:
                    # plain flock(1) opens read-only: its exit is IN_CLOSE_NOWRITE
                    legacy_wd = ino.add(legacy_lock, IN_CLOSE_WRITE | IN_CLOSE_NOWRITE)
                    legacy_watched = True
                    continue
                rlist: list[int] = [ino.fileno(), *wake_fds]
                timeout: float | None = _NO_EVENT_POLL if unreapable else None
                for e in decision.holders:
                    if e.orphan and e.main_pid:
                        if e.main_pid not in pidfds:
                            fd = procs.pidfd(e.main_pid)
                            if fd is not None:
                                pidfds[e.main_pid] = fd
                        if e.main_pid in pidfds:
                            rlist.append(pidfds[e.main_pid])
                        else:
                            timeout = _NO_EVENT_POLL
                    elif e.orphan:  # kept leftovers: no portable exit notification
                        timeout = _NO_EVENT_POLL
                if refresh:
                    timeout = min(timeout or refresh, refresh)
                if closed or legacy_closed:
                    again = _RECHECK_FIRST * 2 ** (rechecks - 1)
                    timeout = again if timeout is None else min(timeout, again)
                if deadline is not None:
                    left = max(0.0, deadline - time.monotonic())
                    timeout = left if timeout is None else min(timeout, left)
                # Behind another waiter, only that waiter can unblock us: it is
                # admitted (its record is renamed in), leaves or dies (its
                # record or lock goes, its lock is closed).  Every other change
                # (builds ending, tickets joining behind us) is not for us, so
                # 20 queued builds do not all rescan at every handoff.
                watch = f"{decision.ahead[-1].seq}." if decision.ahead and not legacy_blocked else None
                wake_at = None if timeout is None else time.monotonic() + timeout
                while True:
                    ready = select.select(rlist, [], [], timeout)[0]
                    events = ino.read()
                    if on_wake is not None:
                        on_wake()  # e.g. the privileged helper's caller hung up: may raise
                    wake = watch is None or ready != [ino.fileno()]
                    for wd, mask, name in events:
                        if wd != q_wd or mask & IN_Q_OVERFLOW:
                            wake = True
                            legacy_closed = legacy_closed or wd == legacy_wd
                        elif watch is None or name.startswith(watch):
                            wake = True
                            if mask & IN_CLOSE_WRITE and name.endswith(".lock") and name[:-5].isdigit():
                                closed.add(int(name[:-5]))
                    if wake:
                        break
                    if wake_at is not None:
                        timeout = wake_at - time.monotonic()
                        if timeout <= 0:
                            break
        finally:
            # Closing an inotify fd waits for an RCU grace period (~10 ms): not
            # now, on the way to starting the build, but in _close().
            for fd in pidfds.values():
                os.close(fd)


def _legacy_holder(path: str) -> Entry:
    return Entry(
        seq=-1, pid=0, pid_start=None, boot="", uid=-1, name=f"flock {path}", mem=0,
        argv="", cwd="", state=RUNNING,
    )


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe(decision: Decision, lead: str = "waiting") -> str:
    """One line: what this ticket waits for and who holds the memory."""
    from buildgate.sizes import format_size

    now = time.time()
    parts = []
    for e in decision.holders:
        if e.seq < 0:
            parts.append(f"{e.name} (a plain flock holder)")
            continue
        since = e.t_admitted or e.t_enqueued
        extra = ", buildgate gone" if e.orphan else ""
        parts.append(f"{e.who} {format_size(e.mem)} running {format_duration(now - since)}{extra}")
    held = "; ".join(parts) if parts else "nothing"
    text = (
        f"{lead}: needs {format_size(decision.mem)}, "
        f"{format_size(decision.used)} of {format_size(decision.budget)} reserved by {held}"
    )
    if decision.ahead:
        first = decision.ahead[0]
        text += f"; {len(decision.ahead)} ahead in the queue (next: {first.who} {format_size(first.mem)})"
    return text
