"""``buildgate run``: wait for a place, then run the build in a capped scope.

Order of events (each step's failure leaves nothing running and nothing held):

1. validate input, read config, work out the budget (no systemd bytes yet);
2. take a ticket and wait for admission (queue.py) - cheap and interruptible;
3. fork the build's main process, which blocks on a pipe before exec;
4. record its pid in the ticket (from here a crash of buildgate cannot free
   the reservation while the build runs), create the transient scope with
   that pid in it and wait for the start job: only then release the child,
   so the command never runs for an instant outside its cap;
5. wait for the main process, forwarding nothing: SIGINT/SIGTERM to
   buildgate stop the whole scope instead;
6. read peak and OOM kills from the scope's cgroup, stop the scope so
   leftovers die, free the reservation.

A tiny *keeper* process sits in the scope next to the build: it pins the
cgroup so its counters can still be read after the build's last process exited
(systemd removes an empty scope's cgroup at once).  It ignores SIGTERM, cannot
be chosen by the OOM killer and exits when buildgate closes its pipe or dies.
"""

from __future__ import annotations

import errno
import os
import select
import time

from buildgate import procs
from buildgate.config import Config
from buildgate.errors import (
    CommandNotExecutable,
    CommandNotFound,
    InternalFailure,
    Interrupted,
    PermissionProblem,
    ReservationTooLarge,
    UsageError,
)
from buildgate.queue import RUNNING, STARTING, Entry, Queue, describe, prepare_state_dir
from buildgate.sizes import format_size, parse_size

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:
    import signal
else:  # the C module: `signal` wraps it in enums, ~7 ms of every build (enum)
    import _signal as signal
if TYPE_CHECKING:  # the real thing for type checkers; see _records.py
    from dataclasses import dataclass, field
    from typing import Any, Callable
else:
    from buildgate._records import dataclass, field

if TYPE_CHECKING:
    from buildgate.cgroup import MemoryCgroup

# A set, not a regex: importing re costs every build ~10 ms (docs/benchmarks.md).
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class RunRequest:
    argv: list[str]
    mem: str | None = None
    wait: float | None = None  # None: the config's default
    no_wait: bool = False
    name: str | None = None
    keep_leftovers: bool = False
    backend: str | None = None  # None: the config's (auto by default)


@dataclass
class RunResult:
    exit_code: int
    name: str
    scope: str
    mem: int
    waited: float
    ran: float
    status: int  # os.waitstatus_to_exitcode: negative for a signal
    peak: int | None
    oom_kills: int
    leftovers: int
    interrupted: int | None = None
    kept_leftovers: bool = False
    capped: bool = True

    @property
    def capped_kill(self) -> bool:
        return self.oom_kills > 0 and self.status != 0


@dataclass
class Hooks:
    """How the caller (cli.py) hears about progress; core never prints."""

    waiting: Callable[[str], None] | None = None
    refresh: float | None = None
    admitted: Callable[[str, float], None] | None = None
    warn: Callable[[str], None] | None = None


def default_name(argv: list[str]) -> str:
    """``npx astro build`` -> ``npx``; ``./node_modules/.bin/vite`` -> ``vite``."""
    base = os.path.basename(argv[0]) or "build"
    cleaned = "".join(c if c in _NAME_CHARS else "_" for c in base)[:40]
    return cleaned or "build"


def check_name(name: str) -> str:
    if not 1 <= len(name) <= 64 or not _NAME_CHARS.issuperset(name):
        raise UsageError(
            f"invalid --name {name!r}: use 1-64 letters, digits, '_', '.', ':' or '-' "
            f"(it becomes part of a systemd unit name)"
        )
    return name


def scope_properties(cfg: Config, mem: int, description: str, cgroup_version: int) -> list:
    from buildgate.systemd import Prop

    props = [
        Prop("Description", "s", description),
        Prop("Slice", "s", cfg.slice),
        Prop("MemoryAccounting", "b", True),
        Prop("MemoryMax", "t", mem),
        # With swap, MemoryMax alone lets a build spill into swap instead of
        # being killed; the host then swaps itself to death (the incident).
        Prop("MemorySwapMax", "t", 0),
        Prop("CPUWeight", "t", cfg.cpu_weight),
        Prop("IOWeight", "t", cfg.io_weight),
        Prop("TasksAccounting", "b", True),
        Prop("TasksMax", "t", cfg.tasks_max),
        Prop("CollectMode", "s", "inactive-or-failed"),
        Prop("TimeoutStopUSec", "t", int(cfg.stop_timeout * 1_000_000)),
        Prop("SendSIGKILL", "b", True),
    ]
    if cgroup_version == 2:
        # Reclaim pressure a little before the hard cap: the build slows down
        # instead of being killed for a short spike.  (v1 has no equivalent.)
        props.append(Prop("MemoryHigh", "t", mem - max(mem // 16, 4 * 1024**2)))
    return props


class _Signals:
    """SIGINT/SIGTERM/SIGHUP: raise while waiting, just note them while running."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.raising = True
        self._old: dict[int, Any] = {}
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.wfd, False)
        os.set_blocking(self.rfd, False)

    def _handler(self, signum: int, frame: object) -> None:
        if self.pending is None:
            self.pending = signum
        if self.raising:
            raise Interrupted(signum, f"interrupted by {_signame(signum)} while waiting; the build never ran")

    def __enter__(self) -> _Signals:
        for sig in _HANDLED:
            self._old[sig] = signal.signal(sig, self._handler)
        self._old_wakeup = signal.set_wakeup_fd(self.wfd)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self.rfd)
        os.close(self.wfd)


def _child(argv: list[str], env: dict[str, str], go_r: int, err_w: int, wakeup_fd: int,
           legacy_fd: int | None) -> None:
    """The build's main process, before exec.  Never returns."""
    try:
        if legacy_fd is not None:
            # The build's processes hold the shared legacy lock too, so a plain
            # `flock` script stays excluded even if buildgate itself is killed
            # mid-build.  It cannot leak: every process in the scope dies when
            # the scope is stopped.
            os.set_inheritable(legacy_fd, True)
        signal.set_wakeup_fd(-1)
        os.close(wakeup_fd)
        # Python ignores SIGPIPE and SIGXFSZ; exec keeps ignored signals, and a
        # build with SIGPIPE ignored behaves differently (`yes | head` never ends).
        for sig in (*_HANDLED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        go = os.read(go_r, 1)
        if go != b"1":  # buildgate died or gave up before the scope existed
            os._exit(125)
        _execvpe(argv[0], argv, env)
    except OSError as exc:
        try:
            os.write(err_w, f"{exc.errno}".encode())
        finally:
            os._exit(127 if exc.errno == errno.ENOENT else 126)
    except BaseException:
        pass
    os._exit(125)


def _signame(signum: int) -> str:
    """SIGTERM for 15; imports the signal module (and enum) only for messages."""
    import signal as with_names

    try:
        return with_names.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _execvpe(file: str, argv: list[str], env: dict[str, str]) -> None:
    """os.execvpe without its ``import warnings`` (os.get_exec_path's, ~1.6 ms
    between the scope's start and the build's): the same PATH search, and the
    same error when nothing runs (the first that is not "no such file", else
    the last), which _child maps to 126/127."""
    if os.path.dirname(file):
        os.execve(file, argv, env)
    first: OSError | None = None
    last: OSError | None = None
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        try:
            os.execve(os.path.join(directory, file), argv, env)
        except (FileNotFoundError, NotADirectoryError) as exc:
            last = exc
        except OSError as exc:
            last = exc
            first = first or exc
    raise first or last or FileNotFoundError(errno.ENOENT, "empty PATH", file)


def _keeper(pipe_r: int) -> None:
    """Pins the scope's cgroup until buildgate has read its counters."""
    try:
        for sig in (*_HANDLED, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write("-1000")
        except OSError:
            pass
        os.closerange(3, pipe_r)
        os.closerange(pipe_r + 1, 1 << 16)
        while True:
            try:
                os.read(pipe_r, 1)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
    finally:
        os._exit(0)


@dataclass
class _Launch:
    pid: int
    keeper: int
    keeper_w: int
    scope: str
    cgroup: MemoryCgroup | None = None
    started: float = 0.0
    counters: dict = field(default_factory=dict)
    #: set once waitpid() returned for pid: its number may belong to someone else now
    reaped: bool = False


def run(cfg: Config, req: RunRequest, hooks: Hooks | None = None) -> RunResult:
    hooks = hooks or Hooks()
    if not req.argv:
        raise UsageError("no command given: buildgate run [OPTIONS] -- COMMAND [ARGS...]")
    name = check_name(req.name) if req.name else default_name(req.argv)
    if req.mem is not None:
        parse_size(req.mem, percent_of=1 << 40)  # syntax first: a typo beats a systemd error

    if os.geteuid() != 0:
        # Only root may create scopes and write the queue; everyone else goes
        # through the privileged helper, which checks who they are.
        return _run_via_helper(cfg, req, hooks, name)

    from buildgate import backends
    from buildgate import budget as budget_mod

    backend = backends.make(backends.probe(cfg, req.backend), cfg)
    total = budget_mod.mem_total()
    budget = budget_mod.resolve_budget(cfg, total, backend.slice_max())
    mem = parse_size(req.mem, percent_of=budget.bytes) if req.mem is not None else budget.bytes
    if mem > budget.bytes:
        raise ReservationTooLarge(mem, budget.bytes, budget.source)
    if not backend.capped and hooks.warn:
        hooks.warn(
            "no cgroup can be written here: this build runs UNCAPPED (lock-only mode, "
            "queue and reservation only); see `buildgate doctor`"
        )

    prepare_state_dir(cfg.state_dir)
    queue = Queue(cfg.state_dir)
    wait_s = cfg.wait if req.wait is None else req.wait
    t0 = time.monotonic()
    deadline: float | None = 0.0 if req.no_wait else t0 + wait_s

    argv_text = " ".join(req.argv)
    with _Signals() as sigs:
        ticket = queue.enter(name=name, mem=mem, argv=argv_text[:500], cwd=os.getcwd(),
                             keep_leftovers=req.keep_leftovers, backend=backend.name)
        try:
            progress = (lambda d: hooks.waiting(describe(d))) if hooks.waiting else None  # type: ignore[misc]
            ticket.wait(budget.bytes, deadline, cfg.legacy_lock, progress, hooks.refresh,
                        reap=lambda e: _reap(e, cfg))
            waited = time.monotonic() - t0
            scope = f"buildgate-{name}-{ticket.seq}.scope"
            if hooks.admitted:
                hooks.admitted(scope, waited)

            # From here on a signal is handled in order, not by unwinding.
            sigs.raising = False
            if sigs.pending is not None:
                raise Interrupted(sigs.pending, f"interrupted by {_signame(sigs.pending)} before the build started")
            backend.connect()
            if not backend.capped:
                from buildgate.backends import set_child_subreaper

                set_child_subreaper()  # so leftovers can be found and stopped
            launch = _launch(backend, req, ticket, scope, mem, sigs)
            try:
                ticket.update(state=RUNNING, cgroup=launch.cgroup.path if launch.cgroup else None)
                _release_child(launch, req.argv)
                status = _wait_main(backend, launch, sigs)
            except BaseException:
                _kill_launch(backend, launch)
                raise
            ran = time.monotonic() - launch.started
            return _finish(backend, req, ticket, launch, name, mem, waited, ran, status, sigs.pending)
        finally:
            if ticket.lock_fd is not None:
                ticket.release()
            backend.close()


def _connect_helper(cfg: Config):
    import grp
    import pwd
    import socket

    from buildgate.helper import Conn

    user = pwd.getpwuid(os.getuid()).pw_name if _has_user() else str(os.getuid())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(cfg.helper_socket)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise PermissionProblem(
            f"not allowed: only root can run builds here ({cfg.helper_socket} is missing): "
            f"ask an admin to run `buildgate setup` and add {user} to group {cfg.group}"
        ) from None
    except PermissionError:
        sock.close()
        try:
            grp.getgrnam(cfg.group)
        except KeyError:
            pass
        raise PermissionProblem(f"not allowed: add {user} to group {cfg.group} (then log in again)") from None
    return Conn(sock)


def _has_user() -> bool:
    import pwd

    try:
        pwd.getpwuid(os.getuid())
        return True
    except KeyError:
        return False


def _run_via_helper(cfg: Config, req: RunRequest, hooks: Hooks, name: str) -> RunResult:
    """The caller's half of a non-root build (see helper.py for the protocol)."""
    import fcntl

    from buildgate.helper import raise_error

    conn = _connect_helper(cfg)
    t0 = time.monotonic()
    conn.send({"op": "run", "argv": req.argv, "name": name, "mem": req.mem, "wait": req.wait,
               "no_wait": req.no_wait, "keep_leftovers": req.keep_leftovers, "cwd": os.getcwd(),
               "refresh": hooks.refresh})
    legacy_fd = None
    with _Signals() as sigs:
        try:
            while True:  # queued: a signal unwinds, and hanging up leaves the queue
                msg = conn.recv(timeout=None)
                if msg is None:
                    raise InternalFailure("the buildgate helper hung up: see `journalctl -u 'buildgate-helper@*'`")
                event = msg.get("event")
                if event == "error":
                    raise_error(msg)
                elif event == "waiting" and hooks.waiting:
                    hooks.waiting(str(msg.get("line")))
                elif event == "warning" and hooks.warn:
                    hooks.warn(str(msg.get("line")))
                elif event == "admitted":
                    break
            waited = time.monotonic() - t0
            scope, mem = str(msg["scope"]), int(msg["mem"])
            capped = bool(msg.get("capped", True))
            if hooks.admitted:
                hooks.admitted(scope, waited)
            sigs.raising = False
            if sigs.pending is not None:
                raise Interrupted(sigs.pending, f"interrupted by {_signame(sigs.pending)} before the build started")
            if cfg.legacy_lock:  # the helper holds it; our build holds it too (see _child)
                try:
                    legacy_fd = os.open(cfg.legacy_lock, os.O_RDONLY | os.O_CLOEXEC)
                    fcntl.flock(legacy_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    if legacy_fd is not None:
                        os.close(legacy_fd)
                    legacy_fd = None
            env = _build_env(scope, mem, int(msg.get("ticket", 0)), msg.get("t_admitted"))
            launch = _fork_build(req.argv, env, sigs, legacy_fd, keeper=capped)
            try:
                conn.send({"op": "pids", "main": launch.pid, "keeper": launch.keeper})
                reply = conn.recv(timeout=120)
                if reply is None:
                    raise InternalFailure("the buildgate helper hung up before the build started")
                if reply.get("event") == "error":
                    raise_error(reply)
                _release_child(launch, req.argv)
                status = _wait_main_remote(conn, launch, sigs)
            except BaseException:
                _kill_children(launch)
                raise
            ran = time.monotonic() - launch.started
            exited = conn.recv(timeout=120) or {}
            _close_keeper(launch)
            conn.send({"op": "keeper-closed"})
            done = conn.recv(timeout=cfg.stop_timeout + 120) or {}
        finally:
            conn.sock.close()
            if legacy_fd is not None:
                os.close(legacy_fd)
    oom = int(exited.get("oom_kills") or 0)
    interrupted = sigs.pending
    if interrupted is not None:
        code = 128 + interrupted
    elif oom and status != 0:
        code = 137
    elif status < 0:
        code = 128 - status
    else:
        code = status
    peak = exited.get("peak")
    return RunResult(
        exit_code=code, name=name, scope=scope, mem=mem, waited=waited, ran=ran, status=status,
        peak=int(peak) if peak is not None else None, oom_kills=oom,
        leftovers=int(done.get("leftovers") or 0), interrupted=interrupted,
        kept_leftovers=bool(done.get("kept")), capped=capped,
    )


def _wait_main_remote(conn, launch: _Launch, sigs: _Signals) -> int:
    """Wait for our build's main process; on a signal ask the helper to stop the scope."""
    pfd = procs.pidfd(launch.pid)
    asked = False
    try:
        while True:
            if sigs.pending is not None and not asked:
                asked = True
                _close_keeper(launch)  # it ignores SIGTERM: let it go first
                conn.send({"op": "stop"})
            rlist = [sigs.rfd] + ([pfd] if pfd is not None else [])
            ready, _, _ = select.select(rlist, [], [], None if pfd is not None else 0.2)
            if sigs.rfd in ready:
                try:
                    os.read(sigs.rfd, 64)
                except BlockingIOError:
                    pass
            if pfd is not None and pfd not in ready:
                continue
            done, status = os.waitpid(launch.pid, os.WNOHANG if pfd is None else 0)
            if done:
                launch.reaped = True
                return os.waitstatus_to_exitcode(status)
    finally:
        if pfd is not None:
            os.close(pfd)


def _kill_children(launch: _Launch) -> None:
    for key in ("go_w", "err_r"):
        fd = launch.counters.pop(key, None)
        if fd is not None:
            os.close(fd)
    if not launch.reaped:
        try:
            os.kill(launch.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(launch.pid, 0)
        except ChildProcessError:
            pass
        launch.reaped = True
    _close_keeper(launch)


def _build_env(scope: str, mem: int, seq: int, t_admitted: float | None) -> dict[str, str]:
    # What the build may want to know, e.g. to size its parallelism to its cap
    # (NODE_OPTIONS=--max-old-space-size, make -j).
    env = dict(os.environ)
    env.update(
        BUILDGATE_SCOPE=scope,
        BUILDGATE_MEM=str(mem),
        BUILDGATE_TICKET=str(seq),
        BUILDGATE_ADMITTED=f"{t_admitted or time.time():.6f}",
    )
    return env


def _fork_build(argv: list[str], env: dict[str, str], sigs: _Signals, legacy_fd: int | None,
                keeper: bool) -> _Launch:
    """Fork the build's main process (blocked until released) and the keeper."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        _child(argv, env, go_r, err_w, sigs.wfd, legacy_fd)
    keeper_pid, keep_w = -1, -1
    if keeper:
        keep_r, keep_w = os.pipe()
        keeper_pid = os.fork()
        if keeper_pid == 0:  # pragma: no cover - runs in the keeper
            _keeper(keep_r)
        os.close(keep_r)
    for fd in (go_r, err_w):
        os.close(fd)
    launch = _Launch(pid=pid, keeper=keeper_pid, keeper_w=keep_w, scope=env["BUILDGATE_SCOPE"])
    launch.counters["go_w"] = go_w
    launch.counters["err_r"] = err_r
    return launch


def _launch(backend, req: RunRequest, ticket, scope: str, mem: int, sigs: _Signals) -> _Launch:
    env = _build_env(scope, mem, ticket.seq, ticket.entry.t_admitted)
    launch = _fork_build(req.argv, env, sigs, ticket.legacy_fd, keeper=backend.capped)
    try:
        # Record the main pid before the scope exists: if buildgate dies from
        # here on, the reservation stays as long as this process lives.
        ticket.update(state=STARTING, scope=scope, main_pid=launch.pid, main_start=procs.starttime(launch.pid))
        description = f"buildgate: {' '.join(req.argv)}"[:200]
        pids = [launch.pid] + ([launch.keeper] if launch.keeper > 0 else [])
        launch.cgroup = backend.start(scope, pids, mem, description)
    except BaseException:
        _kill_launch(backend, launch, scope_started=False)
        raise
    return launch


def _release_child(launch: _Launch, argv: list[str]) -> None:
    go_w = launch.counters.pop("go_w")
    err_r = launch.counters.pop("err_r")
    os.write(go_w, b"1")
    os.close(go_w)
    data = b""
    while True:  # EOF: exec succeeded (err_w was close-on-exec); else an errno
        chunk = os.read(err_r, 64)
        if not chunk:
            break
        data += chunk
    os.close(err_r)
    launch.started = time.monotonic()
    if data:
        os.waitpid(launch.pid, 0)
        launch.reaped = True
        code = int(data.decode() or 0)
        if code == errno.ENOENT:
            raise CommandNotFound(argv[0])
        raise CommandNotExecutable(argv[0], os.strerror(code))


def _wait_main(backend, launch: _Launch, sigs: _Signals) -> int:
    """Wait for the build's main process; on SIGINT/SIGTERM stop the scope."""
    from buildgate._inotify import IN_MODIFY, Inotify

    pfd = procs.pidfd(launch.pid)
    ino = None
    cg = launch.cgroup
    if cg is not None and cg.layout.version == 2:
        # systemd may stop (and remove) a v2 scope right after an OOM kill, so
        # note the counters as they change rather than only at the end.
        try:
            ino = Inotify()
            ino.add(os.path.join(cg.dir, "memory.events"), IN_MODIFY)
        except OSError:
            ino = None
    stopping = False
    try:
        while True:
            if sigs.pending is not None and not stopping:
                stopping = True
                _note_counters(launch)
                _close_keeper(launch)  # it ignores SIGTERM: let it go first
                backend.stop(launch.scope, launch.cgroup.path if launch.cgroup else None)
            rlist = [sigs.rfd] + ([pfd] if pfd is not None else []) + ([ino.fileno()] if ino else [])
            timeout = None if pfd is not None else 0.2  # no pidfd (old kernel): poll waitpid
            ready, _, _ = select.select(rlist, [], [], timeout)
            if sigs.rfd in ready:
                try:
                    os.read(sigs.rfd, 64)
                except BlockingIOError:
                    pass
            if ino is not None and ino.fileno() in ready:
                ino.drain()
                _note_counters(launch)
            if pfd is not None and pfd not in ready:
                continue
            done, status = os.waitpid(launch.pid, os.WNOHANG if pfd is None else 0)
            if done:
                launch.reaped = True
                return os.waitstatus_to_exitcode(status)
    finally:
        if pfd is not None:
            os.close(pfd)
        if ino is not None:
            ino.close()


def _note_counters(launch: _Launch) -> None:
    cg = launch.cgroup
    if cg is None:
        return
    kills = cg.oom_kills()
    peak = cg.peak()
    if kills is not None:
        launch.counters["oom"] = max(kills, launch.counters.get("oom", 0))
    if peak is not None:
        launch.counters["peak"] = max(peak, launch.counters.get("peak", 0))


def _finish(backend, req, ticket, launch, name, mem, waited, ran, status, interrupted) -> RunResult:
    _note_counters(launch)
    cg = launch.cgroup
    if cg is not None:
        leftovers = len([p for p in cg.pids() if p not in (launch.keeper, launch.pid)])
    elif not backend.capped:
        from buildgate.backends import descendants

        leftovers = len(descendants(os.getpid()))
    else:
        leftovers = 0
    kept = False
    if req.keep_leftovers and leftovers and interrupted is None:
        kept = True
        _close_keeper(launch)
        # The leftovers now keep the reservation (queue._orphan_verdict).
        ticket.detach()
    else:
        # The keeper ignores SIGTERM; stopping with it inside would cost a full
        # stop_timeout before SIGKILL.  The counters are read, so let it go.
        _close_keeper(launch)
        if leftovers == 0 and (cg is not None or not backend.capped):
            # Nothing of the build is left to use memory (and nothing can fork
            # into an empty cgroup): the next build may start now, while
            # systemd tears the empty scope down.  This is the handoff's
            # critical path.
            ticket.release()
            backend.stop(launch.scope, cg.path if cg else None, wait=False)
        else:
            backend.stop(launch.scope, cg.path if cg else None)
    oom = launch.counters.get("oom", 0)
    if interrupted is not None:
        code = 128 + interrupted
    elif oom and status != 0:
        code = 137
    elif status < 0:
        code = 128 - status
    else:
        code = status
    return RunResult(
        exit_code=code, name=name, scope=launch.scope, mem=mem, waited=waited, ran=ran,
        status=status, peak=launch.counters.get("peak"), oom_kills=oom, leftovers=leftovers,
        interrupted=interrupted, kept_leftovers=kept, capped=backend.capped,
    )


def _close_keeper(launch: _Launch) -> None:
    if launch.keeper_w >= 0 and launch.keeper > 0:
        os.close(launch.keeper_w)
        launch.keeper_w = -1
        try:
            os.waitpid(launch.keeper, 0)
        except ChildProcessError:
            pass


def _kill_launch(backend, launch: _Launch, scope_started: bool = True) -> None:
    """Undo a launch that failed half-way: nothing may keep running."""
    for key in ("go_w", "err_r"):
        fd = launch.counters.pop(key, None)
        if fd is not None:
            os.close(fd)  # the child sees EOF and exits without exec
    if not launch.reaped:
        try:
            os.kill(launch.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(launch.pid, 0)
        except ChildProcessError:
            pass
        launch.reaped = True
    _close_keeper(launch)
    if scope_started:
        try:  # anything the build started before it failed goes too
            backend.stop(launch.scope, launch.cgroup.path if launch.cgroup else None)
        except Exception:
            pass


def _reap(entry: Entry, cfg: Config) -> bool:
    """Stop the scope of a build whose buildgate died and whose main process
    ended: its leftovers die and its reservation is freed."""
    if not entry.scope:
        return True
    from buildgate.backends import make

    backend = make(entry.backend, cfg)
    try:
        backend.stop(entry.scope, entry.cgroup)
        return True
    except Exception:
        return False
    finally:
        backend.close()


def summary(res: RunResult) -> str:
    """The one-line report printed after every build."""
    from buildgate.queue import format_duration

    cap = format_size(res.mem)
    peak = format_size(res.peak) if res.peak is not None else "unknown"
    head = f"{res.name}: waited {format_duration(res.waited)}, ran {format_duration(res.ran)}, peak {peak} of {cap} cap"
    if res.interrupted is not None:
        result = f"interrupted by {_signame(res.interrupted)}: stopped the whole scope"
    elif res.capped_kill:
        result = (f"killed by its {cap} memory cap, peak {peak}: raise --mem or lower "
                  f"the build's parallelism")
    elif res.status < 0:
        result = f"killed by {_signame(-res.status)}"
    elif res.status == 0:
        result = "ok"
    else:
        result = f"failed with exit {res.status}"
    if res.oom_kills and not res.capped_kill:
        result += f" (its cap OOM-killed {res.oom_kills} process(es) on the way)"
    if not res.capped:
        result += " (UNCAPPED: lock-only mode)"
    if res.kept_leftovers:
        result += f"; kept {res.leftovers} leftover process(es) in {res.scope}, which hold the reservation"
    elif res.leftovers:
        result += f"; stopped {res.leftovers} leftover process(es)"
    return f"{head}; {result}"
