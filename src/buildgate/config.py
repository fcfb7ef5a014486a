"""The host's config file: ``/etc/buildgate/buildgate.conf`` (TOML).

A missing default file means defaults; everything else that is wrong with the
file (unreadable, bad TOML, unknown key, wrong type) is a ConfigError naming the
file and the key, so an operator's typo never silently changes the budget.
"""

from __future__ import annotations

import os

from buildgate.errors import ConfigError, SizeError

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:  # the real thing for type checkers; see _records.py
    from dataclasses import dataclass, fields, replace
    from typing import Any
else:
    from buildgate._records import dataclass, fields, replace

DEFAULT_PATH = "/etc/buildgate/buildgate.conf"
CONFIG_ENV = "BUILDGATE_CONFIG"
#: Where root keeps the last config it parsed (see load_config); tmpfs, so a
#: reboot empties it.
CACHE_PATH = "/run/buildgate/config.cache"
CACHE_ENV = "BUILDGATE_CONFIG_CACHE"


@dataclass(frozen=True)
class Config:
    #: Memory all builds together may reserve: a size ("6G") or a percentage of
    #: MemTotal ("75%").  None: the build slice's MemoryMax, else a default
    #: derived from MemTotal (see budget.py).
    budget: str | None = None
    #: The slice every build scope goes into.
    slice: str = "build.slice"
    #: Where the queue lives.  On tmpfs by default so a reboot empties it.
    state_dir: str = "/run/buildgate"
    #: A lock file that plain ``flock`` scripts use; buildgate holds it shared
    #: while a build runs so the two never overlap.  "" turns interop off.
    legacy_lock: str = "/var/lock/vps-build.lock"
    #: Default for --wait, in seconds (the seed's ``flock -w 900``).
    wait: float = 900.0
    cpu_weight: int = 50
    io_weight: int = 50
    tasks_max: int = 4096
    #: Seconds systemd gives a stopping scope between SIGTERM and SIGKILL.  Short,
    #: so that a CI cancel (SIGINT, SIGTERM 7.5 s later, then SIGKILL) leaves
    #: nothing behind.
    stop_timeout: float = 5.0
    #: How builds are capped: "auto" (systemd if it is init, else cgroupfs if a
    #: memory cgroup is writable, else none), "systemd", "cgroupfs" or "none".
    backend: str = "auto"
    #: cgroupfs backend: the cgroup directory slices are made under ("" = the
    #: root of the memory hierarchy).  Point it at a delegated subtree.
    cgroup_root: str = ""
    #: Members of this group may run builds without root, through the
    #: privileged helper listening on ``helper_socket`` (see docs/nonroot.md).
    group: str = "buildgate"
    helper_socket: str = "/run/buildgate/helper.sock"
    #: Where the file came from, for messages.
    source: str = "defaults"


_TYPES: dict[str, tuple[type, ...]] = {
    "budget": (str,),
    "slice": (str,),
    "state_dir": (str,),
    "legacy_lock": (str,),
    "wait": (int, float),
    "cpu_weight": (int,),
    "io_weight": (int,),
    "tasks_max": (int,),
    "stop_timeout": (int, float),
    "backend": (str,),
    "cgroup_root": (str,),
    "group": (str,),
    "helper_socket": (str,),
}


def parse_config(text: str, path: str) -> Config:
    """Pure: TOML text -> Config, or ConfigError naming the first problem."""
    return _from_values(parse_toml(text, path), path)


def parse_toml(text: str, path: str) -> dict[str, Any]:
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML ({exc}): fix the syntax") from None
    return data


def _from_values(data: dict[str, Any], path: str) -> Config:
    """The file's key/value pairs -> Config, checked key by key."""
    known = {f.name for f in fields(Config)} - {"source"}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                path, f"unknown key {key!r}: valid keys are {', '.join(sorted(known))}"
            )
        types = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise ConfigError(path, f"{key} must be a {want}, not {value!r}")
        values[key] = value
    cfg = replace(Config(), source=path, **values)
    _validate(cfg, path)
    return cfg


def _validate(cfg: Config, path: str) -> None:
    from buildgate.sizes import parse_size

    if cfg.budget is not None:
        try:
            parse_size(cfg.budget, percent_of=1 << 40)
        except SizeError as exc:
            raise ConfigError(path, f"budget: {exc.why} ({cfg.budget!r}); e.g. budget = \"6G\"") from None
    if not cfg.slice.endswith(".slice") or "/" in cfg.slice:
        raise ConfigError(path, f"slice must be a unit name ending in .slice, not {cfg.slice!r}")
    if not os.path.isabs(cfg.state_dir):
        raise ConfigError(path, f"state_dir must be an absolute path, not {cfg.state_dir!r}")
    if cfg.legacy_lock and not os.path.isabs(cfg.legacy_lock):
        raise ConfigError(path, f"legacy_lock must be an absolute path or \"\", not {cfg.legacy_lock!r}")
    if cfg.wait < 0:
        raise ConfigError(path, f"wait must be >= 0 seconds, not {cfg.wait}")
    for key in ("cpu_weight", "io_weight"):
        if not 1 <= getattr(cfg, key) <= 10000:
            raise ConfigError(path, f"{key} must be between 1 and 10000")
    if cfg.tasks_max < 1:
        raise ConfigError(path, "tasks_max must be >= 1")
    if cfg.backend not in ("auto", "systemd", "cgroupfs", "none"):
        raise ConfigError(path, f"backend must be auto, systemd, cgroupfs or none, not {cfg.backend!r}")
    if not os.path.isabs(cfg.helper_socket):
        raise ConfigError(path, f"helper_socket must be an absolute path, not {cfg.helper_socket!r}")
    if cfg.cgroup_root and not os.path.isabs(cfg.cgroup_root):
        raise ConfigError(path, f"cgroup_root must be an absolute path or \"\", not {cfg.cgroup_root!r}")
    if not 0 < cfg.stop_timeout <= 3600:
        raise ConfigError(path, "stop_timeout must be between 0 and 3600 seconds")


def load_config(path: str | None = None) -> Config:
    """Read the config from ``path``, $BUILDGATE_CONFIG or the default location."""
    explicit = path or os.environ.get(CONFIG_ENV) or None
    target = explicit or DEFAULT_PATH
    try:
        with open(target, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(target, "no such file: create it or point --config/$BUILDGATE_CONFIG elsewhere") from None
        return Config()
    except PermissionError:
        raise ConfigError(target, "permission denied: make it readable (chmod 644)") from None
    except IsADirectoryError:
        raise ConfigError(target, "is a directory: it must be a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(target, "not UTF-8 text: it must be a TOML file") from None
    except OSError as exc:
        raise ConfigError(target, f"cannot read it ({exc.strerror})") from None
    cache = os.environ.get(CACHE_ENV) or CACHE_PATH
    data = _read_cache(cache, target, text)
    if data is None:
        data = parse_toml(text, target)
        cfg = _from_values(data, target)
        _write_cache(cache, target, text, data)
        return cfg
    return _from_values(data, target)


# -- the parsed-config cache --------------------------------------------------
#
# tomllib imports re and compiles its patterns: ~15 ms of every build, more
# than all the rest of buildgate's imports (docs/benchmarks.md).  So root keeps
# the last parsed config as a flat JSON record holding the file's path, its
# whole text and its key/value pairs; a build whose config file has exactly
# that path and text takes the pairs from there and checks them as it would
# checks the file's (_from_values).  Any edit changes the text, so the cache
# can never hide one; a missing, foreign or unreadable cache only means parsing
# the file.  It is trusted only when root owns it and its directory and neither
# is writable by group or others.

_VALUE_PREFIX = "value."


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


def _read_cache(cache: str, target: str, text: str) -> dict[str, Any] | None:
    from buildgate import _flatjson

    try:
        fd = os.open(cache, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _trusted(os.fstat(fd)) or not _trusted(os.stat(os.path.dirname(cache))):
            return None
        with os.fdopen(os.dup(fd), encoding="utf-8") as fh:
            record = _flatjson.loads(fh.read())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if record.get("path") != target or record.get("text") != text:
        return None
    n = len(_VALUE_PREFIX)
    return {k[n:]: v for k, v in record.items() if k.startswith(_VALUE_PREFIX)}


def _write_cache(cache: str, target: str, text: str, data: dict[str, Any]) -> None:
    """Best effort, root only; replaced atomically so readers see old or new."""
    if os.geteuid() != 0:
        return
    from buildgate import _flatjson

    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        record = {"path": target, "text": text, **{_VALUE_PREFIX + k: v for k, v in data.items()}}
        body = _flatjson.dumps(record).encode()
        os.makedirs(os.path.dirname(cache), 0o755, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        os.rename(tmp, cache)
    except (OSError, ValueError, TypeError):
        try:
            os.unlink(tmp)
        except OSError:
            pass
