"""Everything that talks to systemd: the only module that imports pystemd.

It speaks D-Bus bytes so the rest of buildgate does not have to.  Like
``systemd-run --scope``, root talks to systemd's private socket (no dbus-daemon
needed); others use the system bus.  Method calls are synchronous; jobs
(start/stop) are waited for through their JobRemoved signal, which systemd
sends to the client that queued the job without any Subscribe().
"""

from __future__ import annotations

import os
import time

from buildgate.errors import InternalFailure, PermissionProblem, Unavailable

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:  # the real thing for type checkers; see _records.py
    from dataclasses import dataclass
    from typing import Any
else:
    from buildgate._records import dataclass

_DEST = b"org.freedesktop.systemd1"
_PATH = b"/org/freedesktop/systemd1"
_MANAGER = b"org.freedesktop.systemd1.Manager"
PRIVATE_SOCKET = "/run/systemd/private"
_UINT64_MAX = 2**64 - 1

_DENIED = (
    b"org.freedesktop.DBus.Error.AccessDenied",
    b"org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
)


def _dbuslib() -> Any:
    """pystemd's D-Bus layer, without running pystemd/__init__.py.

    The package's __init__ imports its whole object model and lxml (tens of
    milliseconds and ~4 MB on every build) for introspection buildgate never
    uses; a bare package module with the right __path__ lets the compiled
    dbuslib (and its two helper modules) load on their own.  Without
    importlib, whose package imports warnings and whose util imports
    contextlib (~5 ms of every build): __import__ and sys.meta_path do it.
    """
    import sys

    mod = sys.modules.get("pystemd.dbuslib")
    if mod is not None:
        return mod
    if "pystemd" not in sys.modules and "pystemd.utils" not in sys.modules:
        try:
            return _lean_import()
        except ImportError:
            pass  # whatever went wrong there, the plain import below tells it
    if "pystemd" not in sys.modules:
        sys.modules["pystemd"] = _bare_package()
    return _import("pystemd.dbuslib")


def _import(name: str) -> Any:
    """importlib.import_module(name) for an absolute dotted name."""
    import sys

    __import__(name)
    return sys.modules[name]


def _bare_package() -> Any:
    """A module standing for the pystemd package, without its __init__."""
    import sys

    ModuleType = type(sys)  # types.ModuleType, without importing types (0.5 ms)

    # importlib.util.find_spec for a top-level name: ask the finders in turn.
    spec = None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find("pystemd", None) if find is not None else None
        if spec is not None:
            break
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'pystemd'")
    package = ModuleType("pystemd")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    return package


def _lean_import() -> Any:
    """Import pystemd.dbuslib with two of its module-level imports stood in for,
    only while it loads (~15 ms of every build's start, measured in
    docs/benchmarks.md):

    * ``from pprint import pformat``: pprint pulls in dataclasses and inspect;
      dbuslib calls pformat only to word one error message, so it gets a
      stand-in that imports the real pprint on that first call;
    * ``from pystemd.utils import x2char_star``: utils pulls in pathlib, uuid
      and shlex for functions buildgate never uses; x2char_star (str/bytes/
      path -> bytes) is re-stated below, as in pystemd 0.13-0.15.

    Both stand-ins leave sys.modules again at once, so any later ``import
    pprint`` or ``import pystemd.utils`` gets the real module.
    """
    import sys

    ModuleType = type(sys)  # types.ModuleType, without importing types (0.5 ms)

    shims = {"pystemd": _bare_package()}
    if "pprint" not in sys.modules:
        shim = ModuleType("pprint")
        shim.pformat = _pformat  # type: ignore[attr-defined]
        shims["pprint"] = shim
    utils = ModuleType("pystemd.utils")
    utils.x2char_star = _x2char_star  # type: ignore[attr-defined]
    shims["pystemd.utils"] = utils
    sys.modules.update(shims)
    try:
        return _import("pystemd.dbuslib")
    except BaseException:
        sys.modules.pop("pystemd.dbuslib", None)
        sys.modules.pop("pystemd.dbusexc", None)
        sys.modules.pop("pystemd", None)
        raise
    finally:
        for name in ("pprint", "pystemd.utils"):
            if name in shims and sys.modules.get(name) is shims[name]:
                del sys.modules[name]


def _pformat(obj: Any, *args: Any, **kwargs: Any) -> str:
    import pprint

    return pprint.pformat(obj, *args, **kwargs)


def _x2char_star(what: Any, convert_all: bool = False) -> Any:
    if isinstance(what, bytes):
        return what
    if isinstance(what, str):
        return what.encode()
    if isinstance(what, os.PathLike):
        return os.fsencode(what)
    if convert_all:
        if isinstance(what, bool):
            return str(what).lower().encode()
        return repr(what).encode()
    return what


def booted() -> bool:
    """sd_booted(): is systemd the init system here?"""
    return os.path.isdir("/run/systemd/system")


@dataclass(frozen=True)
class Prop:
    name: str
    signature: str
    value: Any


class Systemd:
    def __init__(self) -> None:
        try:
            dbuslib = _dbuslib()
            DBus, DBusAddress = dbuslib.DBus, dbuslib.DBusAddress
        except ImportError as exc:  # pragma: no cover - install problem
            raise Unavailable(f"pystemd is not importable ({exc}): reinstall buildgate (pip install buildgate)") from None
        if not booted():
            raise Unavailable(
                "systemd is not running as the init system here (no /run/systemd/system): "
                "run buildgate on a systemd host"
            )
        if os.geteuid() == 0 and os.path.exists(PRIVATE_SOCKET):
            self.bus = DBusAddress(b"unix:path=" + PRIVATE_SOCKET.encode(), peer_to_peer=True)
        else:
            self.bus = DBus()
        try:
            self.bus.open()
        except Exception as exc:
            raise Unavailable(
                f"cannot connect to systemd over D-Bus ({_short(exc)}): check "
                f"`systemctl is-system-running` and that dbus is running"
            ) from None
        self._removed: dict[bytes, bytes] = {}
        self._matched = False

    def close(self) -> None:
        try:
            self.bus.close()
        except Exception:  # pragma: no cover - closing a dead bus
            pass

    # -- plumbing -------------------------------------------------------------

    def _call(self, method: bytes, signature: bytes, values: list[Any], path: bytes = _PATH,
              interface: bytes = _MANAGER, extra: list[Any] | None = None) -> Any:
        apply_signature = _dbuslib().apply_signature
        args = apply_signature(signature, values) if signature else []
        if extra:
            args += extra
        try:
            return self.bus.call_method(_DEST, path, interface, method, args).body
        except Exception as exc:
            # pystemd maps D-Bus error names to classes (DBusAccessDeniedError,
            # ...) and keeps the name only on its base class.
            name = getattr(exc, "err_name", b"") or type(exc).__name__
            if isinstance(name, str):
                name = name.encode()
            if name in _DENIED or b"AccessDenied" in name or b"InteractiveAuthorization" in name:
                raise PermissionProblem(
                    f"systemd refused {method.decode()} ({_short(exc)}): run as root "
                    f"(non-root callers need buildgate setup)"
                ) from None
            raise _BusError(name, _short(exc)) from None

    def _watch_jobs(self) -> None:
        if self._matched:
            return
        removed = self._removed

        # A plain function: pystemd stores metadata on the callback object,
        # which a bound method cannot carry.
        def on_job_removed(msg: Any, error: Any = None, userdata: Any = None) -> None:
            msg.process_reply(False)
            _id, job, _unit, result = msg.body
            removed[job] = result

        self._callback = on_job_removed  # keep it alive: pystemd holds a raw pointer
        self.bus.match_signal(_DEST, _PATH, _MANAGER, b"JobRemoved", on_job_removed)
        self._matched = True

    def _wait_job(self, job: bytes, timeout: float) -> bytes:
        """Dispatch bus messages until ``job`` is removed; return its result."""
        deadline = time.monotonic() + timeout
        while job not in self._removed:
            while True:  # drain whatever is queued, running the match callback
                msg = self.bus.process()
                if msg.is_empty():
                    break
            if job in self._removed:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"systemd did not finish job {job.decode()} in {timeout:.0f}s: check `systemctl list-jobs`")
            self.bus.wait(int(min(left, 1.0) * 1_000_000))
        return self._removed.pop(job)

    # -- what buildgate needs ------------------------------------------------

    def version(self) -> str:
        body = self.bus.get_property(_DEST, _PATH, _MANAGER, b"Version", b"s")
        return body.decode() if isinstance(body, bytes) else str(body)

    def slice_memory_max(self, slice_name: str) -> int | None:
        """MemoryMax= of a slice (unit file or runtime), or None when unlimited."""
        try:
            path = self._call(b"LoadUnit", b"s", [slice_name.encode()])
            value = self.bus.get_property(_DEST, path, b"org.freedesktop.systemd1.Slice", b"MemoryMax", b"t")
        except _BusError:
            return None
        value = int(value)
        return None if value in (0, _UINT64_MAX) else value

    def start_scope(self, name: str, pid: int, props: list[Prop], timeout: float = 30.0,
                    extra_pids: list[int] | None = None) -> None:
        """StartTransientUnit(scope with ``pid`` in it) and wait for the job."""
        apply_signature = _dbuslib().apply_signature
        self._watch_jobs()
        array: list[Any] = [(ord("a"), b"(sv)")]
        for prop in [*props, Prop("PIDs", "au", [pid, *(extra_pids or [])])]:
            sig = prop.signature.encode()
            array += [(ord("r"), b"sv"), (ord("s"), prop.name.encode()), (ord("v"), sig)]
            value = prop.value.encode() if isinstance(prop.value, str) else prop.value
            array += apply_signature(sig, [value])
            array += [(-1, None), (-1, None)]
        array += [(-1, None)]
        array += [(ord("a"), b"(sa(sv))"), (-1, None)]  # no auxiliary units
        try:
            job = self._call(b"StartTransientUnit", b"ss", [name.encode(), b"fail"], extra=array)
        except _BusError as exc:
            raise InternalFailure(f"systemd could not create scope {name}: {exc.message}") from None
        result = self._wait_job(job, timeout)
        if result != b"done":
            raise InternalFailure(f"systemd could not start scope {name}: job {result.decode()} (see journalctl -u {name})")

    def stop_unit(self, name: str, timeout: float = 120.0, wait: bool = True) -> None:
        """StopUnit and (unless ``wait`` is false) wait until it is stopped; a
        unit already gone is fine.  The job runs on in systemd either way."""
        if wait:
            self._watch_jobs()
        try:
            job = self._call(b"StopUnit", b"ss", [name.encode(), b"replace"])
        except _BusError as exc:
            if b"NoSuchUnit" in exc.name or b"NoSuchUnit" in exc.message.encode():
                return
            raise InternalFailure(f"systemd could not stop {name}: {exc.message}") from None
        if wait:
            self._wait_job(job, timeout)

    def unit_active_state(self, name: str) -> str | None:
        try:
            path = self._call(b"GetUnit", b"s", [name.encode()])
        except _BusError:
            return None
        value = self.bus.get_property(_DEST, path, b"org.freedesktop.systemd1.Unit", b"ActiveState", b"s")
        return value.decode() if isinstance(value, bytes) else str(value)


class _BusError(Exception):
    def __init__(self, name: bytes, message: str) -> None:
        self.name = name or b""
        self.message = message
        super().__init__(message)


def _short(exc: BaseException) -> str:
    text = getattr(exc, "err_message", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " ".join(str(text).split())[:200]
