"""``buildgate setup``: make a host ready for buildgate, idempotently.

It writes, from the templates in ``src/buildgate/templates/`` (copies of the
repository's ``systemd/`` folder, see docs/setup.md):

* the build slice unit (``/etc/systemd/system/build.slice``) with the budget as
  ``MemoryMax=``;
* a drop-in for the ssh unit that is present (``OOMScoreAdjust=-1000``,
  ``MemoryMin=``) and one for each slice above it (``MemoryMin=``: a cgroup's
  protection is bounded by its ancestors');
* ``/etc/buildgate/buildgate.conf`` and ``/etc/tmpfiles.d/buildgate.conf``;
* the privileged helper's socket and service units, for non-root callers;

then reloads systemd, checks that it applies the values, makes the state
directory, creates the group and enables the helper socket.

Every file setup writes is recorded, with a SHA-256 of its content, in
``/etc/buildgate/.setup-manifest.json``.  A file whose content is not what
setup last wrote is "edited by hand" and kept unless ``--force``; ``--undo``
removes only files that are still what setup wrote.

Pure parts (sizing, rendering, the keep/overwrite decisions, the manifest) are
plain functions tested in tests/unit/test_setup.py; ``run_setup`` is the thin
impure layer.  Nothing here prints or exits: the report's lines go to cli.py.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources

from buildgate._records import fields, replace  # they also take buildgate's records (Config)
from buildgate.budget import parse_meminfo
from buildgate.config import DEFAULT_PATH, Config, parse_config
from buildgate.errors import (
    ConfigError,
    InternalFailure,
    PermissionProblem,
    Unavailable,
    UsageError,
)
from buildgate.sizes import format_size, parse_size

K = 1024
M = 1024**2
G = 1024**3

#: What sshd is guaranteed by memory reclaim (memory.min).
SSHD_MEMORY_MIN = 64 * M
#: The smallest budget setup accepts: less runs no real build.
MIN_BUDGET = 256 * M
#: A computed budget is rounded down to this.
BUDGET_STEP = 64 * M

UNIT_DIR = "/etc/systemd/system"
MANIFEST = "/etc/buildgate/.setup-manifest.json"
TMPFILES = "/etc/tmpfiles.d/buildgate.conf"
DROPIN = "50-buildgate.conf"
SOCKET_UNIT = "buildgate-helper.socket"
SERVICE_UNIT = "buildgate-helper@.service"
SSH_UNITS = ("ssh.service", "sshd.service")
DEFAULT_SOCKET = "/run/buildgate/helper.sock"

#: Template file names (in src/buildgate/templates/ and systemd/).
T_SLICE = "build.slice"
T_SSHD = "sshd-protect.conf"
T_SLICE_MIN = "slice-protect.conf"
T_CONFIG = "buildgate.conf"
T_TMPFILES = "buildgate.tmpfiles"
T_SOCKET = SOCKET_UNIT
T_SERVICE = SERVICE_UNIT

KEPT = "kept (edited by hand, --force to overwrite): "


# --------------------------------------------------------------------------
# the contract with cli.py


@dataclass
class SetupOptions:
    budget: str | None = None
    reserve: str | None = None
    group: str = "buildgate"
    dry_run: bool = False
    root: str = "/"
    force: bool = False
    undo: bool = False
    config_path: str | None = None


@dataclass
class SetupReport:
    lines: list[str] = field(default_factory=list)
    exit_code: int = 0


# --------------------------------------------------------------------------
# pure: sizes


def unit_size(value: int) -> str:
    """Bytes -> the exact value in the largest unit systemd reads (``6G``, ``5632M``)."""
    for suffix, unit in (("T", 1024**4), ("G", G), ("M", M), ("K", K)):
        if value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


def memory_high(budget: int) -> int:
    """MemoryHigh= a sixteenth under MemoryMax= (as for each build's scope), in whole MiB."""
    high = budget - budget // 16
    return high - high % M if high > M else high


@dataclass(frozen=True)
class Sizing:
    budget: int
    #: for the slice's output line: "MemTotal 7.6G - reserve 1.8G", "--budget 4G", ...
    how: str
    #: how a computed reserve came about (one output line), or None
    detail: str | None = None
    #: the budget came from a file on this host (config, manifest), not from now
    remembered: bool = False


def available(meminfo: dict[str, int]) -> int:
    if "MemAvailable" in meminfo:
        return meminfo["MemAvailable"]
    # kernels before 3.14: the classic approximation
    return sum(meminfo.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))


def compute_reserve(meminfo: dict[str, int]) -> tuple[int, str]:
    """What the host keeps for the OS, sshd and its services, from what it uses now.

    In use now (MemTotal - MemAvailable) plus a margin for peaks (a quarter of
    that, at least 512M), and never less than max(1G, MemTotal/4).  Returns the
    reserve before rounding and a line that explains it.
    """
    total = meminfo["MemTotal"]
    used = max(0, total - available(meminfo))
    margin = max(512 * M, used // 4)
    floor = max(G, total // 4)
    reserve = max(used + margin, floor)
    why = (f"in use now {format_size(used)} + margin {format_size(margin)}"
           if used + margin >= floor else
           f"floor max(1G, MemTotal/4), more than in use now {format_size(used)} + margin {format_size(margin)}")
    return reserve, why


def compute_sizing(meminfo: dict[str, int], budget: str | None = None, reserve: str | None = None,
                   config_budget: str | None = None, config_source: str = "",
                   remembered: int | None = None) -> Sizing:
    """The budget, from (in this order) --budget, --reserve, the config's budget,
    the budget setup wrote last time, or what the host uses now."""
    total = meminfo["MemTotal"]
    if budget:
        value = parse_size(budget, percent_of=total)
        sizing = Sizing(value, f"--budget {budget.strip()}")
    elif reserve:
        kept = parse_size(reserve, percent_of=total)
        if kept >= total:
            raise UsageError(f"--reserve {reserve} is all of MemTotal {format_size(total)}: "
                             f"keep less for the host, or give --budget")
        value = total - kept
        value -= value % M
        sizing = Sizing(value, f"MemTotal {format_size(total)} - reserve {format_size(total - value)} (--reserve)")
    elif config_budget:
        value = parse_size(config_budget, percent_of=total)
        sizing = Sizing(value, f"budget in {config_source}", remembered=True)
    elif remembered:
        value = remembered
        sizing = Sizing(value, f"as set up before, see {MANIFEST}", remembered=True)
    else:
        raw, why = compute_reserve(meminfo)
        value = total - raw
        value -= value % BUDGET_STEP
        kept = total - value
        sizing = Sizing(value, f"MemTotal {format_size(total)} - reserve {format_size(kept)}",
                        f"reserve {format_size(kept)} for the OS, sshd and services = {why}; "
                        f"--reserve or --budget to choose")
    if value > total:
        raise UsageError(f"budget {format_size(value)} ({sizing.how}) is more than MemTotal "
                         f"{format_size(total)}: give a smaller --budget")
    if value < MIN_BUDGET and budget:
        raise UsageError(f"--budget {budget} is less than {format_size(MIN_BUDGET)}, too little for builds: "
                         f"give more")
    if value < MIN_BUDGET:
        raise UsageError(f"budget {format_size(value)} ({sizing.how}) leaves builds less than "
                         f"{format_size(MIN_BUDGET)}: free memory, or give --budget or a smaller --reserve")
    return sizing


# --------------------------------------------------------------------------
# pure: templates


_PLACEHOLDER = re.compile(r"@([A-Za-z_]+)@")


def load_template(name: str) -> str:
    try:
        return resources.files("buildgate").joinpath("templates").joinpath(name).read_text(encoding="utf-8")
    except (OSError, ModuleNotFoundError) as exc:
        raise InternalFailure(f"template {name} is missing from the installed package ({exc}): "
                              f"reinstall buildgate") from None


def render(template: str, values: dict[str, object]) -> str:
    """Fill in every ``@NAME@``; a placeholder without a value is a bug."""
    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise InternalFailure(f"template placeholder @{m.group(1)}@ has no value: report this bug")
        return str(values[m.group(1)])
    return _PLACEHOLDER.sub(fill, template)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


#: Config keys written even when they have the default value.
_ALWAYS = ("budget", "slice", "group")


def config_keys() -> list[str]:
    return [f.name for f in fields(Config) if f.name != "source"]


def render_config(template: str, cfg: Config) -> str:
    """The config file for ``cfg``: one ``@key@`` line per setting, active when
    it matters (budget, slice, group, anything not at its default), else a
    commented-out default.  Settings the template does not know (newer keys)
    are appended when they are not at their default."""
    defaults = Config()
    keys = config_keys()
    lines = []
    seen = set()
    for line in template.splitlines():
        m = _PLACEHOLDER.fullmatch(line.strip())
        if m and m.group(1).islower():
            key = m.group(1)
            seen.add(key)
            if key not in keys:
                continue  # a key this version of Config does not have
            value, default = getattr(cfg, key), getattr(defaults, key)
            if value is not None and (key in _ALWAYS or value != default):
                lines.append(f"{key} = {toml_value(value)}")
            elif default is not None:
                lines.append(f"# {key} = {toml_value(default)}")
            continue
        lines.append(line)
    extra = [k for k in keys if k not in seen and getattr(cfg, k) != getattr(defaults, k)]
    if extra:
        lines += ["", "# Other settings (see docs/config.md)."]
        lines += [f"{k} = {toml_value(getattr(cfg, k))}" for k in extra]
    return "\n".join(lines) + "\n"


def systemd_quote(path: str) -> str:
    """A path for ExecStart=: specifiers escaped, quoted when it has to be."""
    path = path.replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def buildgate_command(argv0: str | None = None, executable: str | None = None) -> str:
    """How systemd should start this buildgate: its ``buildgate`` script
    (the one being run, else the one next to this Python, else on PATH), or
    ``PYTHON -m buildgate``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    candidates = []
    if os.path.basename(argv0) == "buildgate":
        candidates.append(argv0 if "/" in argv0 else shutil.which(argv0))
    if executable:
        candidates.append(os.path.join(os.path.dirname(executable), "buildgate"))
    candidates.append(shutil.which("buildgate"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return systemd_quote(os.path.abspath(path))
    return f"{systemd_quote(os.path.abspath(executable or 'python3'))} -m buildgate"


def slice_ancestors(name: str) -> list[str]:
    """``a-b.slice`` -> [``a.slice``, ``a-b.slice``]; the root slice has none."""
    if not name.endswith(".slice") or name == "-.slice":
        return []
    parts = name[: -len(".slice")].split("-")
    return ["-".join(parts[: i + 1]) + ".slice" for i in range(len(parts))]


# --------------------------------------------------------------------------
# pure: what to do with a file


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: decide_write results
WRITE, UPDATE, UNCHANGED, KEEP, OVERWRITE = "write", "update", "unchanged", "keep", "overwrite"
#: decide_remove results
REMOVE, GONE = "remove", "gone"


def decide_write(current: bytes | None, recorded: str | None, new: bytes, force: bool) -> str:
    """A file setup wants to have ``new`` in.

    Missing: write it.  Already ``new``: unchanged.  Still what setup wrote last
    time (``recorded`` hash): update it.  Anything else was edited by hand (or
    was never setup's): keep it, unless --force.
    """
    if current is None:
        return WRITE
    if current == new:
        return UNCHANGED
    if recorded is not None and digest(current) == recorded:
        return UPDATE
    return OVERWRITE if force else KEEP


def decide_remove(current: bytes | None, recorded: str | None, force: bool) -> str:
    """A file --undo would remove: only when it is still what setup wrote, or --force."""
    if current is None:
        return GONE
    if force or (recorded is not None and digest(current) == recorded):
        return REMOVE
    return KEEP


@dataclass
class Manifest:
    """What setup did on this host: files (path -> sha256 of what it wrote), the
    budget it set, groups it created, the sshd whose oom_score_adj it set live."""

    files: dict[str, str] = field(default_factory=dict)
    budget: int | None = None
    groups_created: list[str] = field(default_factory=list)
    sshd: dict[str, int | str] | None = None
    dirs_created: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = {
            "comment": "written by `buildgate setup`: what it installed, to tell hand edits apart "
                       "and for --undo; do not edit",
            "version": 1,
            "files": dict(sorted(self.files.items())),
            "budget": self.budget,
            "groups_created": self.groups_created,
            "sshd": self.sshd,
            "dirs_created": sorted(self.dirs_created),
        }
        return json.dumps(data, indent=2) + "\n"


def parse_manifest(text: str, path: str) -> Manifest:
    fix = f"remove {path} (setup then treats its files as edited by hand)"
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError(path, f"not valid JSON: {fix}") from None
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ConfigError(path, f"not a setup manifest of this buildgate version: {fix}")
    files = data.get("files", {})
    groups = data.get("groups_created", [])
    budget = data.get("budget")
    sshd = data.get("sshd")
    dirs = data.get("dirs_created", [])
    if (not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
            or not isinstance(groups, list) or not all(isinstance(g, str) for g in groups)
            or not (budget is None or (isinstance(budget, int) and budget > 0))
            or not (sshd is None or isinstance(sshd, dict))
            or not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs)):
        raise ConfigError(path, f"unexpected content: {fix}")
    return Manifest(files=dict(files), budget=budget, groups_created=list(groups), sshd=sshd,
                    dirs_created=list(dirs))


def parse_show(text: str) -> list[dict[str, str]]:
    """``systemctl show -p A -p B U1 U2`` -> one dict per unit."""
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        key, _, value = line.partition("=")
        blocks[-1][key] = value
    return [b for b in blocks if b]


# --------------------------------------------------------------------------
# the impure layer


@dataclass
class FileSpec:
    path: str  # as on the target host (not re-rooted)
    content: str
    note: str = ""  # shown after the path when written
    unit: bool = False  # systemd reads it: a change needs daemon-reload


@dataclass
class SshUnit:
    name: str
    slice: str = "system.slice"
    main_pid: int = 0


class _Host:
    """The machine (or the tree under --root) setup acts on."""

    def __init__(self, opts: SetupOptions, report: SetupReport) -> None:
        root = os.path.abspath(opts.root or "/")
        if root != "/" and not os.path.isdir(root):
            raise UsageError(f"--root {opts.root}: no such directory: create it first")
        self.root = root
        self.offline = root != "/"  # never touch the running system
        self.dry = opts.dry_run
        self.act = not self.offline and not self.dry  # run commands, change live state
        self.systemd = not self.offline and os.path.isdir("/run/systemd/system")
        self.report = report
        #: directories setup made (target paths), for --undo
        self.created: list[str] = []

    def say(self, line: str) -> None:
        self.report.lines.append(line)

    def warn(self, line: str) -> None:
        self.report.lines.append(f"warning: {line}")
        self.report.exit_code = 1

    def path(self, target: str) -> str:
        return target if self.root == "/" else os.path.join(self.root, target.lstrip("/"))

    # files

    def read(self, target: str) -> bytes | None:
        real = self.path(target)
        if os.path.islink(real):
            return b"symlink -> " + os.readlink(real).encode()  # never setup's: edited by hand
        try:
            with open(real, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PermissionProblem(f"cannot read {real} ({exc.strerror}): fix its permissions or remove it") from None

    def write(self, target: str, data: bytes) -> None:
        """Atomically: a temporary file next to it, 0644, fsync'ed, renamed over it."""
        real = self.path(target)
        directory = os.path.dirname(real)
        try:
            self.makedirs(os.path.dirname(target))
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise PermissionProblem(f"cannot write in {directory} ({exc.strerror}): run setup as root, "
                                    f"or --root a directory you can write") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                os.fchmod(fh.fileno(), 0o644)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, real)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise PermissionProblem(f"cannot write {real} ({exc.strerror}): fix it, then run setup again") from None

    def makedirs(self, target: str) -> None:
        """mkdir -p, remembering which directories it made."""
        missing = []
        while not os.path.isdir(self.path(target)) and target not in ("/", ""):
            missing.append(target)
            target = os.path.dirname(target)
        for directory in reversed(missing):
            os.mkdir(self.path(directory), 0o755)
            self.created.append(directory)

    def remove(self, target: str) -> None:
        real = self.path(target)
        try:
            os.unlink(real)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PermissionProblem(f"cannot remove {real} ({exc.strerror}): remove it by hand") from None

    def rmdir_if_empty(self, target: str) -> None:
        try:
            os.rmdir(self.path(target))
        except OSError:
            pass

    # commands

    def run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                                 stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise Unavailable(f"{argv[0]} not found: setup needs a systemd host with it installed") from None
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`{' '.join(argv)}` did not finish in 120s: check `systemctl is-system-running`") from None
        if check and out.returncode != 0:
            why = " ".join((out.stderr or out.stdout).split())[:200] or f"exit {out.returncode}"
            raise Unavailable(f"`{' '.join(argv)}` failed ({why}): fix that, then run setup again")
        return out

    def command(self, argv: list[str]) -> None:
        """Run it (and say so), or say it would be run."""
        if self.act:
            self.run(argv)
            self.say(f"ran: {' '.join(argv)}")
        elif self.dry:
            self.say(f"would run: {' '.join(argv)}")

    def show(self, units: list[str], props: list[str]) -> list[dict[str, str]]:
        argv = ["systemctl", "show"]
        for p in props:
            argv += ["-p", p]
        return parse_show(self.run(argv + ["--", *units]).stdout)

    # groups

    def group_exists(self, name: str) -> bool:
        if not self.offline:
            try:
                grp.getgrnam(name)
                return True
            except KeyError:
                return False
        try:
            with open(self.path("/etc/group"), encoding="utf-8", errors="replace") as fh:
                return any(line.split(":", 1)[0] == name for line in fh)
        except OSError:
            return False


def _meminfo() -> dict[str, int]:
    from buildgate.cgroup import PROC_ROOT

    path = os.path.join(PROC_ROOT, "meminfo")
    try:
        with open(path, encoding="ascii") as fh:
            info = parse_meminfo(fh.read())
    except OSError as exc:
        raise Unavailable(f"cannot read {path} ({exc.strerror}): give the budget with --budget") from None
    if "MemTotal" not in info:
        raise Unavailable(f"{path} has no MemTotal: give the budget with --budget")
    return info


def _load_manifest(host: _Host) -> Manifest | None:
    data = host.read(MANIFEST)
    if data is None:
        return None
    return parse_manifest(data.decode("utf-8", errors="replace"), host.path(MANIFEST))


def _existing_config(host: _Host, target: str) -> Config | None:
    path = host.path(target)
    try:
        with open(path, encoding="utf-8") as fh:  # through a symlink, unlike host.read
            text = fh.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ConfigError(path, "not UTF-8 text: fix it or remove it") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read it ({exc.strerror}): fix it or remove it") from None
    return parse_config(text, path)


def _detect_ssh(host: _Host) -> tuple[SshUnit | None, str]:
    """The ssh unit present on the target: ssh.service (Debian, Ubuntu) or
    sshd.service (RHEL, Arch); Debian's sshd.service is an alias of ssh.service."""
    if host.systemd:
        masked = []
        for unit in host.show(list(SSH_UNITS), ["Id", "LoadState", "FragmentPath", "Slice", "MainPID"]):
            state = unit.get("LoadState", "")
            if state == "loaded" and unit.get("FragmentPath"):
                pid = unit.get("MainPID", "0")
                return SshUnit(unit.get("Id", ""), unit.get("Slice") or "system.slice",
                               int(pid) if pid.isdigit() else 0), ""
            if state == "masked":
                masked.append(unit.get("Id", "?"))
        why = f"{' and '.join(masked)} masked" if masked else "no ssh.service or sshd.service loaded"
        return None, why
    for directory in ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                      "/usr/lib/systemd/system", "/lib/systemd/system"):
        for name in SSH_UNITS:
            real = host.path(f"{directory}/{name}")
            if os.path.islink(real):
                target = os.path.basename(os.readlink(real))
                if target.endswith(".service"):
                    return SshUnit(target), ""
                continue  # masked (-> /dev/null)
            if os.path.isfile(real):
                return SshUnit(name, _unit_slice(real)), ""
    where = f"under {host.root}" if host.offline else "(systemd is not running: looked at unit files)"
    return None, f"no ssh.service or sshd.service unit file {where}"


def _unit_slice(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.strip().partition("=")
                if key.strip() == "Slice" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return "system.slice"


_GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


def _check_options(opts: SetupOptions) -> None:
    if opts.budget and opts.reserve:
        raise UsageError("--budget and --reserve both size the budget: give one of them")
    if opts.undo and (opts.budget or opts.reserve):
        raise UsageError("--undo removes what setup installed: it takes no --budget or --reserve")
    if not _GROUP_RE.match(opts.group or ""):
        raise UsageError(f"--group {opts.group!r} is not a valid group name: use letters, digits, _ and -")


def run_setup(opts: SetupOptions) -> SetupReport:
    """Set the host up (or, with ``undo``, take it down again).  See module docs."""
    _check_options(opts)
    report = SetupReport()
    host = _Host(opts, report)
    if host.act:
        if os.geteuid() != 0:
            raise PermissionProblem("setup writes to /etc and calls systemctl: run it as root "
                                    "(sudo buildgate setup), or with --dry-run to see what it would do")
        if not host.systemd:
            raise Unavailable("systemd is not running here: setup configures systemd; use --root DIR "
                              "to prepare an image, or --dry-run")
    if host.dry:
        host.say("dry run: nothing is written or run")
    if opts.undo:
        _undo(opts, host)
    else:
        _setup(opts, host)
    if host.offline:
        host.say(f"not run (--root {opts.root}): systemctl, groupadd, systemd-tmpfiles")
    return report


def _setup(opts: SetupOptions, host: _Host) -> None:
    manifest = _load_manifest(host)
    old = manifest or Manifest()
    new = Manifest(files=dict(old.files), budget=old.budget, groups_created=list(old.groups_created),
                   sshd=old.sshd, dirs_created=list(old.dirs_created))

    config_target = opts.config_path or DEFAULT_PATH
    if not os.path.isabs(config_target):
        raise UsageError(f"--config {config_target}: give an absolute path for setup to write")
    existing = _existing_config(host, config_target)
    cfg = existing or Config()
    if any(c.isspace() for c in cfg.state_dir):
        raise ConfigError(host.path(config_target), f"state_dir {cfg.state_dir!r} has a space: "
                          f"systemd-tmpfiles cannot take it; choose another")

    sizing = compute_sizing(_meminfo(), opts.budget, opts.reserve, cfg.budget, cfg.source, old.budget)
    budget = sizing.budget
    if not opts.budget and not opts.reserve and cfg.budget:
        budget_text = cfg.budget  # the operator's own words ("75%") stay as they are
    else:
        budget_text = unit_size(budget)
    new.budget = budget
    if sizing.detail:
        host.say(sizing.detail)

    ssh, no_ssh = _detect_ssh(host)
    specs = _plan(opts, cfg, budget, budget_text, sizing, ssh, config_target)

    # the group first: systemd needs it to exist for SocketGroup=
    group_missing = not host.group_exists(opts.group)
    if not group_missing:
        host.say(f"unchanged: group {opts.group}")
    elif not host.offline:
        host.command(["groupadd", "--system", opts.group])
        if host.act and opts.group not in new.groups_created:
            new.groups_created.append(opts.group)

    results: dict[str, str] = {}
    try:
        for spec in specs:
            results[spec.path] = _put(host, spec, old.files.get(spec.path), opts.force, new)
        planned = {spec.path for spec in specs}
        for path in sorted(set(old.files) - planned):
            results[path] = _drop_stale(host, path, old.files[path], new)
    finally:
        if host.act or (host.offline and not host.dry):
            _save_manifest(host, manifest, new)

    if ssh is None:
        host.say(f"skipped sshd protection: {no_ssh}")
    if existing is not None and results.get(config_target) == KEEP and getattr(cfg, "group", opts.group) != opts.group:
        host.warn(f"{host.path(config_target)} says group = {getattr(cfg, 'group', '')!r} but the helper "
                  f"socket is for --group {opts.group}: make them agree")

    changed_units = any(spec.unit and results[spec.path] in (WRITE, UPDATE, OVERWRITE) for spec in specs)
    changed_units = changed_units or any(
        path.startswith(UNIT_DIR + "/") and action == REMOVE for path, action in results.items())
    if changed_units:
        host.command(["systemctl", "daemon-reload"])
    if host.systemd:
        _check_live(host, cfg, budget, ssh, results, changed_units)
        _sshd_oom(host, ssh, results, new)
    if host.act and new.sshd != old.sshd:
        _save_manifest(host, manifest, new)

    _state_dir(host, cfg)
    _socket(host, results.get(f"{UNIT_DIR}/{SOCKET_UNIT}") in (WRITE, UPDATE, OVERWRITE))
    if host.offline:
        todo = []
        if group_missing:
            todo.append(f"groupadd --system {opts.group}")
        todo.append(f"systemctl enable {SOCKET_UNIT}")
        host.say(f"on the target, run: {'; '.join(todo)}")


def _plan(opts: SetupOptions, cfg: Config, budget: int, budget_text: str, sizing: Sizing,
          ssh: SshUnit | None, config_target: str) -> list[FileSpec]:
    high = memory_high(budget)
    slice_note = f"MemoryMax={format_size(budget)}"
    slice_note += f" = {sizing.how}" if sizing.how.startswith("MemTotal") else f", {sizing.how}"
    specs = [FileSpec(
        f"{UNIT_DIR}/{cfg.slice}",
        render(load_template(T_SLICE), {
            "MEMORY_MAX": unit_size(budget), "MEMORY_HIGH": unit_size(high),
            "CPU_WEIGHT": cfg.cpu_weight, "IO_WEIGHT": cfg.io_weight, "TASKS_MAX": 2 * cfg.tasks_max,
        }),
        slice_note, unit=True,
    )]
    if ssh is not None:
        specs.append(FileSpec(
            f"{UNIT_DIR}/{ssh.name}.d/{DROPIN}",
            render(load_template(T_SSHD), {"UNIT": ssh.name, "SLICE": ssh.slice,
                                           "MEMORY_MIN": unit_size(SSHD_MEMORY_MIN)}),
            f"OOMScoreAdjust=-1000 MemoryMin={format_size(SSHD_MEMORY_MIN)}", unit=True,
        ))
        for parent in slice_ancestors(ssh.slice):
            specs.append(FileSpec(
                f"{UNIT_DIR}/{parent}.d/{DROPIN}",
                render(load_template(T_SLICE_MIN), {"UNIT": ssh.name, "MEMORY_MIN": unit_size(SSHD_MEMORY_MIN)}),
                f"MemoryMin={format_size(SSHD_MEMORY_MIN)}, so that {ssh.name}'s counts", unit=True,
            ))
    values = {"budget": budget_text}
    if any(f.name == "group" for f in fields(Config)):
        values["group"] = opts.group
    written = replace(cfg, **values)  # type: ignore[arg-type]
    specs.append(FileSpec(config_target, render_config(load_template(T_CONFIG), written),
                          f"budget = {budget_text}"))
    specs.append(FileSpec(TMPFILES, render(load_template(T_TMPFILES), {"STATE_DIR": cfg.state_dir}),
                          f"state directory {cfg.state_dir}"))
    socket_path = getattr(cfg, "helper_socket", DEFAULT_SOCKET)
    specs.append(FileSpec(
        f"{UNIT_DIR}/{SOCKET_UNIT}",
        render(load_template(T_SOCKET), {"GROUP": opts.group, "SOCKET": socket_path}),
        f"{socket_path}, group {opts.group}", unit=True,
    ))
    exe = buildgate_command()
    specs.append(FileSpec(f"{UNIT_DIR}/{SERVICE_UNIT}",
                          render(load_template(T_SERVICE), {"BUILDGATE": exe}),
                          f"runs {exe} helper", unit=True))
    return specs


def _put(host: _Host, spec: FileSpec, recorded: str | None, force: bool, manifest: Manifest) -> str:
    data = spec.content.encode("utf-8")
    current = host.read(spec.path)
    action = decide_write(current, recorded, data, force)
    shown = host.path(spec.path)
    note = f" ({spec.note})" if spec.note else ""
    if action == UNCHANGED:
        manifest.files[spec.path] = digest(data)  # adopt a file that is already right
        host.say(f"unchanged: {shown}")
        return action
    if action == KEEP:
        host.say(("would be " if host.dry else "") + KEPT + shown)
        return action
    verb = {WRITE: "wrote", UPDATE: "updated", OVERWRITE: "overwrote (edited by hand, --force)"}[action]
    if host.dry:
        verb = {WRITE: "would write", UPDATE: "would update",
                OVERWRITE: "would overwrite (edited by hand, --force)"}[action]
        host.say(f"{verb} {shown}{note}:")
        host.report.lines.extend("    " + line if line else "" for line in spec.content.splitlines())
        return action
    host.write(spec.path, data)
    manifest.files[spec.path] = digest(data)
    host.say(f"{verb} {shown}{note}")
    return action


def _drop_stale(host: _Host, path: str, recorded: str, manifest: Manifest) -> str:
    """A file an earlier setup wrote that this one does not (another slice name,
    no ssh unit any more): remove it if it is still setup's."""
    action = decide_remove(host.read(path), recorded, force=False)
    shown = host.path(path)
    if action == GONE:
        manifest.files.pop(path, None)
    elif action == KEEP:
        host.say(f"kept (edited by hand; setup no longer writes it): {shown}")
    else:
        if not host.dry:
            host.remove(path)
            manifest.files.pop(path, None)
        host.say(f"{'would remove' if host.dry else 'removed'} (setup no longer writes it): {shown}")
    return action


def _save_manifest(host: _Host, before: Manifest | None, after: Manifest) -> None:
    if before is not None and before.to_json() == after.to_json():
        return
    if before is None and not after.files:
        return
    try:
        host.makedirs(os.path.dirname(MANIFEST))
    except OSError as exc:
        raise PermissionProblem(f"cannot create {host.path(os.path.dirname(MANIFEST))} ({exc.strerror}): "
                                f"run setup as root") from None
    after.dirs_created = sorted(set(after.dirs_created) | set(host.created))
    host.write(MANIFEST, after.to_json().encode("utf-8"))


def _check_live(host: _Host, cfg: Config, budget: int, ssh: SshUnit | None, results: dict[str, str],
                changed: bool) -> None:
    """Does systemd now say what the files say?  (daemon-reload re-applies the
    cgroup properties of loaded units; a unit that is not loaded gets them when
    it starts.)  Quiet when nothing changed and all is well."""
    if host.dry:
        return
    checks: list[tuple[str, dict[str, int]]] = []
    if results.get(f"{UNIT_DIR}/{cfg.slice}") != KEEP:
        checks.append((cfg.slice, {"MemoryMax": budget}))
    if ssh is not None and results.get(f"{UNIT_DIR}/{ssh.name}.d/{DROPIN}") != KEEP:
        checks.append((ssh.name, {"OOMScoreAdjust": -1000, "MemoryMin": SSHD_MEMORY_MIN}))
        for parent in slice_ancestors(ssh.slice):
            if results.get(f"{UNIT_DIR}/{parent}.d/{DROPIN}") != KEEP:
                checks.append((parent, {"MemoryMin": SSHD_MEMORY_MIN}))
    for unit, want in checks:
        got = host.show([unit], [*want, "ControlGroup"])
        props = got[0] if got else {}
        wrong = []
        for key, value in want.items():
            have = props.get(key, "")
            ok = _as_int(have) == value or (key == "MemoryMin" and (_as_int(have) or 0) >= value)
            if not ok:
                wrong.append(f"{key}={have or '?'} (want {_show_value(key, value)})")
        if wrong:
            host.warn(f"systemd reports {unit} {', '.join(wrong)}: see `systemctl cat {unit}` for a "
                      f"drop-in that overrides setup's")
            continue
        kernel = ""
        if "MemoryMax" in want and props.get("ControlGroup"):
            limit, name = _cgroup_limit(props["ControlGroup"])
            if name and (limit is None or abs(limit - want["MemoryMax"]) >= 64 * K):  # v1: whole pages
                host.warn(f"the kernel caps {unit} at {format_size(limit) if limit else 'nothing'} ({name}), "
                          f"not {format_size(want['MemoryMax'])}: `systemctl restart {unit}` applies it")
                continue
            if name:
                kernel = f", cgroup {name} {format_size(limit)}"
        if changed:
            shown = " ".join(f"{k}={_show_value(k, v)}" for k, v in want.items())
            host.say(f"live: {unit} {shown} (systemctl show{kernel})")


def _cgroup_limit(control_group: str) -> tuple[int | None, str]:
    """The memory limit the kernel enforces on a unit's cgroup (an active unit),
    and the file it is in; (None, "") when the cgroup does not exist."""
    from buildgate.cgroup import MemoryCgroup, detect_layout

    layout = detect_layout()
    if layout.version == 0:
        return None, ""
    group = MemoryCgroup(layout, control_group)
    if not group.exists():
        return None, ""
    return group.limit(), "memory.max" if layout.version == 2 else "memory.limit_in_bytes"


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _show_value(key: str, value: int) -> str:
    return str(value) if key == "OOMScoreAdjust" else format_size(value)


CAP_SYS_RESOURCE = 24


def parse_capabilities(status: str) -> int:
    """The effective capability mask from /proc/PID/status text (0 if absent)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_capability(cap: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            return bool(parse_capabilities(fh.read()) >> cap & 1)
    except OSError:
        return False


def _proc_start(pid: int) -> str | None:
    from buildgate.procs import starttime

    start = starttime(pid)
    return None if start is None else str(start)


def _oom_path(pid: int) -> str:
    from buildgate.cgroup import PROC_ROOT

    return os.path.join(PROC_ROOT, str(pid), "oom_score_adj")


def _sshd_oom(host: _Host, ssh: SshUnit | None, results: dict[str, str], manifest: Manifest) -> None:
    """OOMScoreAdjust= applies when sshd starts; give the running one the same
    now instead of restarting sshd under the operator's feet."""
    if ssh is None or not ssh.main_pid or results.get(f"{UNIT_DIR}/{ssh.name}.d/{DROPIN}") == KEEP:
        return
    try:
        with open(_oom_path(ssh.main_pid)) as fh:
            was = int(fh.read().strip())
    except (OSError, ValueError):
        return
    if was == -1000:
        return
    changed = results.get(f"{UNIT_DIR}/{ssh.name}.d/{DROPIN}") in (WRITE, UPDATE, OVERWRITE)
    cannot = ("note: OOMScoreAdjust=-1000 has no effect here: lowering oom_score_adj needs "
              "CAP_SYS_RESOURCE, which this host lacks (a container?); MemoryMin= still applies")
    if not has_capability(CAP_SYS_RESOURCE):
        if changed:  # said once, when the drop-in is written, not on every run
            host.say(cannot)
        return
    what = f"oom_score_adj -1000 on the running sshd ({ssh.name} pid {ssh.main_pid}; no restart needed)"
    if host.dry:
        host.say(f"would set: {what}")
        return
    try:
        with open(_oom_path(ssh.main_pid), "w") as fh:
            fh.write("-1000\n")
    except PermissionError:
        if changed:
            host.say(cannot)
        return
    except OSError as exc:
        host.warn(f"cannot set oom_score_adj of sshd pid {ssh.main_pid} ({exc.strerror}): "
                  f"`systemctl restart {ssh.name}` applies it")
        return
    manifest.sshd = {"unit": ssh.name, "pid": ssh.main_pid, "start": _proc_start(ssh.main_pid) or "", "was": was}
    host.say(f"set: {what}")


def _state_dir(host: _Host, cfg: Config) -> None:
    path = cfg.state_dir
    argv = ["systemd-tmpfiles", "--create", TMPFILES]
    if host.offline:
        return  # systemd-tmpfiles makes it at the target's boot
    try:
        st = os.lstat(path)
        ok = os.path.isdir(path) and not os.path.islink(path) and st.st_uid == 0 and st.st_mode & 0o7777 == 0o755
    except OSError:
        ok = False
    if ok:
        host.say(f"unchanged: {path} (state directory)")
    else:
        host.command(argv)


def _socket(host: _Host, changed: bool) -> None:
    if host.offline:
        return
    if not host.systemd:
        host.command(["systemctl", "enable", "--now", SOCKET_UNIT])
        return
    enabled = host.run(["systemctl", "is-enabled", SOCKET_UNIT], check=False).stdout.strip()
    active = host.run(["systemctl", "is-active", SOCKET_UNIT], check=False).stdout.strip()
    if enabled != "enabled" or active != "active":
        host.command(["systemctl", "enable", "--now", SOCKET_UNIT])
    elif changed:
        host.command(["systemctl", "restart", SOCKET_UNIT])  # listen as the new unit says
    else:
        host.say(f"unchanged: {SOCKET_UNIT} (enabled, listening)")


# --------------------------------------------------------------------------
# --undo


def _undo(opts: SetupOptions, host: _Host) -> None:
    manifest = _load_manifest(host)
    if manifest is None:
        host.say(f"nothing to undo: no {host.path(MANIFEST)} (setup did not run here, or was undone)")
        return
    try:
        cfg = _existing_config(host, opts.config_path or DEFAULT_PATH) or Config()
    except ConfigError:
        cfg = Config()
    decisions = {path: decide_remove(host.read(path), recorded, opts.force)
                 for path, recorded in sorted(manifest.files.items())}
    socket = f"{UNIT_DIR}/{SOCKET_UNIT}"
    if decisions.get(socket) == REMOVE and host.systemd:
        enabled = host.run(["systemctl", "is-enabled", SOCKET_UNIT], check=False).stdout.strip()
        active = host.run(["systemctl", "is-active", SOCKET_UNIT], check=False).stdout.strip()
        if enabled in ("enabled", "enabled-runtime") or active in ("active", "activating"):
            host.command(["systemctl", "disable", "--now", SOCKET_UNIT])
    left = Manifest(budget=manifest.budget, groups_created=list(manifest.groups_created), sshd=manifest.sshd,
                    dirs_created=list(manifest.dirs_created))
    removed_unit = False
    for path, action in decisions.items():
        shown = host.path(path)
        if action == GONE:
            host.say(f"already gone: {shown}")
        elif action == KEEP:
            host.say(("would be " if host.dry else "") + f"kept (edited by hand, --force to remove): {shown}")
            left.files[path] = manifest.files[path]
        else:
            if not host.dry:
                host.remove(path)
            host.say(f"{'would remove' if host.dry else 'removed'} {shown}")
            removed_unit = removed_unit or path.startswith(UNIT_DIR + "/")
    if removed_unit:
        host.command(["systemctl", "daemon-reload"])
    if host.systemd:
        _restore_sshd_oom(host, left)
        if decisions.get(socket) != KEEP:  # a kept socket unit still names the group
            _remove_groups(host, left)
    if not host.dry:
        if left.files or left.groups_created:
            host.write(MANIFEST, left.to_json().encode("utf-8"))
        else:
            host.remove(MANIFEST)
        # the directories setup made, deepest first, as far as they are empty now
        for directory in sorted(manifest.dirs_created, key=lambda d: d.count("/"), reverse=True):
            host.rmdir_if_empty(directory)
    if not host.offline and os.path.isdir(cfg.state_dir):
        host.say(f"left {cfg.state_dir} (queue state; on tmpfs it is gone at the next boot)")


def _restore_sshd_oom(host: _Host, left: Manifest) -> None:
    record = left.sshd
    left.sshd = None
    if not record:
        return
    try:
        pid, start, was = int(record["pid"]), str(record.get("start", "")), int(record["was"])
    except (KeyError, TypeError, ValueError):
        return
    if not pid or _proc_start(pid) != start:
        return  # sshd restarted since: it has what its unit says now
    try:
        with open(_oom_path(pid)) as fh:
            if int(fh.read().strip()) != -1000:
                return
    except (OSError, ValueError):
        return
    what = f"oom_score_adj {was} on sshd ({record.get('unit', '?')} pid {pid})"
    if host.dry:
        host.say(f"would restore: {what}")
        return
    try:
        with open(_oom_path(pid), "w") as fh:
            fh.write(f"{was}\n")
        host.say(f"restored: {what}")
    except OSError as exc:
        host.warn(f"cannot restore oom_score_adj of sshd pid {pid} ({exc.strerror}): restart {record.get('unit')}")


def _remove_groups(host: _Host, left: Manifest) -> None:
    """Groups setup created go too, unless someone has been put in them."""
    keep = []
    for name in left.groups_created:
        try:
            gr = grp.getgrnam(name)
        except KeyError:
            continue
        members = list(gr.gr_mem) + [p.pw_name for p in pwd.getpwall() if p.pw_gid == gr.gr_gid]
        if members:
            host.say(f"kept group {name} (members: {', '.join(sorted(set(members)))}; "
                     f"groupdel {name} to remove it)")
            keep.append(name)
            continue
        host.command(["groupdel", name])
        if host.dry:
            keep.append(name)
    left.groups_created = keep
