"""doctor's decisions over canned inputs: /proc text, systemctl output, stat results."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from buildgate import cgroup, doctor
from buildgate.budget import Budget
from buildgate.cgroup import Layout
from buildgate.config import Config
from buildgate.doctor import (
    EXIT_CONFIG,
    EXIT_PROTECTED,
    EXIT_UNPROTECTED,
    Check,
    FileInfo,
    QueueFacts,
    Swap,
    decide_backend,
    decide_budget,
    decide_cgroup,
    decide_config,
    decide_helper,
    decide_queue,
    decide_slice,
    decide_sshd,
    decide_sshd_processes,
    decide_state_dir,
    decide_swap,
    decide_systemd,
    exit_code,
    parse_bytes,
    parse_show,
    parse_swaps,
    parse_version,
    swap_accounting,
)
from buildgate.errors import ConfigError

M = 1024**2
G = 1024**3
V1 = Layout(1, "/sys/fs/cgroup/memory")
V2 = Layout(2, "/sys/fs/cgroup")

PROC_SWAPS = """Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/swapfile                               file\t\t2097148\t\t524288\t\t-2
/dev/zram0                              partition\t1048572\t\t0\t\t100
"""
PROC_SWAPS_NONE = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"

# `systemctl show build.slice -p ...` on a host without a unit file for it
SLICE_MISSING = """Slice=-.slice
ControlGroup=
MemoryCurrent=[not set]
MemoryMax=infinity
Id=build.slice
LoadState=loaded
ActiveState=inactive
FragmentPath=
DropInPaths=
"""
SLICE_CAPPED = """Id=build.slice
LoadState=loaded
ActiveState=active
FragmentPath=/etc/systemd/system/build.slice
DropInPaths=/etc/systemd/system.control/build.slice.d/50-MemoryMax.conf
MemoryMax=6442450944
ControlGroup=/build.slice
"""
SSH_DEFAULT = """Id=ssh.service
LoadState=loaded
ActiveState=active
OOMScoreAdjust=0
MemoryMin=0
MainPID=812
Slice=system.slice
"""
SSH_PROTECTED = SSH_DEFAULT.replace("OOMScoreAdjust=0", "OOMScoreAdjust=-1000").replace(
    "MemoryMin=0", "MemoryMin=67108864")


# -- parsers ------------------------------------------------------------------


def test_parse_swaps() -> None:
    swaps = parse_swaps(PROC_SWAPS)
    assert swaps == [Swap("/swapfile", "file", 2097148 * 1024, 524288 * 1024),
                     Swap("/dev/zram0", "partition", 1048572 * 1024, 0)]
    assert parse_swaps(PROC_SWAPS_NONE) == []
    assert parse_swaps("") == []


def test_parse_show_version_and_bytes() -> None:
    props = parse_show(SLICE_CAPPED + "Description=a=b\n")
    assert props["MemoryMax"] == "6442450944" and props["Description"] == "a=b"
    assert parse_version("252.39-1~deb12u2") == 252
    assert parse_version("v255") == 255 and parse_version("") is None
    assert parse_bytes("infinity") is None and parse_bytes("[not set]") is None
    assert parse_bytes("18446744073709551615") is None and parse_bytes("") is None
    assert parse_bytes("67108864") == 64 * M


# -- status, render, exit codes ------------------------------------------------


def test_render_and_as_dict() -> None:
    c = Check("slice", "warn", "build.slice has no unit file", "buildgate setup", {"x": 1})
    assert c.render() == "WARN  slice: build.slice has no unit file\n      fix: buildgate setup"
    assert Check("swap", "ok", "no swap").render() == "ok    swap: no swap"
    assert json.loads(json.dumps(c.as_dict())) == {
        "name": "slice", "status": "warn", "detail": "build.slice has no unit file",
        "fix": "buildgate setup", "data": {"x": 1}}


def test_exit_codes() -> None:
    ok, warn, fail = Check("a", "ok", ""), Check("b", "warn", ""), Check("c", "fail", "")
    assert exit_code([ok, warn, Check("d", "info", "")]) == EXIT_PROTECTED == 0
    assert exit_code([ok, fail, warn]) == EXIT_UNPROTECTED == 1
    assert exit_code([Check("config", "fail", ""), ok]) == EXIT_CONFIG == 78


def test_config_invalid_is_a_failing_check() -> None:
    err = ConfigError("/etc/buildgate/buildgate.conf", "unknown key 'budgt': valid keys are ...")
    c = decide_config(None, err)
    assert c.status == "fail" and "budgt" in c.detail and "exits 78" in c.detail
    assert c.fix.startswith("edit /etc/buildgate/buildgate.conf: unknown key 'budgt'")
    assert decide_config(Config(), None).status == "info"
    assert decide_config(Config(source="/tmp/x.conf"), None).status == "ok"


def test_systemd() -> None:
    c = decide_systemd(False, "process_api", None, None)
    assert c.status == "fail" and "PID 1 is process_api" in c.detail and c.fix
    c = decide_systemd(True, "systemd", None, "Failed to connect to bus: No such file or directory")
    assert c.status == "fail" and "cannot be reached" in c.detail
    c = decide_systemd(True, "systemd", "252.39-1~deb12u2", None)
    assert c.status == "ok" and "252.39-1~deb12u2" in c.detail and c.data["version"] == 252
    assert decide_systemd(True, "systemd", "237", None).status == "warn"
    # not root: the helper reaches systemd for the builds; only this run is blind
    c = decide_systemd(True, "systemd", None, "Transport endpoint is not connected", root=False)
    assert c.status == "warn" and c.fix == "sudo buildgate doctor"


def test_cgroup_versions() -> None:
    assert decide_cgroup(V2).status == "ok"
    v1 = decide_cgroup(V1, hybrid=True)
    assert v1.status == "ok" and "v1" in v1.detail and "no effect" in v1.detail
    none = decide_cgroup(Layout(0, ""))
    assert none.status == "fail" and "cgroup_enable=memory" in none.fix


def test_backend() -> None:
    assert decide_backend("systemd", None, "auto", "/etc/b.conf", 0).status == "ok"
    assert decide_backend("cgroupfs", None, "auto", "/etc/b.conf", 0).status == "ok"
    c = decide_backend("none", None, "auto", "/etc/b.conf", 0)
    assert c.status == "fail" and "UNCAPPED" in c.detail
    c = decide_backend("none", None, "none", "/etc/b.conf", 0)
    assert c.fix == 'set backend = "auto" in /etc/b.conf'
    assert "buildgate setup" in decide_backend("none", None, "auto", "/etc/b.conf", 1000).fix
    c = decide_backend(None, "systemd is not running as the init system", "systemd", "/etc/b.conf", 0)
    assert c.status == "fail" and c.fix == 'set backend = "auto" in /etc/b.conf'


def test_backend_for_non_root_callers_is_the_helper() -> None:
    sock = "/run/buildgate/helper.sock"
    c = doctor.decide_backend_nonroot("deploy", sock, False, False, "buildgate", "systemd")
    assert c.status == "warn" and "only root" in c.detail and c.fix == "buildgate setup (as root)"
    c = doctor.decide_backend_nonroot("deploy", sock, True, False, "buildgate", "systemd")
    assert c.status == "warn" and c.fix.startswith("usermod -aG buildgate deploy")
    c = doctor.decide_backend_nonroot("deploy", sock, True, True, "buildgate", "systemd")
    assert c.status == "ok" and "root there uses systemd" in c.detail
    assert doctor.decide_backend_nonroot("deploy", sock, True, True, "buildgate", "none").status == "fail"


# -- swap -----------------------------------------------------------------------


def test_no_swap_is_fine_with_or_without_accounting() -> None:
    assert decide_swap([], 0, 1, False).status == "ok"
    assert decide_swap(parse_swaps(PROC_SWAPS_NONE), 0, 2, None).status == "ok"


def test_swap_with_accounting_v1_and_v2() -> None:
    swaps = parse_swaps(PROC_SWAPS)
    v2 = decide_swap(swaps, 3 * G, 2, True)
    assert v2.status == "ok" and "memory.swap.max" in v2.detail and "3G" in v2.detail
    v1 = decide_swap(swaps, 3 * G, 1, True)
    assert v1.status == "ok" and "memory.memsw" in v1.detail


def test_swap_without_accounting_fails_with_the_fix() -> None:
    swaps = parse_swaps(PROC_SWAPS)
    v1 = decide_swap(swaps, 3 * G, 1, False)
    assert v1.status == "fail" and "swaps instead of being killed" in v1.detail
    assert "swapaccount=1" in v1.fix and "swapoff -a" in v1.fix
    v2 = decide_swap(swaps, 3 * G, 2, False)
    assert v2.status == "fail" and "swapaccount=0" in v2.fix
    assert decide_swap(swaps, 3 * G, 2, None).status == "warn"


def test_swap_accounting_over_fake_cgroup_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/user.slice/session-1.scope\n")
    monkeypatch.setattr(cgroup, "PROC_ROOT", str(proc))
    # v1: memsw files in the memory hierarchy = swap accounting on
    mem = tmp_path / "v1" / "memory"
    mem.mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert swap_accounting(Layout(1, str(mem))) is False
    (mem / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    assert swap_accounting(Layout(1, str(mem))) is True
    # v2: never in the root cgroup; found in ours or the root's children
    root = tmp_path / "v2"
    child = root / "system.slice"
    child.mkdir(parents=True)
    (child / "memory.max").write_text("max\n")
    assert swap_accounting(Layout(2, str(root))) is False
    (child / "memory.swap.max").write_text("max\n")
    assert swap_accounting(Layout(2, str(root))) is True
    assert swap_accounting(Layout(2, str(tmp_path / "empty"))) is None
    assert swap_accounting(Layout(0, "")) is None


# -- slice ------------------------------------------------------------------------


def test_missing_slice_is_a_warning_with_the_fix() -> None:
    c = decide_slice("build.slice", parse_show(SLICE_MISSING), None, 6 * G)
    assert c.status == "warn" and "no unit file" in c.detail
    assert c.fix == "buildgate setup (or by hand: systemctl set-property build.slice MemoryMax=6G)"


def test_uncapped_and_capped_slice() -> None:
    props = parse_show(SLICE_CAPPED)
    c = decide_slice("build.slice", props, None, 6 * G)
    assert c.status == "ok" and "MemoryMax=6G" in c.detail and "/etc/systemd/system/build.slice" in c.detail
    props["MemoryMax"] = "infinity"
    c = decide_slice("build.slice", props, None, 5 * G)
    assert c.status == "warn" and "MemoryMax=infinity" in c.detail and "MemoryMax=5G" in c.fix


def test_masked_or_unreachable_slice_fails() -> None:
    c = decide_slice("build.slice", {"LoadState": "masked", "FragmentPath": "/dev/null"}, None, G)
    assert c.status == "fail" and c.fix == "systemctl unmask build.slice"
    c = decide_slice("build.slice", None, "Failed to connect to bus", G)
    assert c.status == "fail" and "Failed to connect to bus" in c.detail


# -- budget ---------------------------------------------------------------------


def test_budget_over_what_the_host_can_spare_fails() -> None:
    # 8G host, services use 2.5G now, budget 6G: 0.5G short
    c = decide_budget(8 * G, 8 * G - 2560 * M, 0, Budget(6 * G, "MemoryMax of build.slice"),
                      "systemctl set-property build.slice MemoryMax={size}")
    assert c.status == "fail" and "short" in c.detail
    assert c.data["services_now"] == 2560 * M and c.data["headroom"] == -512 * M
    assert c.fix == "systemctl set-property build.slice MemoryMax=5G"  # 8G - 2.5G - 512M


def test_budget_counts_what_builds_use_now_as_theirs() -> None:
    # 3G used in all, 2G of it by running builds: services use 1G
    c = decide_budget(8 * G, 5 * G, 2 * G, Budget(6 * G, "budget in /etc/b.conf"),
                      'set budget = "{size}" in /etc/b.conf')
    assert c.status == "ok" and c.data["services_now"] == G and c.data["headroom"] == G
    assert "1G left for the host" in c.detail


def test_budget_names_the_largest_users_outside_builds() -> None:
    c = decide_budget(8 * G, 5 * G, 0, Budget(4 * G, "budget in /etc/b.conf"), 'budget = "{size}"',
                      [("postgres", 1536 * M), ("node", 900 * M), ("redis-server", 200 * M),
                       ("sshd", 8 * M), ("cron", 2 * M)])
    assert "used outside builds now (largest: postgres 1.5G, node 900M, redis-server 200M, sshd 8M) = " in c.detail
    assert c.data["largest"][0] == {"name": "postgres", "rss": 1536 * M}


def test_budget_with_little_headroom_warns() -> None:
    c = decide_budget(8 * G, 6 * G, 0, Budget(5888 * M, "budget in /etc/b.conf"),
                      'set budget = "{size}" in /etc/b.conf')
    assert c.status == "warn" and c.fix == 'set budget = "5.5G" in /etc/b.conf'


# -- sshd -------------------------------------------------------------------------


def test_no_ssh_unit_is_info() -> None:
    c = decide_sshd(None, {}, None, [], 2)
    assert c.status == "info" and not c.fix


def test_unprotected_sshd_fails_with_the_drop_in() -> None:
    c = decide_sshd("ssh.service", parse_show(SSH_DEFAULT), 0, [("system.slice", 0)], 2)
    assert c.status == "fail" and "OOMScoreAdjust=0 (-1000 wanted)" in c.detail
    assert "OOMScoreAdjust=-1000\\nMemoryMin=64M" in c.fix
    assert c.fix.startswith("buildgate setup (or by hand: mkdir -p /etc/systemd/system/ssh.service.d && ")
    assert "> /etc/systemd/system/ssh.service.d/50-buildgate.conf" in c.fix  # as setup names it
    assert c.fix.endswith("systemctl restart ssh.service && systemctl set-property system.slice MemoryMin=64M)")
    v1 = decide_sshd("ssh.service", parse_show(SSH_DEFAULT), 0, [], 1)
    assert v1.status == "fail" and "MemoryMin" not in v1.fix


def test_protected_unit_but_sshd_not_restarted() -> None:
    c = decide_sshd("sshd.service", parse_show(SSH_PROTECTED), 0, [("system.slice", 64 * M)], 2)
    assert c.status == "fail" and "started before the setting" in c.detail
    assert c.fix == "buildgate setup (or by hand: echo -1000 > /proc/812/oom_score_adj)"
    c = decide_sshd("sshd.service", parse_show(SSH_PROTECTED), 0, [("system.slice", 64 * M)], 2,
                    oom_adjustable=False)
    assert c.status == "fail" and "refuses a negative oom_score_adj" in c.detail
    assert c.fix.startswith("none from inside")


def test_memory_min_is_bounded_by_the_ancestors_on_v2() -> None:
    props = parse_show(SSH_PROTECTED)
    c = decide_sshd("ssh.service", props, -1000, [("system.slice", 0)], 2)
    assert c.status == "warn" and "system.slice has MemoryMin=0" in c.detail
    assert c.fix == "buildgate setup (or by hand: systemctl set-property system.slice MemoryMin=64M)"
    assert c.data["memory_min_effective"] == 0
    c = decide_sshd("ssh.service", props, -1000, [("system.slice", 64 * M)], 2)
    assert c.status == "ok" and "MemoryMin=64M (effective through system.slice)" in c.detail
    no_min = dict(props, MemoryMin="0")
    c = decide_sshd("ssh.service", no_min, -1000, [("system.slice", 64 * M)], 2)
    assert c.status == "warn" and "MemoryMin=64M" in c.fix and "set-property" not in c.fix
    # nested: every slice above sshd needs the protection
    c = decide_sshd("ssh.service", props, -1000, [("a-b.slice", 64 * M), ("a.slice", 32 * M)], 2)
    assert c.status == "warn" and "a.slice has MemoryMin=32M" in c.detail and "sshd gets 32M" in c.detail
    assert c.fix == "buildgate setup (or by hand: systemctl set-property a.slice MemoryMin=64M)"


def test_memory_min_does_not_matter_on_v1() -> None:
    props = dict(parse_show(SSH_PROTECTED), MemoryMin="0")
    c = decide_sshd("ssh.service", props, -1000, [], 1)
    assert c.status == "ok" and "cgroup v1" in c.detail


def test_sshd_without_systemd() -> None:
    assert decide_sshd_processes([]).status == "info"
    assert decide_sshd_processes([(700, -1000)]).status == "ok"
    c = decide_sshd_processes([(700, 0)])
    assert c.status == "fail" and c.fix.startswith("echo -1000 > /proc/700/oom_score_adj")


# -- state directory -------------------------------------------------------------

DIR = stat.S_IFDIR


def test_missing_state_dir_is_info() -> None:
    c = decide_state_dir("/run/buildgate", None, None, 0)
    assert c.status == "info" and "does not exist" in c.detail


@pytest.mark.parametrize("info, q, expect, fix", [
    (FileInfo(DIR | 0o755, 0, 0), FileInfo(DIR | 0o755, 0, 0), "ok", ""),
    (FileInfo(DIR | 0o1777, 0, 0), None, "ok", ""),  # sticky, like /tmp
    (FileInfo(DIR | 0o777, 0, 0), None, "fail", "chmod o-w /run/bg"),
    (FileInfo(DIR | 0o755, 1000, 1000), None, "fail", "chown root /run/bg"),
    (FileInfo(DIR | 0o757, 1000, 0), None, "fail", "chown root /run/bg && chmod o-w /run/bg"),
    (FileInfo(stat.S_IFLNK | 0o777, 0, 0), None, "fail", "rm /run/bg"),
    (FileInfo(stat.S_IFREG | 0o644, 0, 0), None, "fail", "rm /run/bg"),
    (FileInfo(DIR | 0o755, 0, 0), FileInfo(DIR | 0o777, 0, 0), "fail", "chmod o-w /run/bg/q"),
])
def test_state_dir_rules(info: FileInfo, q: FileInfo | None, expect: str, fix: str) -> None:
    c = decide_state_dir("/run/bg", info, q, 0)
    assert (c.status, c.fix) == (expect, fix), c


def test_state_dir_owned_by_the_caller_is_accepted() -> None:
    assert decide_state_dir("/run/bg", FileInfo(DIR | 0o755, 1000, 1000), None, 1000).status == "ok"


# -- helper socket ------------------------------------------------------------------

SOCK = stat.S_IFSOCK


def test_helper_not_set_up_warns() -> None:
    c = decide_helper("/run/buildgate/helper.sock", None, "buildgate", None, [])
    assert c.status == "warn" and "no group buildgate" in c.detail and c.fix == "buildgate setup"
    c = decide_helper("/run/buildgate/helper.sock", None, "builders", 990, [])
    assert c.fix == "buildgate setup --group builders"


def test_helper_socket_rules() -> None:
    path = "/run/buildgate/helper.sock"
    ok = decide_helper(path, FileInfo(SOCK | 0o660, 0, 990), "buildgate", 990, ["deploy"])
    assert ok.status == "ok" and "members: deploy" in ok.detail
    c = decide_helper(path, FileInfo(SOCK | 0o666, 0, 990), "buildgate", 990, [])
    assert c.status == "fail" and "any local user" in c.detail
    c = decide_helper(path, FileInfo(SOCK | 0o660, 0, 0), "buildgate", 990, [])
    assert c.status == "warn" and "not group buildgate" in c.detail
    c = decide_helper(path, FileInfo(DIR | 0o755, 0, 0), "buildgate", 990, [])
    assert c.status == "fail" and c.fix == f"rm {path} && buildgate setup"
    c = decide_helper(path, FileInfo(SOCK | 0o660, 0, 990), "buildgate", None, [])
    assert c.status == "warn" and c.fix == "groupadd --system buildgate"


# -- queue --------------------------------------------------------------------------


def test_queue_counts() -> None:
    c = decide_queue(QueueFacts(2, 1, 1, [], 3, 600 * M), "", 1 * G)
    assert c.status == "ok"
    assert c.detail.startswith("2 running, 1 waiting, 1 orphaned (600M of 1G reserved)")
    assert "removed 3 stale tickets" in c.detail
    c = decide_queue(QueueFacts(1, 0, 1, ["buildgate-web-3.scope"], 0, G), "")
    assert c.status == "warn" and c.fix == "systemctl stop buildgate-web-3.scope"
    c = decide_queue(QueueFacts(1, 0, 1, ["/sys/fs/cgroup/memory/build.slice/b-1.scope"], 0, G), "")
    assert c.fix == "kill $(cat /sys/fs/cgroup/memory/build.slice/b-1.scope/cgroup.procs)"
    c = decide_queue(QueueFacts(0, 0, 0, [], 2, 0, readonly=True), "")
    assert c.detail == "0 running, 0 waiting, 0 orphaned; 2 stale tickets of dead buildgates (the next build removes them)"
    assert decide_queue(None, "no queue yet").status == "info"
    assert decide_queue(None, "cannot read", unreadable=True).status == "warn"


def test_run_checks_never_raises_on_a_broken_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(host: object) -> Check:
        raise RuntimeError("unexpected")

    monkeypatch.delenv("BUILDGATE_DEBUG", raising=False)
    monkeypatch.setattr(doctor, "check_swap", boom)
    monkeypatch.setattr(doctor, "check_sshd", boom)
    monkeypatch.setattr(doctor, "check_slice", boom)
    monkeypatch.setattr(doctor, "check_budget", boom)
    monkeypatch.setattr(doctor, "check_systemd", boom)
    monkeypatch.setattr(doctor, "check_backend", boom)
    monkeypatch.setattr(doctor, "check_queue", lambda host, state: boom(host))
    checks = doctor.run_checks("/nonexistent/buildgate.conf")
    names = [c.name for c in checks]
    assert names == ["config", "systemd", "cgroup", "backend", "swap", "slice", "budget", "sshd",
                     "state_dir", "helper", "queue"]
    assert checks[0].status == "fail" and exit_code(checks) == EXIT_CONFIG
    swap = checks[names.index("swap")]
    assert swap.status == "fail" and "RuntimeError: unexpected" in swap.detail


def test_backend_none_because_v2_blocks_memory_names_the_reason() -> None:
    c = decide_backend("none", None, "auto", "/etc/b.conf", 0,
                       blocked="/sys/fs/cgroup has processes of its own, so ...")
    assert c.status == "fail" and "has processes of its own" in c.fix and "cgroup_root" in c.fix
