"""``buildgate doctor``: is this host protected, and if not, how to fix it.

Each check is a small function that gathers facts (files under /proc and the
cgroup root, ``systemctl show``, stat) and hands them to a *pure* ``decide_*``
function over plain values, which returns a :class:`Check`: a status, what was
found (with numbers) and the exact fix.  The unit tests feed the deciders canned
text and values; the roots are the ones tests override everywhere else
(``buildgate.cgroup.PROC_ROOT`` / ``CGROUP_ROOT``).

Nothing here prints or exits, and nothing found on the host raises: an
unreachable systemd, an unreadable file or an invalid config is a failing check.
See docs/doctor.md for every check and the exit codes.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple

from buildgate import cgroup
from buildgate.budget import Budget, parse_meminfo, resolve_budget
from buildgate.cgroup import Layout
from buildgate.config import DEFAULT_PATH, Config
from buildgate.errors import BuildgateError, ConfigError
from buildgate.sizes import format_size, parse_size

OK = "ok"
WARN = "warn"
FAIL = "fail"
INFO = "info"
_RANK = {INFO: 0, OK: 1, WARN: 2, FAIL: 3}

#: ``buildgate doctor`` exit codes (docs/doctor.md).
EXIT_PROTECTED = 0  # no check failed (warnings allowed)
EXIT_UNPROTECTED = 1  # at least one check failed
EXIT_CONFIG = 78  # the config file is invalid (as for every other command)

DEFAULT_GROUP = "buildgate"
#: Memory the host should keep beyond what its services use now, with every
#: build at its full budget; less is a warning.
HEADROOM_MIN = 512 * 1024**2
#: What the fixes suggest for sshd's (and its slices') MemoryMin=, and the
#: drop-in they name: the same as ``buildgate setup`` writes (setup.py).
SSHD_MEMORY_MIN = "64M"
SSH_DROPIN = "50-buildgate.conf"
SSH_UNITS = ("ssh.service", "sshd.service")  # Debian/Ubuntu, RHEL/Fedora/Arch
#: systemd >= 240 knows MemoryMin=; older ones ignore it.
SYSTEMD_MIN_VERSION = 240
_SYSTEMCTL_TIMEOUT = 15.0
M = 1024**2


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | info
    detail: str  # what was found, with numbers
    fix: str = ""  # the exact command or edit; empty when there is nothing to do
    data: dict[str, Any] = field(default_factory=dict, compare=False)  # numbers, for --json

    def render(self) -> str:
        tag = {FAIL: "FAIL", WARN: "WARN"}.get(self.status, self.status)
        line = f"{tag:<4}  {self.name}: {self.detail}"
        if self.fix:
            line += f"\n      fix: {self.fix}"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix, "data": dict(self.data)}


def worst(statuses: list[str]) -> str:
    return max(statuses, key=lambda s: _RANK[s]) if statuses else OK


def exit_code(checks: list[Check]) -> int:
    """0: protected (nothing failed); 1: something failed; 78: invalid config."""
    if any(c.name == "config" and c.status == FAIL for c in checks):
        return EXIT_CONFIG
    if any(c.status == FAIL for c in checks):
        return EXIT_UNPROTECTED
    return EXIT_PROTECTED


class _Findings:
    """Several findings of one check folded into one Check (the worst status wins)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[tuple[str, str, str]] = []
        self.data: dict[str, Any] = {}

    def add(self, status: str, detail: str, fix: str = "") -> None:
        self.items.append((status, detail, fix))

    def check(self) -> Check:
        status = worst([s for s, _, _ in self.items])
        detail = "; ".join(d for _, d, _ in self.items if d)
        fixes: list[str] = []
        for s, _, f in self.items:
            if f and s in (WARN, FAIL) and f not in fixes:
                fixes.append(f)
        return Check(self.name, status, detail, " && ".join(fixes), self.data)


# --------------------------------------------------------------------------
# pure parsers


class Swap(NamedTuple):
    name: str
    kind: str
    size: int  # bytes
    used: int  # bytes


def parse_swaps(text: str) -> list[Swap]:
    """/proc/swaps -> active swap areas (sizes there are in KiB)."""
    result = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit():
            result.append(Swap(parts[0], parts[1], int(parts[2]) * 1024, int(parts[3]) * 1024))
    return result


def parse_show(text: str) -> dict[str, str]:
    """``systemctl show`` output (KEY=VALUE lines) -> dict."""
    result = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            result[key] = value
    return result


def parse_version(text: str) -> int | None:
    """systemd's Version property ("252.39-1~deb12u2", "v255") -> 252."""
    digits = ""
    for ch in text.strip().lstrip("v"):
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def parse_bytes(value: str | None) -> int | None:
    """A byte property of ``systemctl show``: None for infinity / unset."""
    if value is None:
        return None
    value = value.strip()
    if not value or value in ("infinity", "[not set]") or not value.isdigit():
        return None
    number = int(value)
    return None if number >= 2**64 - 1 else number


def parse_int(value: str | None) -> int | None:
    try:
        return int((value or "").strip())
    except ValueError:
        return None


class FileInfo(NamedTuple):
    mode: int
    uid: int
    gid: int

    @classmethod
    def lstat(cls, path: str) -> FileInfo | None:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return cls(st.st_mode, st.st_uid, st.st_gid)


def _round_down(value: int, step: int = 256 * M) -> int:
    return max(step, value // step * step)


# --------------------------------------------------------------------------
# pure decisions


def decide_config(cfg: Config | None, error: ConfigError | None, default_path: str = DEFAULT_PATH) -> Check:
    if error is not None:
        return Check("config", FAIL,
                     f"{error}; every buildgate command exits 78 until it is fixed "
                     f"(the other checks below used the defaults)",
                     f"edit {error.path}: {error.why} (see docs/config.md)",
                     {"path": error.path})
    assert cfg is not None
    what = (f"slice {cfg.slice}, budget {cfg.budget or 'unset'}, state_dir {cfg.state_dir}, "
            f"backend {cfg.backend}")
    if cfg.source == "defaults":
        return Check("config", INFO, f"no {default_path}: defaults ({what})", "", {"path": None})
    return Check("config", OK, f"{cfg.source}: {what}", "", {"path": cfg.source})


def decide_systemd(booted: bool, pid1: str, version_text: str | None, error: str | None,
                   root: bool = True) -> Check:
    if not booted:
        return Check(
            "systemd", FAIL,
            f"systemd is not the init system (PID 1 is {pid1 or '?'}, no /run/systemd/system): "
            f"no build scopes in a slice, no slice cap and no sshd protection through units",
            "run buildgate on a systemd host (without one, only the cgroupfs backend caps "
            "builds, as root or in a delegated cgroup: see the backend check)",
            {"booted": False, "pid1": pid1},
        )
    if error is not None and not root:
        # builds of non-root callers go through the helper, which is root and
        # talks to systemd's private socket: only this doctor run is blind
        return Check("systemd", WARN,
                     f"systemd is init, but this user cannot reach it over D-Bus ({error}): "
                     f"the slice and sshd checks cannot see anything", "sudo buildgate doctor",
                     {"booted": True, "pid1": pid1})
    if error is not None:
        return Check(
            "systemd", FAIL,
            f"systemd is init but cannot be reached ({error})",
            "systemctl is-system-running (as root); for non-root callers: systemctl start dbus.socket",
            {"booted": True, "pid1": pid1},
        )
    version = parse_version(version_text or "")
    data = {"booted": True, "pid1": pid1, "version": version, "version_text": version_text}
    label = f"systemd {version_text}" if version_text else "systemd (version unknown)"
    if version is not None and version < SYSTEMD_MIN_VERSION:
        return Check("systemd", WARN,
                     f"{label} is init; before {SYSTEMD_MIN_VERSION} MemoryMin= is ignored "
                     f"(sshd cannot be shielded from reclaim)",
                     "upgrade systemd (a current distribution release)", data)
    return Check("systemd", OK, f"{label} is init and reachable", "", data)


def decide_cgroup(layout: Layout, hybrid: bool = False) -> Check:
    data = {"version": layout.version, "mount": layout.mount}
    if layout.version == 2:
        return Check("cgroup", OK,
                     f"cgroup v2 at {layout.mount}, memory controller available "
                     f"(memory.max, memory.min, memory.swap.max)", "", data)
    if layout.version == 1:
        kind = "hybrid: v2 mounted too, without memory" if hybrid else "legacy"
        return Check("cgroup", OK,
                     f"cgroup v1 memory controller at {layout.mount} ({kind}): caps work; "
                     f"MemoryMin=, MemoryHigh= and MemorySwapMax= are v2-only and have no effect",
                     "", data)
    return Check("cgroup", FAIL,
                 "no usable memory controller (neither cgroup v2 with memory nor the v1 memory "
                 "hierarchy): builds cannot be capped",
                 "add cgroup_enable=memory to GRUB_CMDLINE_LINUX in /etc/default/grub, then "
                 "update-grub && reboot", data)


def decide_backend(name: str | None, error: str | None, configured: str, config_file: str,
                   euid: int, blocked: str | None = None) -> Check:
    """``blocked``: why cgroup v2 would not give children the memory controller
    (backends.v2_memory_blocked), when that is what left only lock-only."""
    data = {"backend": name, "configured": configured}
    if error is not None or name is None:
        fix = (f"set backend = \"auto\" in {config_file}" if configured != "auto"
               else "run on a systemd host")
        return Check("backend", FAIL, f"buildgate run would refuse to start builds: {error}", fix, data)
    if name == "none":
        if configured == "none":
            fix = f"set backend = \"auto\" in {config_file}"
        elif euid != 0:
            fix = "run builds as root, or have root run buildgate setup (non-root builds through the helper)"
        elif blocked:
            fix = f"{blocked} (cgroup_root = \"/sys/fs/cgroup/DELEGATED\" in {config_file}), or run on a systemd host"
        else:
            fix = ("run on a systemd host, or make a memory cgroup writable "
                   "(cgroup_root = \"/sys/fs/cgroup/DELEGATED\" in the config)")
        return Check("backend", FAIL,
                     f"buildgate run would use backend none (backend = {configured}): "
                     f"builds run UNCAPPED, only queued", fix, data)
    how = {"systemd": "transient scopes in the build slice, capped by systemd",
           "cgroupfs": "cgroups written directly (no systemd), capped by the kernel"}[name]
    return Check("backend", OK, f"buildgate run would use {name} (backend = {configured}): {how}",
                 "", data)


def decide_backend_nonroot(user: str, socket: str, exists: bool, usable: bool, group: str,
                           root_backend: str) -> Check:
    """Not root: ``buildgate run`` goes through the privileged helper, where root
    picks the backend (``root_backend`` is our best guess of it)."""
    data = {"backend": "helper", "socket": socket, "root_backend": root_backend}
    if not exists:
        return Check("backend", WARN,
                     f"as {user}, buildgate run is refused: only root can run builds here "
                     f"(no {socket})", "buildgate setup (as root)", data)
    if not usable:
        return Check("backend", WARN,
                     f"as {user}, buildgate run is refused: {socket} is for group {group}, "
                     f"and {user} is not in it", f"usermod -aG {group} {user} (as root; then log in again)",
                     data)
    if root_backend == "none":
        return Check("backend", FAIL,
                     f"as {user}, buildgate run goes through the helper ({socket}), but root "
                     f"there can write no memory cgroup: builds run UNCAPPED",
                     "run on a systemd host (run buildgate doctor as root for details)", data)
    return Check("backend", OK,
                 f"as {user}, buildgate run goes through the privileged helper ({socket}); "
                 f"root there uses {root_backend} (run buildgate doctor as root to check it)", "", data)


def decide_swap(swaps: list[Swap], swap_total: int, version: int, accounting: bool | None) -> Check:
    size = max(swap_total, sum(s.size for s in swaps))
    used = sum(s.used for s in swaps)
    data = {"swap_total": size, "swap_used": used, "accounting": accounting}
    if size == 0:
        return Check("swap", OK, "no swap: a build at its cap is OOM-killed at once, never swapped",
                     "", data)
    areas = ", ".join(f"{s.name} {format_size(s.size)}" for s in swaps) or "SwapTotal"
    found = f"swap {format_size(size)} ({areas}; {format_size(used) if used else '0'} used)"
    if accounting:
        how = ("memory.swap.max: MemorySwapMax=0 keeps builds out of swap" if version == 2 else
               "memory.memsw.*: buildgate caps each build's memory+swap at its cap")
        return Check("swap", OK, f"{found}; swap accounting on ({how})", "", data)
    files = "memory.swap.max" if version == 2 else "memory.memsw.*" if version == 1 else "swap files"
    off = "swapoff -a (and remove the swap line from /etc/fstab)"
    if version == 2:
        fix = (f"remove swapaccount=0 from GRUB_CMDLINE_LINUX in /etc/default/grub, then "
               f"update-grub && reboot; or turn swap off: {off}")
    else:
        fix = (f"add swapaccount=1 to GRUB_CMDLINE_LINUX in /etc/default/grub, then "
               f"update-grub && reboot; or turn swap off: {off}")
    if accounting is None:
        return Check("swap", WARN,
                     f"{found}; could not tell whether swap accounting is on (no {files} found "
                     f"to look at)", fix, data)
    return Check("swap", FAIL,
                 f"{found} but no swap accounting (no {files}): MemorySwapMax=0 cannot be "
                 f"enforced, so a build at its cap swaps instead of being killed and can drag "
                 f"the host into swap with it", fix, data)


def slice_fix(slice_name: str, size: int) -> str:
    return f"buildgate setup (or by hand: systemctl set-property {slice_name} MemoryMax={format_size(size)})"


def decide_slice(slice_name: str, props: dict[str, str] | None, error: str | None,
                 suggested: int, root: bool = True) -> Check:
    """The slice as ``systemctl show SLICE`` describes it."""
    if error is not None or props is None:
        if not root:
            return Check("slice", WARN, f"cannot ask systemd about {slice_name} as this user ({error})",
                         "sudo buildgate doctor")
        return Check("slice", FAIL, f"cannot ask systemd about {slice_name} ({error})",
                     f"systemctl status {slice_name}")
    load = props.get("LoadState", "")
    fragment = props.get("FragmentPath", "")
    dropins = props.get("DropInPaths", "").split()
    cap = parse_bytes(props.get("MemoryMax"))
    data = {"slice": slice_name, "load_state": load, "fragment": fragment or None,
            "dropins": dropins, "memory_max": cap, "active_state": props.get("ActiveState")}
    if load == "masked":
        return Check("slice", FAIL, f"{slice_name} is masked: systemd refuses to start builds in it",
                     f"systemctl unmask {slice_name}", data)
    if load not in ("loaded", ""):
        return Check("slice", FAIL, f"{slice_name}: LoadState={load} (a broken unit file)",
                     f"systemctl status {slice_name}; fix the unit file and systemctl daemon-reload",
                     data)
    if not fragment and not dropins:
        return Check("slice", WARN,
                     f"{slice_name} has no unit file: systemd makes it on the fly, uncapped "
                     f"(each build is still capped, but nothing caps all builds together)",
                     slice_fix(slice_name, suggested), data)
    where = " + ".join([fragment, *dropins] if fragment else dropins)
    if cap is None:
        return Check("slice", WARN,
                     f"{slice_name} ({where}) has MemoryMax=infinity: nothing caps all builds together",
                     slice_fix(slice_name, suggested), data)
    state = props.get("ActiveState", "?")
    return Check("slice", OK, f"{slice_name}: MemoryMax={format_size(cap)} from {where} ({state})",
                 "", data)


def decide_budget(total: int, available: int, build_now: int, budget: Budget,
                  fix_target: str, largest: list[tuple[str, int]] | None = None) -> Check:
    """Will the host keep enough memory with every build at its full budget?

    ``fix_target``: how to lower the budget, with ``{size}`` in it.
    ``largest``: the biggest memory users outside builds, (name, RSS), so the
    operator sees what the headroom is for (and what grew since setup).
    """
    used = max(0, total - available)
    services = max(0, used - build_now)
    headroom = total - budget.bytes - services
    data = {"mem_total": total, "mem_available": available, "builds_now": build_now,
            "services_now": services, "budget": budget.bytes, "budget_source": budget.source,
            "headroom": headroom, "largest": [{"name": n, "rss": r} for n, r in largest or []]}
    biggest = ", ".join(f"{n} {format_size(r)}" for n, r in (largest or [])[:4])
    found = (f"budget {format_size(budget.bytes)} ({budget.source}) + {format_size(services)} "
             f"used outside builds now{f' (largest: {biggest})' if biggest else ''} = "
             f"{format_size(budget.bytes + services)} of MemTotal {format_size(total)}")
    suggested = _round_down(total - services - HEADROOM_MIN)
    if headroom < 0:
        return Check("budget", FAIL,
                     f"{found}: with all builds at their budget the host is "
                     f"{format_size(-headroom)} short and swaps or OOM-kills services",
                     fix_target.format(size=format_size(suggested)), data)
    if headroom < HEADROOM_MIN:
        return Check("budget", WARN,
                     f"{found}: only {format_size(headroom) if headroom else '0'} left for the "
                     f"host with all builds at their budget (less than "
                     f"{format_size(HEADROOM_MIN)}: sshd may not be able to fork)",
                     fix_target.format(size=format_size(suggested)), data)
    return Check("budget", OK, f"{found}: {format_size(headroom)} left for the host", "", data)


def ssh_dropin_fix(unit: str, version: int) -> str:
    """The drop-in ``buildgate setup`` writes for the ssh unit, as one shell command."""
    body = "[Service]\\nOOMScoreAdjust=-1000\\n"
    if version == 2:
        body += f"MemoryMin={SSHD_MEMORY_MIN}\\n"
    d = f"/etc/systemd/system/{unit}.d"
    return (f"mkdir -p {d} && printf '{body}' > {d}/{SSH_DROPIN} && systemctl daemon-reload"
            f" && systemctl restart {unit}")


def decide_sshd(unit: str | None, props: dict[str, str], live_adj: int | None,
                ancestors: list[tuple[str, int | None]], version: int,
                oom_adjustable: bool | None = None) -> Check:
    """sshd as systemd runs it.

    ``live_adj``: oom_score_adj of its running main process.  ``ancestors``: the
    slices above the unit up to (not including) -.slice, with their MemoryMin;
    v2 bounds a cgroup's effective memory.min by its ancestors'.
    ``oom_adjustable``: whether this kernel lets root set a negative
    oom_score_adj at all (False in some containers and sandboxes).
    """
    f = _Findings("sshd")
    if unit is None:
        f.add(INFO, f"no {' or '.join(SSH_UNITS)} unit: no ssh server to protect")
        return f.check()
    adj = parse_int(props.get("OOMScoreAdjust"))
    mem_min = parse_bytes(props.get("MemoryMin")) or 0
    pid = parse_int(props.get("MainPID")) or 0
    f.data.update({"unit": unit, "oom_score_adjust": adj, "memory_min": mem_min, "main_pid": pid,
                   "live_oom_score_adj": live_adj, "active_state": props.get("ActiveState"),
                   "oom_adjustable": oom_adjustable})
    by_hand = True  # the fix is a command: offer buildgate setup first
    if adj != -1000:
        refused = (" (and this kernel refuses a negative oom_score_adj: not even that would "
                   "protect sshd here)") if oom_adjustable is False else ""
        f.add(FAIL, f"{unit} OOMScoreAdjust={adj} (-1000 wanted): under memory pressure the OOM "
                    f"killer may pick sshd and lock you out{refused}", ssh_dropin_fix(unit, version))
    elif pid and live_adj is not None and live_adj != -1000 and oom_adjustable is False:
        f.add(FAIL, f"{unit} has OOMScoreAdjust=-1000 but the running sshd (pid {pid}) has "
                    f"oom_score_adj {live_adj}: this kernel refuses a negative oom_score_adj "
                    f"(a container or sandbox?), so the OOM killer may pick sshd here",
              "none from inside: protect sshd where the kernel allows it (a VM or the host)")
        by_hand = False
    elif pid and live_adj is not None and live_adj != -1000:
        f.add(FAIL, f"{unit} has OOMScoreAdjust=-1000 but the running sshd (pid {pid}) has "
                    f"oom_score_adj {live_adj}: it was started before the setting",
              f"echo -1000 > /proc/{pid}/oom_score_adj")
    else:
        running = f", running pid {pid}: {live_adj}" if pid and live_adj is not None else ""
        if not pid:
            running = f", {props.get('ActiveState', 'not running')}"
        f.add(OK, f"{unit} OOMScoreAdjust=-1000{running}")
    if version != 2:
        f.add(INFO, f"MemoryMin={format_size(mem_min) if mem_min else '0'} (cgroup v1: "
                    f"no effect; OOMScoreAdjust is the protection)")
    else:
        f.data["memory_min_chain"] = {name: value or 0 for name, value in [(unit, mem_min), *ancestors]}
        target = mem_min or parse_size(SSHD_MEMORY_MIN)
        short = [(name, value or 0) for name, value in ancestors if (value or 0) < target]
        effective = min([mem_min, *(value or 0 for _, value in ancestors)])
        f.data["memory_min_effective"] = effective
        raise_slices = " && ".join(f"systemctl set-property {name} MemoryMin={format_size(target)}"
                                   for name, _ in short)
        if mem_min == 0:
            also = "".join(f"; {name} has MemoryMin={format_size(v) if v else '0'} too"
                           for name, v in short)
            f.add(WARN, f"{unit} MemoryMin=0: under pressure sshd's memory is reclaimed and "
                        f"logins crawl{also}", ssh_dropin_fix(unit, version))
            if raise_slices:
                f.add(WARN, "", raise_slices)
        elif short:
            name, value = min(short, key=lambda nv: nv[1])
            f.add(WARN, f"{unit} MemoryMin={format_size(mem_min)} but {name} has MemoryMin="
                        f"{format_size(value) if value else '0'}: a cgroup's protection is bounded "
                        f"by its ancestors', so sshd gets {format_size(effective) if effective else 'none'}",
                  raise_slices)
        else:
            through = f" through {', '.join(n for n, _ in ancestors)}" if ancestors else ""
            f.add(OK, f"MemoryMin={format_size(mem_min)} (effective{through})")
    check = f.check()
    if check.fix and by_hand:
        check = replace(check, fix=f"buildgate setup (or by hand: {check.fix})")
    return check


def decide_sshd_processes(found: list[tuple[int, int | None]],
                          oom_adjustable: bool | None = None) -> Check:
    """sshd without systemd: its listening processes (pid, oom_score_adj)."""
    if not found:
        return Check("sshd", INFO, "no sshd running: no ssh server to protect")
    bad = [(pid, adj) for pid, adj in found if adj != -1000]
    data = {"processes": {str(pid): adj for pid, adj in found}}
    if not bad:
        pids = ", ".join(str(pid) for pid, _ in found)
        return Check("sshd", OK, f"sshd (pid {pids}) has oom_score_adj -1000", "", data)
    text = ", ".join(f"pid {pid}: {adj}" for pid, adj in bad)
    fix = " && ".join(f"echo -1000 > /proc/{pid}/oom_score_adj" for pid, _ in bad)
    fix += " (and make it permanent in sshd's init script)"
    refused = ""
    if oom_adjustable is False:
        refused = ("; this kernel refuses a negative oom_score_adj (a container or sandbox?), "
                   "so sshd cannot be protected from in here")
        fix = "none from inside: protect sshd where the kernel allows it (a VM or the host)"
    return Check("sshd", FAIL,
                 f"sshd oom_score_adj ({text}) is not -1000: the OOM killer may pick sshd{refused}",
                 fix, data)


def decide_state_dir(path: str, info: FileInfo | None, q_info: FileInfo | None, euid: int) -> Check:
    """The rules of queue.prepare_state_dir, without creating anything."""
    if info is None:
        return Check("state_dir", INFO,
                     f"{path} does not exist yet: the first build (as root) or buildgate setup "
                     f"creates it", "", {"path": path, "exists": False})
    f = _Findings("state_dir")
    f.data.update({"path": path, "exists": True, "mode": f"{stat.S_IMODE(info.mode):04o}",
                   "uid": info.uid, "gid": info.gid})
    for sub, what, si in ((path, "state directory", info),
                          (os.path.join(path, "q"), "queue directory", q_info)):
        if si is None:
            continue
        if stat.S_ISLNK(si.mode):
            f.add(FAIL, f"{what} {sub} is a symlink: whoever controls its target can fake or "
                        f"delete tickets (buildgate run refuses it, exit 77)", f"rm {sub}")
            continue
        if not stat.S_ISDIR(si.mode):
            f.add(FAIL, f"{what} {sub} is not a directory (buildgate run refuses it, exit 77)",
                  f"rm {sub}")
            continue
        if si.uid not in (0, euid):
            f.add(FAIL, f"{what} {sub} is owned by uid {si.uid}, not root: that user can fake or "
                        f"delete tickets (buildgate run refuses it, exit 77)", f"chown root {sub}")
        if si.mode & stat.S_IWOTH and not si.mode & stat.S_ISVTX:
            f.add(FAIL, f"{what} {sub} is world-writable (mode {stat.S_IMODE(si.mode):04o}): anyone "
                        f"can fake or delete tickets (buildgate run refuses it, exit 77)",
                  f"chmod o-w {sub}")
    if not f.items:
        f.add(OK, f"{path}: a directory owned by uid {info.uid}, mode {stat.S_IMODE(info.mode):04o}")
    return f.check()


def decide_helper(path: str, info: FileInfo | None, group: str, gid: int | None,
                  members: list[str]) -> Check:
    """The non-root path: the helper socket, group-owned by ``group``, mode 0660."""
    data: dict[str, Any] = {"socket": path, "group": group, "gid": gid, "members": members}
    setup = f"buildgate setup --group {group}" if group != DEFAULT_GROUP else "buildgate setup"
    if info is None:
        missing = f"no {path}" + ("" if gid is not None else f" and no group {group}")
        return Check("helper", WARN,
                     f"non-root builds are not set up ({missing}): only root can run capped builds",
                     setup, data)
    mode = stat.S_IMODE(info.mode)
    data["mode"] = f"{mode:04o}"
    if not stat.S_ISSOCK(info.mode):
        return Check("helper", FAIL, f"{path} is not a socket", f"rm {path} && {setup}", data)
    f = _Findings("helper")
    f.data.update(data)
    if gid is None:
        f.add(WARN, f"group {group} does not exist: nobody can use the helper",
              f"groupadd --system {group}")
    elif info.gid != gid:
        f.add(WARN, f"{path} belongs to gid {info.gid}, not group {group} ({gid})",
              f"{setup} (it sets SocketGroup={group} in buildgate-helper.socket)")
    if mode & 0o006:
        f.add(FAIL, f"{path} has mode {mode:04o}: any local user can ask for builds",
              f"{setup} (it sets SocketMode=0660 in buildgate-helper.socket)")
    elif mode != 0o660:
        f.add(WARN, f"{path} has mode {mode:04o}, not 0660",
              f"{setup} (it sets SocketMode=0660 in buildgate-helper.socket)")
    if not f.items:
        who = ", ".join(members) if members else "no members yet: usermod -aG " + group + " USER"
        f.add(OK, f"{path} is a socket, group {group} (gid {gid}), mode 0660; members: {who}")
    return f.check()


@dataclass(frozen=True)
class QueueFacts:
    running: int  # holding a reservation (admitted, starting, running), orphans included
    waiting: int
    orphaned: int  # buildgate gone, build still running: it keeps its reservation
    leftovers: list[str]  # scopes/cgroups of dead builds whose processes linger
    cleaned: int  # tickets of dead buildgates (deleted by this scan unless readonly)
    reserved: int  # bytes reserved by running builds
    readonly: bool = False  # scanned without the mutex (not root): nothing deleted


def decide_queue(facts: QueueFacts | None, why_not: str = "", budget: int | None = None,
                 unreadable: bool = False) -> Check:
    if facts is None:
        if unreadable:
            return Check("queue", WARN, why_not, "run buildgate doctor as root")
        return Check("queue", INFO, why_not or "no queue yet")
    data = {"running": facts.running, "waiting": facts.waiting, "orphaned": facts.orphaned,
            "leftovers": facts.leftovers, "cleaned": facts.cleaned, "reserved": facts.reserved,
            "readonly": facts.readonly}
    text = f"{facts.running} running, {facts.waiting} waiting, {facts.orphaned} orphaned"
    if facts.running:
        of = f" of {format_size(budget)}" if budget else ""
        text += f" ({format_size(facts.reserved)}{of} reserved)"
    if facts.orphaned:
        text += " (their buildgate died; each keeps its reservation until its build exits)"
    if facts.cleaned:
        tickets = f"{facts.cleaned} stale ticket{'s' if facts.cleaned != 1 else ''} of dead buildgates"
        text += (f"; {tickets} (the next build removes them)" if facts.readonly
                 else f"; removed {tickets}")
    if facts.leftovers:
        stops = " && ".join(_stop_command(s) for s in facts.leftovers)
        return Check("queue", WARN,
                     f"{text}; {len(facts.leftovers)} dead build(s) left processes behind "
                     f"({', '.join(facts.leftovers)}): they hold their reservation until stopped "
                     f"(the next waiting buildgate stops them)", stops, data)
    return Check("queue", OK, text, "", data)


def _stop_command(where: str) -> str:
    if where.endswith(".scope") and "/" not in where:
        return f"systemctl stop {where}"
    return f"kill $(cat {where}/cgroup.procs)"


# --------------------------------------------------------------------------
# gathering facts


class SystemctlError(Exception):
    pass


def systemctl_show(unit: str | None, props: list[str]) -> dict[str, str]:
    """``systemctl show [UNIT] -p ...`` -> properties; SystemctlError when unreachable."""
    if shutil.which("systemctl") is None:
        raise SystemctlError("systemctl not found")
    args = ["systemctl", "show", *([unit] if unit else []), *(f"--property={p}" for p in props)]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=_SYSTEMCTL_TIMEOUT,
                             check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SystemctlError(f"systemctl show timed out after {_SYSTEMCTL_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise SystemctlError(f"cannot run systemctl ({exc.strerror})") from None
    if out.returncode != 0:
        why = " ".join(out.stderr.split())[:200] or f"exit {out.returncode}"
        raise SystemctlError(why)
    return parse_show(out.stdout)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _proc(*parts: str) -> str:
    return os.path.join(cgroup.PROC_ROOT, *parts)


def swap_accounting(layout: Layout) -> bool | None:
    """Is swap charged to cgroups?  v2: memory.swap.max exists (never in the root
    cgroup: look in ours and in the root's children); v1: memory.memsw.* exists."""
    if layout.version == 1:
        return os.path.exists(os.path.join(layout.mount, "memory.memsw.limit_in_bytes"))
    if layout.version != 2:
        return None
    candidates = []
    own = cgroup.parse_proc_cgroup(_read(_proc("self", "cgroup")) or "").get("")
    if own is not None:
        candidates.append(layout.dir_of(own))
    try:
        candidates += [e.path for e in os.scandir(layout.mount) if e.is_dir(follow_symlinks=False)]
    except OSError:
        pass
    seen_memory = False
    for d in candidates:
        if os.path.exists(os.path.join(d, "memory.swap.max")):
            return True
        if os.path.exists(os.path.join(d, "memory.max")):
            seen_memory = True
    return False if seen_memory else None


def _is_hybrid(layout: Layout) -> bool:
    return layout.version == 1 and os.path.isdir(os.path.join(cgroup.CGROUP_ROOT, "unified"))


class Host:
    """Facts shared by several checks, gathered once and lazily."""

    def __init__(self, cfg: Config, config_ok: bool) -> None:
        self.cfg = cfg
        self.config_ok = config_ok
        self.booted = os.path.isdir("/run/systemd/system")
        self._layout: Layout | None = None
        self._meminfo: dict[str, int] | None = None
        self._slice: tuple[dict[str, str] | None, str | None] | None = None

    def _show_slice(self) -> tuple[dict[str, str] | None, str | None]:
        if self._slice is None:
            try:
                self._slice = (systemctl_show(self.cfg.slice, [
                    "Id", "LoadState", "ActiveState", "FragmentPath", "DropInPaths",
                    "MemoryMax", "MemoryCurrent", "ControlGroup"]), None)
            except SystemctlError as exc:
                self._slice = (None, str(exc))
        return self._slice

    @property
    def slice_props(self) -> dict[str, str] | None:
        """``systemctl show SLICE`` (None when systemd could not be asked)."""
        return self._show_slice()[0] if self.booted else None

    @property
    def slice_error(self) -> str | None:
        return self._show_slice()[1] if self.booted else None

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = cgroup.detect_layout()
        return self._layout

    @property
    def meminfo(self) -> dict[str, int]:
        if self._meminfo is None:
            self._meminfo = parse_meminfo(_read(_proc("meminfo")) or "")
        return self._meminfo

    def slice_max(self) -> int | None:
        if self.booted:
            return parse_bytes((self.slice_props or {}).get("MemoryMax"))
        if self.layout.version:
            from buildgate.backends import CgroupfsBackend

            return CgroupfsBackend(self.cfg).slice_max()
        return None

    def builds_now(self) -> int:
        """Memory the build slice uses now (0 when it does not exist)."""
        if self.booted:
            props = self.slice_props or {}
            path = props.get("ControlGroup", "")
            if path and self.layout.version:
                current = cgroup.MemoryCgroup(self.layout, path).current()
                if current is not None:
                    return current
            return parse_bytes(props.get("MemoryCurrent")) or 0
        if self.layout.version:
            from buildgate.backends import cgroupfs_parent

            parent = cgroupfs_parent(self.cfg, self.layout)
            if parent:
                name = "memory.current" if self.layout.version == 2 else "memory.usage_in_bytes"
                text = _read(os.path.join(parent, self.cfg.slice, name))
                if text and text.strip().isdigit():
                    return int(text.strip())
        return 0

    def budget(self) -> Budget:
        total = self.meminfo.get("MemTotal", 0)
        return resolve_budget(self.cfg, total, self.slice_max())

    def suggested_slice_cap(self) -> int:
        """What a new slice cap should be: the configured budget, else the default."""
        total = self.meminfo.get("MemTotal", 0)
        return resolve_budget(self.cfg, total, None).bytes

    @property
    def config_file(self) -> str:
        return self.cfg.source if self.cfg.source != "defaults" else DEFAULT_PATH


def load(config_path: str | None) -> tuple[Config | None, ConfigError | None]:
    from buildgate.config import load_config

    try:
        return load_config(config_path), None
    except ConfigError as exc:
        return None, exc


# --------------------------------------------------------------------------
# the checks


def check_systemd(host: Host) -> Check:
    pid1 = (_read(_proc("1", "comm")) or "").strip()
    if not host.booted:
        return decide_systemd(False, pid1, None, None)
    try:
        version = systemctl_show(None, ["Version"]).get("Version")
    except SystemctlError as exc:
        return decide_systemd(True, pid1, None, str(exc), os.geteuid() == 0)
    return decide_systemd(True, pid1, version, None)


def check_cgroup(host: Host) -> Check:
    return decide_cgroup(host.layout, _is_hybrid(host.layout))


def check_backend(host: Host) -> Check:
    from buildgate.backends import probe

    if os.geteuid() != 0:
        import pwd

        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = str(os.geteuid())
        sock = host.cfg.helper_socket
        exists = os.path.exists(sock)
        usable = exists and os.access(sock, os.R_OK | os.W_OK)
        guess = "systemd" if host.booted else "cgroupfs" if host.layout.version else "none"
        return decide_backend_nonroot(user, sock, exists, usable, host.cfg.group, guess)

    try:
        name: str | None = probe(host.cfg)
        error = None
    except BuildgateError as exc:
        name, error = None, str(exc)
    blocked = None
    if name == "none" and host.layout.version == 2:
        from buildgate.backends import v2_memory_blocked

        parent = host.cfg.cgroup_root or host.layout.mount
        blocked = v2_memory_blocked(parent) if os.path.isdir(parent) else None
    return decide_backend(name, error, host.cfg.backend, host.config_file, os.geteuid(), blocked)


def check_swap(host: Host) -> Check:
    swaps = parse_swaps(_read(_proc("swaps")) or "")
    return decide_swap(swaps, host.meminfo.get("SwapTotal", 0), host.layout.version,
                       swap_accounting(host.layout))


def check_slice(host: Host) -> Check:
    name = host.cfg.slice
    if not host.booted:
        from buildgate.backends import cgroupfs_parent

        parent = cgroupfs_parent(host.cfg, host.layout)
        if parent is None:
            return Check("slice", INFO, f"no systemd and no writable memory cgroup: no {name} to check")
        cap = host.slice_max()
        where = os.path.join(parent, name)
        if cap is None:
            return Check("slice", INFO,
                         f"no systemd: cgroupfs builds go in {where}, which has no memory limit "
                         f"(each build is still capped)", "", {"slice": where, "memory_max": None})
        return Check("slice", OK, f"no systemd: cgroupfs builds go in {where}, limit {format_size(cap)}",
                     "", {"slice": where, "memory_max": cap})
    return decide_slice(name, host.slice_props, host.slice_error, host.suggested_slice_cap(),
                        os.geteuid() == 0)


def check_budget(host: Host) -> Check:
    mi = host.meminfo
    total = mi.get("MemTotal", 0)
    if not total:
        return Check("budget", FAIL, f"cannot read MemTotal from {_proc('meminfo')}",
                     f"mount -t proc proc {cgroup.PROC_ROOT}")
    available = mi.get("MemAvailable", mi.get("MemFree", 0) + mi.get("Cached", 0) + mi.get("Buffers", 0))
    budget = host.budget()
    cfg = host.cfg
    configured = parse_size(cfg.budget, percent_of=total) if cfg.budget else None
    slice_max = host.slice_max()
    if slice_max is not None and (configured is None or slice_max < configured) and host.booted:
        target = f"systemctl set-property {cfg.slice} MemoryMax={{size}}"  # the smaller wins
    else:
        target = f"set budget = \"{{size}}\" in {host.config_file}"
    return decide_budget(total, available, host.builds_now(), budget, target,
                         largest_users(host.cfg.slice))


def largest_users(build_slice: str, count: int = 10) -> list[tuple[str, int]]:
    """The biggest resident memory users outside the build slice, RSS summed
    per process name (a service's workers count together), largest first.
    psutil does the process walk; doctor is off the hot path."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - a dependency, but doctor must not die of it
        return []
    per_name: dict[str, int] = {}
    me = os.getpid()
    for proc in psutil.process_iter(["name", "memory_info"]):
        if proc.pid == me:
            continue  # doctor itself is not what the headroom is for
        info = proc.info
        mem = info.get("memory_info")
        if mem is None or not mem.rss:
            continue  # kernel threads, gone, or not ours to read
        try:
            with open(os.path.join(cgroup.PROC_ROOT, str(proc.pid), "cgroup")) as fh:
                if f"/{build_slice}/" in fh.read():
                    continue
        except OSError:
            continue
        name = info.get("name") or str(proc.pid)
        per_name[name] = per_name.get(name, 0) + mem.rss
    return sorted(per_name.items(), key=lambda kv: -kv[1])[:count]


def _ancestor_slices(slice_name: str) -> list[tuple[str, int | None]]:
    chain: list[tuple[str, int | None]] = []
    name = slice_name
    while name and name != "-.slice" and len(chain) < 16:
        props = systemctl_show(name, ["MemoryMin", "Slice"])
        chain.append((name, parse_bytes(props.get("MemoryMin")) or 0))
        name = props.get("Slice", "")
    return chain


def check_sshd(host: Host) -> Check:
    if not host.booted:
        found = sshd_processes()
        bad = any(adj != -1000 for _, adj in found)
        return decide_sshd_processes(found, oom_adjust_allowed() if bad else None)
    props: dict[str, str] = {}
    unit = None
    try:
        for candidate in SSH_UNITS:
            props = systemctl_show(candidate, ["Id", "LoadState", "ActiveState", "OOMScoreAdjust",
                                               "MemoryMin", "MainPID", "Slice"])
            if props.get("LoadState") == "loaded":
                unit = props.get("Id") or candidate
                break
        if unit is None:
            return decide_sshd(None, {}, None, [], host.layout.version)
        pid = parse_int(props.get("MainPID")) or 0
        live = parse_int(_read(_proc(str(pid), "oom_score_adj"))) if pid else None
        ancestors = _ancestor_slices(props.get("Slice", "")) if host.layout.version == 2 else []
    except SystemctlError as exc:
        if os.geteuid() != 0:
            return Check("sshd", WARN, f"cannot ask systemd about sshd as this user ({exc})",
                         "sudo buildgate doctor")
        return Check("sshd", FAIL, f"cannot ask systemd about sshd ({exc})",
                     "systemctl is-system-running")
    unprotected = parse_int(props.get("OOMScoreAdjust")) != -1000 or (live is not None and live != -1000)
    adjustable = oom_adjust_allowed() if unprotected else None
    return decide_sshd(unit, props, live, ancestors, host.layout.version, adjustable)


def oom_adjust_allowed() -> bool | None:
    """Can root set a negative oom_score_adj here?  Tried in a forked child on
    itself, so nothing else changes.  None when we are not root (no answer)."""
    if os.geteuid() != 0:
        return None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            try:
                os.write(fd, b"-1000")
                code = 0
            finally:
                os.close(fd)
        except BaseException:
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def sshd_processes() -> list[tuple[int, int | None]]:
    """Listening sshd processes (an sshd whose parent is not sshd) and their oom_score_adj."""
    comm: dict[int, str] = {}
    parent: dict[int, int] = {}
    try:
        names = os.listdir(cgroup.PROC_ROOT)
    except OSError:
        return []
    for entry in names:
        if not entry.isdigit():
            continue
        text = _read(_proc(entry, "stat"))
        if not text or ")" not in text:
            continue
        pid = int(entry)
        comm[pid] = text[text.index("(") + 1: text.rindex(")")]
        rest = text[text.rindex(")") + 2:].split()
        if len(rest) > 1 and rest[1].isdigit():
            parent[pid] = int(rest[1])
    found = []
    for pid, name in sorted(comm.items()):
        if name == "sshd" and comm.get(parent.get(pid, 0)) != "sshd":
            found.append((pid, parse_int(_read(_proc(str(pid), "oom_score_adj")))))
    return found


def check_state_dir(host: Host) -> Check:
    path = host.cfg.state_dir
    return decide_state_dir(path, FileInfo.lstat(path), FileInfo.lstat(os.path.join(path, "q")),
                            os.geteuid())


def check_helper(host: Host) -> Check:
    group = host.cfg.group or DEFAULT_GROUP
    gid: int | None = None
    members: list[str] = []
    try:
        gr = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
        gid, members = gr.gr_gid, list(gr.gr_mem)
    except KeyError:
        if group.isdigit():  # a bare gid works for the socket without an /etc/group entry
            gid = int(group)
    return decide_helper(host.cfg.helper_socket, FileInfo.lstat(host.cfg.helper_socket), group, gid,
                         members)


def queue_facts(state_dir: str) -> QueueFacts:
    """Scan the queue as ``buildgate status`` does: under its mutex, deleting dead
    tickets; without write access (not root), read-only and deleting nothing."""
    from buildgate.queue import WAITING, Queue

    queue = Queue(state_dir)
    readonly = not os.access(state_dir, os.W_OK)

    def listing() -> set[str]:
        return {n.split(".")[0] for n in os.listdir(queue.qdir) if n.split(".")[0].isdigit()}

    if readonly:
        before = listing()
        live, to_reap = queue.scan(readonly=True)
    else:
        with queue.mutex():
            before = listing()
            live, to_reap = queue.scan()
    after = {str(e.seq) for e in live}
    leftovers = [e.scope if e.backend == "systemd" and e.scope else (e.cgroup or e.scope or f"#{e.seq}")
                 for e in to_reap]
    holding = [e for e in live if e.state != WAITING]
    return QueueFacts(
        running=len(holding),
        waiting=sum(1 for e in live if e.state == WAITING),
        orphaned=sum(1 for e in live if e.orphan),
        leftovers=leftovers,
        cleaned=len(before - after),
        reserved=sum(e.mem for e in holding),
        readonly=readonly,
    )


def check_queue(host: Host, state: Check) -> Check:
    path = host.cfg.state_dir
    if state.status == FAIL:
        return decide_queue(None, f"not read: the state directory {path} is unsafe (see state_dir)")
    if not os.path.isdir(os.path.join(path, "q")):
        return decide_queue(None, f"no queue yet in {path}: no build has run since boot")
    budget = None
    try:
        budget = host.budget().bytes
    except Exception:
        pass
    try:
        facts = queue_facts(path)
    except (OSError, BuildgateError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        return decide_queue(None, f"cannot read the queue in {path} ({why})", unreadable=True)
    return decide_queue(facts, "", budget)


# --------------------------------------------------------------------------


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """A check that trips over something unexpected fails; doctor never crashes."""
    try:
        return fn()
    except Exception as exc:
        if os.environ.get("BUILDGATE_DEBUG"):
            raise
        return Check(name, FAIL, f"could not check: {type(exc).__name__}: {exc}",
                     "rerun with BUILDGATE_DEBUG=1 and report it")


def run_checks(config_path: str | None = None) -> list[Check]:
    """Every check, in a fixed order.  Never raises for what it finds; never prints."""
    cfg, error = load(config_path)
    checks = [decide_config(cfg, error)]
    host = Host(cfg or Config(), error is None)
    checks.append(_guard("systemd", lambda: check_systemd(host)))
    checks.append(_guard("cgroup", lambda: check_cgroup(host)))
    checks.append(_guard("backend", lambda: check_backend(host)))
    checks.append(_guard("swap", lambda: check_swap(host)))
    checks.append(_guard("slice", lambda: check_slice(host)))
    checks.append(_guard("budget", lambda: check_budget(host)))
    checks.append(_guard("sshd", lambda: check_sshd(host)))
    state = _guard("state_dir", lambda: check_state_dir(host))
    checks.append(state)
    checks.append(_guard("helper", lambda: check_helper(host)))
    checks.append(_guard("queue", lambda: check_queue(host, state)))
    return checks
