"""The privileged half of non-root builds (``buildgate helper``).

systemd listens on ``/run/buildgate/helper.sock`` (mode 0660, group
``buildgate``) and starts one root instance of this per connection, with the
connection on stdin (``Accept=yes``).  The caller is whoever ``SO_PEERCRED``
says it is — never what its messages claim.  The helper owns everything a
caller must not touch: the queue (its files are root's), the budget and slice
(root's config only), the scope and its cap.  The caller owns only its own
processes: it forks the build as itself, and the helper checks that the pids it
is asked to put in a scope are the caller's own children, not yet exec'd.

Protocol: one JSON object per line, both ways.

    caller -> {"op": "run", "argv": [...], "name", "mem", "wait", "no_wait", "keep_leftovers", "cwd", "refresh"}
    helper -> {"event": "waiting", "line": "..."} ...  (while queued)
    helper -> {"event": "admitted", "scope", "mem", "ticket", "t_admitted", "waited", "capped"}
    caller -> {"op": "pids", "main": PID, "keeper": PID}
    helper -> {"event": "started", "cgroup": PATH}
    caller -> {"op": "stop"}                       (on SIGINT/SIGTERM)
    helper -> {"event": "exited", "oom_kills", "peak"}   (build's main process ended)
    caller -> {"op": "keeper-closed"}
    helper -> {"event": "done", "leftovers", "kept"}
    helper -> {"event": "error", "kind": "UsageError"|..., "message": "..."}  (at any point)

If the caller hangs up while queued, its ticket goes.  If it dies while the
build runs, the helper still holds the reservation until the build's main
process ends and then stops the scope, as a live buildgate would.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time

from buildgate import errors
from buildgate.errors import BuildgateError, InternalFailure, PermissionProblem, UsageError

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:
    from typing import Any

MAX_LINE = 256 * 1024
_KINDS = {
    cls.__name__: cls
    for cls in (
        errors.UsageError, errors.ConfigError, errors.PermissionProblem, errors.Unavailable,
        errors.WouldBlock, errors.InternalFailure,
    )
}


class ClientGone(Exception):
    pass


class Conn:
    """Newline-delimited JSON over a stream socket, with bounds on size and time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, obj: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError:
            self.closed = True

    def recv(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message; None at EOF; ClientGone-free: callers decide."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                raise UsageError("the other side of the buildgate helper socket said nothing in time")
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise UsageError("message too long on the buildgate helper socket")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            obj = json.loads(line)
        except ValueError:
            raise UsageError("malformed message on the buildgate helper socket") from None
        if not isinstance(obj, dict):
            raise UsageError("malformed message on the buildgate helper socket")
        return obj

    def hung_up(self) -> bool:
        """Non-blocking: has the peer closed the connection?"""
        if self.closed:
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        if not ready:
            return False
        try:
            data = self.sock.recv(65536, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            self.closed = True
        return self.closed


def raise_error(msg: dict[str, Any]) -> None:
    """Caller side: turn an error event back into the same error class."""
    text = str(msg.get("message") or "the buildgate helper failed")
    if msg.get("kind") == "QueueTimeout":
        raise errors.QueueTimeout(0.0, text)
    cls = _KINDS.get(str(msg.get("kind")), InternalFailure)
    exc = cls.__new__(cls)
    BuildgateError.__init__(exc, text)  # the message as the helper worded it
    raise exc


def error_event(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, errors.QueueTimeout):
        return {"event": "error", "kind": "QueueTimeout", "message": str(exc)}
    for name, cls in _KINDS.items():
        if isinstance(exc, cls):
            return {"event": "error", "kind": name, "message": str(exc)}
    return {"event": "error", "kind": "InternalFailure", "message": f"buildgate helper: {type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------
# the server


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def parse_status(text: str) -> dict[str, list[int]]:
    """/proc/PID/status -> the numeric lists we need (Uid, Gid, Groups, PPid)."""
    result: dict[str, list[int]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "PPid"):
            result[key] = [int(v) for v in value.split()]
    return result


def _status(pid: int) -> dict[str, list[int]]:
    from buildgate.cgroup import PROC_ROOT

    try:
        with open(os.path.join(PROC_ROOT, str(pid), "status")) as fh:
            return parse_status(fh.read())
    except OSError:
        return {}


def group_id(name: str) -> int | None:
    import grp

    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def caller_allowed(peer_pid: int, uid: int, group: str) -> bool:
    """Root, or a process that really has the group (primary or supplementary).

    The kernel's view of the caller's groups, not /etc/group: a user added to
    the group must log in again before it counts, exactly like file access.
    """
    if uid == 0:
        return True
    gid = group_id(group)
    if gid is None:
        return False
    st = _status(peer_pid)
    return gid in st.get("Groups", []) or gid in st.get("Gid", [])[:1]


def verify_child(pid: object, peer_pid: int, uid: int) -> int:
    """The pids a caller hands over must be its own not-yet-exec'd children."""
    from buildgate.cgroup import PROC_ROOT

    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise PermissionProblem(f"refused: {pid!r} is not a process id")
    st = _status(pid)
    if not st:
        raise PermissionProblem(f"refused: no process {pid}")
    if st.get("PPid", [0])[0] != peer_pid:
        raise PermissionProblem(f"refused: process {pid} is not a child of the caller")
    if any(u != uid for u in st.get("Uid", [-1])):
        raise PermissionProblem(f"refused: process {pid} does not run as the caller's user")
    try:
        same = os.readlink(os.path.join(PROC_ROOT, str(pid), "exe")) == os.readlink(
            os.path.join(PROC_ROOT, str(peer_pid), "exe"))
    except OSError:
        same = False
    if not same:
        raise PermissionProblem(f"refused: process {pid} already runs another program")
    return pid


def _check_request(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("op") != "run":
        raise UsageError("refused: the first message must be a run request")
    argv = req.get("argv")
    if (not isinstance(argv, list) or not argv or len(argv) > 4096
            or not all(isinstance(a, str) and "\0" not in a for a in argv)):
        raise UsageError("refused: argv must be a non-empty list of strings")
    out: dict[str, Any] = {"argv": argv}
    for key, types in (("name", (str, type(None))), ("mem", (str, type(None))), ("cwd", (str, type(None))),
                       ("no_wait", (bool,)), ("keep_leftovers", (bool,))):
        value = req.get(key, None if key not in ("no_wait", "keep_leftovers") else False)
        if not isinstance(value, types):
            raise UsageError(f"refused: {key} has the wrong type")
        out[key] = value
    for key in ("wait", "refresh"):
        value = req.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise UsageError(f"refused: {key} must be a number of seconds")
        out[key] = value
    return out


def serve(fd: int = 0) -> int:
    """One connection, from accept to the end of its build.  Returns an exit code."""
    sock = socket.socket(fileno=fd)
    conn = Conn(sock)
    try:
        _serve(conn, sock)
    except ClientGone:
        pass
    except BaseException as exc:  # every failure goes back to the caller as one line
        conn.send(error_event(exc))
        if not isinstance(exc, (BuildgateError, Exception)):
            raise
    finally:
        sock.close()
    return 0


def _serve(conn: Conn, sock: socket.socket) -> None:
    import pwd

    from buildgate import backends, procs
    from buildgate import budget as budget_mod
    from buildgate.config import load_config
    from buildgate.errors import ReservationTooLarge
    from buildgate.queue import RUNNING, STARTING, Queue, describe, prepare_state_dir
    from buildgate.runner import _Launch, _note_counters, check_name, default_name
    from buildgate.sizes import parse_size

    peer_pid, uid, _gid = peer_credentials(sock)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    cfg = load_config(None)  # root's config: a caller cannot pick its slice or budget
    if not caller_allowed(peer_pid, uid, cfg.group):
        raise PermissionProblem(f"not allowed: add {user} to group {cfg.group} (then log in again)")
    first = conn.recv(timeout=10)
    if first is None:
        raise ClientGone()
    req = _check_request(first)
    argv: list[str] = req["argv"]
    name = check_name(req["name"]) if req["name"] else default_name(argv)
    if req["mem"] is not None:
        parse_size(req["mem"], percent_of=1 << 40)
    backend = backends.make(backends.probe(cfg, None), cfg)
    budget = budget_mod.resolve_budget(cfg, budget_mod.mem_total(), backend.slice_max())
    mem = parse_size(req["mem"], percent_of=budget.bytes) if req["mem"] is not None else budget.bytes
    if mem > budget.bytes:
        raise ReservationTooLarge(mem, budget.bytes, budget.source)
    if not backend.capped:
        conn.send({"event": "warning", "line": "no cgroup can be written here: this build runs UNCAPPED "
                                               "(lock-only mode, queue and reservation only); see `buildgate doctor`"})
    prepare_state_dir(cfg.state_dir)
    queue = Queue(cfg.state_dir)
    t0 = time.monotonic()
    wait_s = cfg.wait if req["wait"] is None else float(req["wait"])
    deadline = 0.0 if req["no_wait"] else t0 + wait_s
    ticket = queue.enter(name=name, mem=mem, argv=" ".join(argv)[:500], cwd=str(req["cwd"] or "?"),
                         keep_leftovers=req["keep_leftovers"], backend=backend.name, uid=uid, owner=user)

    def hung_up() -> None:
        if conn.hung_up():
            raise ClientGone()

    try:
        ticket.wait(budget.bytes, deadline, cfg.legacy_lock,
                    lambda d: conn.send({"event": "waiting", "line": describe(d)}), req["refresh"],
                    reap=lambda e: _reap_entry(e, cfg), wake_fds=(sock.fileno(),), on_wake=hung_up)
        waited = time.monotonic() - t0
        scope = f"buildgate-{name}-{ticket.seq}.scope"
        conn.send({"event": "admitted", "scope": scope, "mem": mem, "ticket": ticket.seq,
                   "t_admitted": ticket.entry.t_admitted, "waited": waited, "capped": backend.capped})
        msg = conn.recv(timeout=60)
        if msg is None:
            raise ClientGone()
        if msg.get("op") != "pids":
            raise UsageError("refused: expected the build's pids")
        main = verify_child(msg.get("main"), peer_pid, uid)
        keeper = msg.get("keeper")
        pids = [main]
        if backend.capped:
            pids.append(verify_child(keeper, peer_pid, uid))
        backend.connect()
        ticket.update(state=STARTING, scope=scope, main_pid=main, main_start=procs.starttime(main))
        launch = _Launch(pid=main, keeper=-1, keeper_w=-1, scope=scope)
        launch.cgroup = backend.start(scope, pids, mem, f"buildgate ({user}): {' '.join(argv)}"[:200])
        cg = launch.cgroup
        ticket.update(state=RUNNING, cgroup=cg.path if cg else None)
        conn.send({"event": "started", "cgroup": cg.path if cg else None})
        interrupted = _watch(conn, backend, launch)
        _note_counters(launch)
        conn.send({"event": "exited", "oom_kills": launch.counters.get("oom", 0),
                   "peak": launch.counters.get("peak")})
        if not conn.closed:  # let the caller close its keeper before the scope stops
            try:
                conn.recv(timeout=10)
            except UsageError:
                pass
        leftovers = len([p for p in cg.pids() if p not in pids]) if cg else 0
        kept = bool(req["keep_leftovers"] and leftovers and not interrupted)
        if kept:
            ticket.detach()
        elif leftovers == 0 and (cg is not None or not backend.capped):
            ticket.release()  # empty cgroup: free the reservation first (runner._finish)
            backend.stop(scope, cg.path if cg else None, wait=False)
        else:
            backend.stop(scope, cg.path if cg else None)
        conn.send({"event": "done", "leftovers": leftovers, "kept": kept})
    finally:
        if ticket.lock_fd is not None:
            ticket.release()
        backend.close()


def _watch(conn: Conn, backend: Any, launch: Any) -> bool:
    """Until the build's main process exits; a caller's "stop" stops the scope."""
    from buildgate import procs
    from buildgate.runner import _note_counters

    pfd = procs.pidfd(launch.pid)
    interrupted = False
    try:
        while True:
            rlist = ([] if conn.closed else [conn.fileno()]) + ([pfd] if pfd is not None else [])
            ready, _, _ = select.select(rlist, [], [], None if pfd is not None else 0.5)
            if pfd is not None and pfd in ready:
                return interrupted
            if pfd is None and not procs.same_process_alive(launch.pid, procs.starttime(launch.pid)):
                return interrupted
            if conn.fileno() in ready and not conn.closed:
                msg = conn.recv(timeout=5)
                if msg is None:
                    continue  # caller gone: the build goes on, we keep its reservation
                if msg.get("op") == "stop" and not interrupted:
                    interrupted = True
                    _note_counters(launch)
                    backend.stop(launch.scope, launch.cgroup.path if launch.cgroup else None)
    finally:
        if pfd is not None:
            os.close(pfd)


def _reap_entry(entry: Any, cfg: Any) -> bool:
    from buildgate.runner import _reap

    return _reap(entry, cfg)
