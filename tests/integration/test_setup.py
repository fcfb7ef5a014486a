"""`buildgate setup`: files under --root (any machine), and a real run against
systemd (the tests/run sandbox, or the host's systemd).

--root tests write into a temp directory and never call systemctl, so they run
in both halves of tests/run.  The live tests use the ``live`` fixture, which
needs the ``gate`` fixture's backend parameter: they are marked
``backends("systemd")`` and so run only where systemd is (conftest deselects
them on the bare machine).

In the sandbox, /etc is the host's: the ``live`` fixture first puts a private
overlay over /etc inside the sandbox's mount namespace (systemd, PID 1 there,
sees it too), so a live setup never writes to the host's /etc, and whatever a
failed test leaves behind vanishes with the sandbox.  On a host where systemd
is PID 1 the run is real, and --undo (forced in the fixture's teardown) takes
it down again.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from buildgate.config import parse_config

from .conftest import Gate, require_throwaway_host

M = 1024**2
G = 1024**3
GROUP = "bgtestsetup"
UNITS = "etc/systemd/system"


# ---------------------------------------------------------------- helpers


def setup_cmd(*args: str, proc: Path | None = None, config: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BUILDGATE_CONFIG", None)
    env.pop("BUILDGATE_DEBUG", None)
    if config:
        env["BUILDGATE_CONFIG"] = config
    if proc is not None:
        env["BUILDGATE_PROC_ROOT"] = str(proc)
    return subprocess.run([sys.executable, "-m", "buildgate", "setup", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def ok(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == "", out.stderr
    return out.stdout.splitlines()


def tree(root: Path) -> dict[str, tuple]:
    """Everything under root: type, mode, owner, content or link, mtime."""
    result: dict[str, tuple] = {}
    if not root.exists():
        return result
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                body = path.read_bytes()
            else:
                body = None
            result[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                   st.st_uid, body, st.st_mtime_ns)
    return result


def changes(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.split(" ")[0] in ("wrote", "updated", "overwrote", "removed", "ran:", "set:")]


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A /proc with a fixed meminfo: an 8G host whose services use 3G now."""
    p = tmp_path / "proc"
    p.mkdir()
    (p / "meminfo").write_text(f"MemTotal:        {8 * G // 1024} kB\nMemFree:          1000000 kB\n"
                               f"MemAvailable:    {5 * G // 1024} kB\n")
    return p


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """An image root, Debian-like: ssh.service in /lib, sshd.service an alias of it."""
    root = tmp_path / "image"
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/ssh.service").write_text("[Service]\nExecStart=/usr/sbin/sshd -D\n")
    (root / UNITS).mkdir(parents=True)
    (root / UNITS / "sshd.service").symlink_to("/lib/systemd/system/ssh.service")
    (root / "etc/group").write_text("root:x:0:\n")
    return root


# ---------------------------------------------------------------- --root


FILES = [
    f"{UNITS}/build.slice",
    f"{UNITS}/ssh.service.d/50-buildgate.conf",
    f"{UNITS}/system.slice.d/50-buildgate.conf",
    "etc/buildgate/buildgate.conf",
    "etc/tmpfiles.d/buildgate.conf",
    f"{UNITS}/buildgate-helper.socket",
    f"{UNITS}/buildgate-helper@.service",
]


def test_root_setup_writes_every_file(target: Path, proc: Path) -> None:
    lines = ok(setup_cmd("--root", str(target), proc=proc))
    # 8G - (3G in use + 768M margin) = 4.25G
    assert (f"wrote {target}/{UNITS}/build.slice (MemoryMax=4.2G = MemTotal 8G - reserve 3.8G)") in lines
    assert ("reserve 3.8G for the OS, sshd and services = in use now 3G + margin 768M; "
            "--reserve or --budget to choose") in lines
    for f in FILES:
        assert any(ln.startswith(f"wrote {target}/{f}") for ln in lines), (f, lines)
        assert stat.S_IMODE((target / f).stat().st_mode) == 0o644
    assert f"not run (--root {target}): systemctl, groupadd, systemd-tmpfiles" in lines
    assert "on the target, run: groupadd --system buildgate; systemctl enable buildgate-helper.socket" in lines

    slice_unit = (target / FILES[0]).read_text().splitlines()
    for want in ("MemoryMax=4352M", "MemoryHigh=4080M", "MemorySwapMax=0", "CPUWeight=50", "IOWeight=50",
                 "TasksMax=8192"):
        assert want in slice_unit
    sshd = (target / FILES[1]).read_text().splitlines()
    assert "[Service]" in sshd and "OOMScoreAdjust=-1000" in sshd and "MemoryMin=64M" in sshd
    assert "MemoryMin=64M" in (target / FILES[2]).read_text().splitlines()
    cfg = parse_config((target / FILES[3]).read_text(), "conf")
    assert cfg.budget == "4352M" and cfg.slice == "build.slice" and cfg.group == "buildgate"
    assert "d /run/buildgate 0755 root root -" in (target / FILES[4]).read_text().splitlines()
    socket = (target / FILES[5]).read_text().splitlines()
    assert "SocketGroup=buildgate" in socket and "ListenStream=/run/buildgate/helper.sock" in socket
    exec_start = [ln for ln in (target / FILES[6]).read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(exec_start) == 1 and exec_start[0].endswith(" helper")
    exe = exec_start[0][len("ExecStart="):].split()[0]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK)
    assert not [p for p in tree(target) if p.endswith(".tmp")]
    manifest = json.loads((target / "etc/buildgate/.setup-manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted("/" + f for f in FILES)


def test_a_second_run_changes_nothing(target: Path, proc: Path) -> None:
    ok(setup_cmd("--root", str(target), proc=proc))
    before = tree(target)
    # the host uses more memory now: the budget set up before stays
    (proc / "meminfo").write_text(f"MemTotal: {8 * G // 1024} kB\nMemAvailable: {2 * G // 1024} kB\n")
    lines = ok(setup_cmd("--root", str(target), proc=proc))
    assert tree(target) == before
    assert changes(lines) == []
    assert [ln for ln in lines if ln.startswith("unchanged: ")] == [f"unchanged: {target}/{f}" for f in FILES]


def test_dry_run_writes_nothing_and_shows_everything(target: Path, proc: Path) -> None:
    before = tree(target)
    lines = ok(setup_cmd("--root", str(target), "--dry-run", proc=proc))
    assert tree(target) == before
    assert lines[0] == "dry run: nothing is written or run"
    assert changes(lines) == []
    for f in FILES:
        assert any(ln.startswith(f"would write {target}/{f}") for ln in lines), f
    assert "    MemoryMax=4352M" in lines and "    OOMScoreAdjust=-1000" in lines
    assert '    budget = "4352M"' in lines
    # and on a host that is set up: what would change, still writing nothing
    ok(setup_cmd("--root", str(target), proc=proc))
    before = tree(target)
    lines = ok(setup_cmd("--root", str(target), "--dry-run", "--budget", "2G", proc=proc))
    assert tree(target) == before
    assert f"would update {target}/{UNITS}/build.slice (MemoryMax=2G, --budget 2G):" in lines
    assert "    MemoryMax=2G" in lines
    assert f"unchanged: {target}/{UNITS}/buildgate-helper.socket" in lines


def test_a_hand_edited_file_is_kept_unless_force(target: Path, proc: Path) -> None:
    ok(setup_cmd("--root", str(target), proc=proc))
    unit = target / UNITS / "build.slice"
    unit.write_text(unit.read_text() + "# tuned by hand\n")
    lines = ok(setup_cmd("--root", str(target), "--budget", "2G", proc=proc))
    assert f"kept (edited by hand, --force to overwrite): {unit}" in lines
    assert "# tuned by hand" in unit.read_text() and "MemoryMax=4352M" in unit.read_text()
    # the config is still setup's own: it follows
    assert f"updated {target}/etc/buildgate/buildgate.conf (budget = 2G)" in lines
    lines = ok(setup_cmd("--root", str(target), "--budget", "2G", "--force", proc=proc))
    assert f"overwrote (edited by hand, --force) {unit} (MemoryMax=2G, --budget 2G)" in lines
    assert "# tuned by hand" not in unit.read_text() and "MemoryMax=2G" in unit.read_text()
    # from now on the budget comes from the config: nothing to do
    assert changes(ok(setup_cmd("--root", str(target), proc=proc))) == []


def test_a_file_setup_did_not_write_is_kept(target: Path, proc: Path) -> None:
    conf = target / "etc/buildgate/buildgate.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text('budget = "3G"\nslice = "ci.slice"\nstate_dir = "/run/bg2"\n')
    lines = ok(setup_cmd("--root", str(target), proc=proc))
    assert f"kept (edited by hand, --force to overwrite): {conf}" in lines
    assert conf.read_text() == 'budget = "3G"\nslice = "ci.slice"\nstate_dir = "/run/bg2"\n'
    # ... and setup follows it: its slice, its budget, its state directory
    assert f"wrote {target}/{UNITS}/ci.slice (MemoryMax=3G, budget in {conf})" in lines
    assert "MemoryMax=3G" in (target / UNITS / "ci.slice").read_text()
    assert not (target / UNITS / "build.slice").exists()
    assert "d /run/bg2 0755 root root -" in (target / "etc/tmpfiles.d/buildgate.conf").read_text()
    # --force rewrites it in setup's form, keeping the operator's values
    lines = ok(setup_cmd("--root", str(target), "--force", proc=proc))
    cfg = parse_config(conf.read_text(), "conf")
    assert (cfg.budget, cfg.slice, cfg.state_dir) == ("3G", "ci.slice", "/run/bg2")
    assert "# Written by `buildgate setup`" in conf.read_text()


def test_undo_removes_what_setup_wrote(target: Path, proc: Path) -> None:
    before = tree(target)
    ok(setup_cmd("--root", str(target), proc=proc))
    lines = ok(setup_cmd("--root", str(target), "--undo", proc=proc))
    for f in FILES:
        assert f"removed {target}/{f}" in lines
    assert {k: v[:4] for k, v in tree(target).items()} == {k: v[:4] for k, v in before.items()}
    lines = ok(setup_cmd("--root", str(target), "--undo", proc=proc))
    assert lines[0].startswith("nothing to undo")


def test_undo_keeps_a_hand_edited_file_unless_force(target: Path, proc: Path) -> None:
    ok(setup_cmd("--root", str(target), proc=proc))
    tmpfiles = target / "etc/tmpfiles.d/buildgate.conf"
    tmpfiles.write_text("d /run/buildgate 0750 root root -\n")
    lines = ok(setup_cmd("--root", str(target), "--undo", proc=proc))
    assert f"kept (edited by hand, --force to remove): {tmpfiles}" in lines
    assert tmpfiles.exists() and not (target / UNITS / "build.slice").exists()
    lines = ok(setup_cmd("--root", str(target), "--undo", "--force", proc=proc))
    assert f"removed {tmpfiles}" in lines
    assert not tmpfiles.exists() and not (target / "etc/buildgate").exists()


@pytest.mark.parametrize(
    "unit_file, content, dropins",
    [
        ("usr/lib/systemd/system/sshd.service", "[Service]\nExecStart=/usr/sbin/sshd -D\n",
         ["sshd.service.d", "system.slice.d"]),
        ("lib/systemd/system/ssh.service", "[Service]\nSlice=infra-remote.slice\nExecStart=/usr/sbin/sshd\n",
         ["ssh.service.d", "infra.slice.d", "infra-remote.slice.d"]),
        (None, None, []),
    ],
    ids=["rhel", "own-slice", "no-ssh"],
)
def test_the_ssh_unit_that_is_present_gets_the_dropin(tmp_path: Path, proc: Path, unit_file: str | None,
                                                      content: str | None, dropins: list[str]) -> None:
    root = tmp_path / "image"
    root.mkdir()
    if unit_file:
        (root / unit_file).parent.mkdir(parents=True)
        (root / unit_file).write_text(content or "")
    lines = ok(setup_cmd("--root", str(root), proc=proc))
    found = sorted(p.name for p in (root / UNITS).iterdir() if p.name.endswith(".d"))
    assert found == sorted(dropins)
    for d in dropins:
        assert (root / UNITS / d / "50-buildgate.conf").is_file()
    if not unit_file:
        assert f"skipped sshd protection: no ssh.service or sshd.service unit file under {root}" in lines


def test_a_changed_slice_name_removes_the_old_slice(target: Path, proc: Path) -> None:
    ok(setup_cmd("--root", str(target), proc=proc))
    conf = target / "etc/buildgate/buildgate.conf"
    conf.write_text(conf.read_text().replace('slice = "build.slice"', 'slice = "ci.slice"'))
    lines = ok(setup_cmd("--root", str(target), "--force", proc=proc))
    assert f"removed (setup no longer writes it): {target}/{UNITS}/build.slice" in lines
    assert (target / UNITS / "ci.slice").exists() and not (target / UNITS / "build.slice").exists()


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--budget", "1G", "--reserve", "1G"], 2, "--budget and --reserve both size the budget"),
        (["--budget", "lots"], 2, "invalid size 'lots'"),
        (["--budget", "9G"], 2, "more than MemTotal 8G"),
        (["--reserve", "8G"], 2, "--reserve 8G is all of MemTotal 8G"),
        (["--group", "no way"], 2, "not a valid group name"),
        (["--undo", "--budget", "1G"], 2, "takes no --budget"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(target: Path, proc: Path, args: list[str], code: int,
                                                  needle: str) -> None:
    before = tree(target)
    out = setup_cmd("--root", str(target), *args, proc=proc)
    assert out.returncode == code, out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("buildgate: ") and needle in lines[0], lines
    assert tree(target) == before


def test_a_missing_root_is_a_usage_error(tmp_path: Path, proc: Path) -> None:
    out = setup_cmd("--root", str(tmp_path / "nope"), proc=proc)
    assert out.returncode == 2 and "no such directory: create it first" in out.stderr


def test_an_invalid_config_exits_78(target: Path, proc: Path) -> None:
    conf = target / "etc/buildgate/buildgate.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("budgett = '1G'\n")
    out = setup_cmd("--root", str(target), proc=proc)
    assert out.returncode == 78 and "unknown key 'budgett'" in out.stderr
    assert not (target / UNITS / "build.slice").exists()


# ---------------------------------------------------------------- live, against systemd


def systemctl(*args: str, check: bool = True) -> str:
    out = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, f"systemctl {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


def show(unit: str, prop: str) -> str:
    return systemctl("show", "-p", prop, "--value", unit)


def in_sandbox() -> bool:
    if os.environ.get("BUILDGATE_TEST_SYSTEMD") != "sandbox":
        return False
    try:
        with open("/proc/1/environ", "rb") as fh:
            return b"container=buildgate-sandbox" in fh.read().split(b"\0")
    except OSError:
        return False


@dataclass
class Live:
    ssh: str  # the ssh unit setup protects
    fake_ssh: bool  # the test made it (no openssh-server here)


WATCHED = ["/etc/systemd/system", "/etc/buildgate", "/etc/tmpfiles.d"]


def etc_tree() -> dict[str, dict]:
    return {d: tree(Path(d)) for d in WATCHED} | {"group": {"": Path("/etc/group").read_bytes()}}


@pytest.fixture
def live(gate: Gate, tmp_path: Path):
    overlay = in_sandbox()
    if overlay:
        # the sandbox's /etc is the host's: write to a private copy-on-write layer
        upper, work = tmp_path / "etc-upper", tmp_path / "etc-work"
        upper.mkdir()
        work.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir=/etc,upperdir={upper},workdir={work}", "/etc"], check=True)
    else:
        require_throwaway_host("buildgate setup for real (/etc/systemd/system, build.slice, a group)")
        for path in ("/etc/buildgate/.setup-manifest.json", "/etc/buildgate/buildgate.conf",
                     "/etc/systemd/system/build.slice"):
            if os.path.exists(path):
                pytest.skip(f"{path} exists: this host is set up for real, the test would not be isolated")
    fake = "/run/systemd/system/ssh.service"
    made_fake = False
    state_existed = os.path.exists("/run/buildgate")
    try:
        ssh = ""
        for unit in ("ssh.service", "sshd.service"):
            if show(unit, "LoadState") == "loaded" and show(unit, "FragmentPath"):
                ssh = show(unit, "Id")
                break
        if not ssh:
            # no openssh-server here: a stand-in, so that the drop-in logic runs for real
            Path(fake).write_text("[Unit]\nDescription=stand-in sshd for buildgate tests\n"
                                  "[Service]\nExecStart=/bin/sleep infinity\n")
            made_fake = True
            systemctl("daemon-reload")
            systemctl("start", "ssh.service")
            ssh = "ssh.service"
        yield Live(ssh=ssh, fake_ssh=made_fake)
    finally:
        if os.path.exists("/etc/buildgate/.setup-manifest.json"):
            setup_cmd("--undo", "--force")
        systemctl("disable", "--now", "buildgate-helper.socket", check=False)
        systemctl("stop", "build.slice", check=False)
        if made_fake:
            systemctl("stop", "ssh.service", check=False)
            os.unlink(fake)
        if not state_existed:
            shutil.rmtree("/run/buildgate", ignore_errors=True)
        if not overlay:
            subprocess.run(["groupdel", GROUP], capture_output=True)
        else:
            if subprocess.run(["umount", "/etc"], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", "/etc"], check=True)
        systemctl("daemon-reload")


def kernel_limit(unit: str) -> int | None:
    from buildgate.cgroup import MemoryCgroup, detect_layout

    return MemoryCgroup(detect_layout(), show(unit, "ControlGroup")).limit()


def has_cap_sys_resource() -> bool:
    from buildgate.setup import CAP_SYS_RESOURCE, has_capability

    return has_capability(CAP_SYS_RESOURCE)


@pytest.mark.backends("systemd")
def test_live_dry_run_writes_and_runs_nothing(live: Live) -> None:
    before = etc_tree()
    lines = ok(setup_cmd("--dry-run", "--budget", "300M", "--group", GROUP))
    assert etc_tree() == before
    assert "would run: systemctl daemon-reload" in lines
    assert f"would run: groupadd --system {GROUP}" in lines
    assert "would write /etc/systemd/system/build.slice (MemoryMax=300M, --budget 300M):" in lines
    assert f"would write /etc/systemd/system/{live.ssh}.d/50-buildgate.conf (OOMScoreAdjust=-1000 MemoryMin=64M):" in lines
    assert "would run: systemctl enable --now buildgate-helper.socket" in lines
    assert show("build.slice", "MemoryMax") == "infinity"
    assert systemctl("is-active", "buildgate-helper.socket", check=False) != "active"


@pytest.mark.backends("systemd")
def test_live_setup_applies_is_idempotent_and_undo_restores(live: Live) -> None:
    before = etc_tree()
    oom_before = Path(f"/proc/{show(live.ssh, 'MainPID')}/oom_score_adj").read_text().strip()

    lines = ok(setup_cmd("--budget", "300M", "--group", GROUP))
    assert "wrote /etc/systemd/system/build.slice (MemoryMax=300M, --budget 300M)" in lines
    assert f"ran: groupadd --system {GROUP}" in lines
    assert "ran: systemctl daemon-reload" in lines
    assert "ran: systemctl enable --now buildgate-helper.socket" in lines
    assert any(ln.startswith("live: build.slice MemoryMax=300M") for ln in lines), lines

    # systemd applies it: the slice's cap, sshd's protection, its slice's
    assert show("build.slice", "MemoryMax") == str(300 * M)
    assert show("build.slice", "MemorySwapMax") == "0"
    assert show(live.ssh, "OOMScoreAdjust") == "-1000"
    assert show(live.ssh, "MemoryMin") == str(64 * M)
    assert int(show(show(live.ssh, "Slice"), "MemoryMin")) >= 64 * M
    systemctl("start", "build.slice")
    assert kernel_limit("build.slice") == 300 * M  # the kernel enforces it
    pid = show(live.ssh, "MainPID")
    if has_cap_sys_resource():
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "-1000"  # without a restart
    else:
        assert any(ln.startswith("note: OOMScoreAdjust=-1000 has no effect here") for ln in lines)
    if live.fake_ssh:  # the drop-in never keeps sshd from starting, capability or not
        systemctl("restart", live.ssh)
        assert systemctl("is-active", live.ssh) == "active"
    # the rest: state directory, group, helper socket
    st = os.lstat("/run/buildgate")
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755
    assert systemctl("is-active", "buildgate-helper.socket") == "active"
    assert systemctl("is-enabled", "buildgate-helper.socket") == "enabled"
    import grp

    assert os.stat("/run/buildgate/helper.sock").st_gid == grp.getgrnam(GROUP).gr_gid
    # buildgate itself now takes its budget from what setup wrote
    run = subprocess.run([sys.executable, "-m", "buildgate", "run", "--mem", "400M", "--", "true"],
                         env={k: v for k, v in os.environ.items() if k != "BUILDGATE_CONFIG"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "more than the build budget 300M" in run.stderr, run.stderr

    # a second run: nothing to do, and it says so
    lines = ok(setup_cmd("--group", GROUP))
    assert lines and all(ln.startswith("unchanged: ") for ln in lines), lines
    assert "unchanged: /etc/systemd/system/build.slice" in lines

    # a new budget reaches the running slice without a restart
    lines = ok(setup_cmd("--budget", "400M", "--group", GROUP))
    assert "updated /etc/systemd/system/build.slice (MemoryMax=400M, --budget 400M)" in lines
    assert show("build.slice", "MemoryMax") == str(400 * M) and kernel_limit("build.slice") == 400 * M

    lines = ok(setup_cmd("--undo"))
    assert "ran: systemctl disable --now buildgate-helper.socket" in lines
    assert "removed /etc/systemd/system/build.slice" in lines
    assert "ran: systemctl daemon-reload" in lines
    assert f"ran: groupdel {GROUP}" in lines
    assert etc_tree() == before  # every file and directory setup made is gone
    assert show("build.slice", "MemoryMax") == "infinity" and kernel_limit("build.slice") is None
    assert show(live.ssh, "OOMScoreAdjust") == "0" and show(live.ssh, "MemoryMin") == "0"
    assert systemctl("is-active", "buildgate-helper.socket", check=False) != "active"
    pid = show(live.ssh, "MainPID")
    assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == oom_before


@pytest.mark.backends("systemd")
def test_live_hand_edit_is_kept_and_force_applies(live: Live) -> None:
    ok(setup_cmd("--budget", "300M", "--group", GROUP))
    unit = Path("/etc/systemd/system/build.slice")
    unit.write_text(unit.read_text().replace("MemoryMax=300M", "MemoryMax=280M"))
    systemctl("daemon-reload")
    lines = ok(setup_cmd("--budget", "400M", "--group", GROUP))
    assert f"kept (edited by hand, --force to overwrite): {unit}" in lines
    assert show("build.slice", "MemoryMax") == str(280 * M)
    lines = ok(setup_cmd("--budget", "400M", "--group", GROUP, "--force"))
    assert f"overwrote (edited by hand, --force) {unit} (MemoryMax=400M, --budget 400M)" in lines
    assert show("build.slice", "MemoryMax") == str(400 * M)
    # --undo leaves a hand-edited file, and says so
    unit.write_text(unit.read_text() + "# mine\n")
    lines = ok(setup_cmd("--undo"))
    assert f"kept (edited by hand, --force to remove): {unit}" in lines and unit.exists()
    assert not Path("/etc/tmpfiles.d/buildgate.conf").exists()


def cgroup_file(unit: str, name: str) -> str:
    from buildgate.cgroup import detect_layout

    return Path(detect_layout().dir_of(show(unit, "ControlGroup")), name).read_text().strip()


@pytest.mark.cgroup2
@pytest.mark.backends("systemd")
def test_live_setup_on_cgroup_v2_reaches_the_kernel_and_doctor_is_happy(live: Live) -> None:
    """v2 only: memory.min for sshd and every slice above it (a cgroup's protection
    is bounded by its ancestors'), the build slice's memory.high and
    memory.swap.max, sshd's oom_score_adj; then `buildgate doctor` exits 0."""
    from buildgate.setup import memory_high, slice_ancestors

    lines = ok(setup_cmd("--budget", "300M", "--group", GROUP))
    assert any(ln.startswith(f"live: {live.ssh} OOMScoreAdjust=-1000 MemoryMin=64M") for ln in lines), lines
    systemctl("start", "build.slice")
    assert cgroup_file("build.slice", "memory.max") == str(300 * M)
    assert cgroup_file("build.slice", "memory.high") == str(memory_high(300 * M))
    assert cgroup_file("build.slice", "memory.swap.max") == "0"

    assert show(live.ssh, "MemoryMin") == str(64 * M)
    assert cgroup_file(live.ssh, "memory.min") == str(64 * M)
    ancestors = slice_ancestors(show(live.ssh, "Slice"))
    assert ancestors and ancestors[-1] == show(live.ssh, "Slice"), ancestors
    for parent in ancestors:
        assert int(show(parent, "MemoryMin")) >= 64 * M, parent
        assert int(cgroup_file(parent, "memory.min")) >= 64 * M, parent
    pid = show(live.ssh, "MainPID")
    assert show(live.ssh, "OOMScoreAdjust") == "-1000"
    if has_cap_sys_resource():
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "-1000"

    # a build with the config setup wrote runs in build.slice, under its cap
    env = {k: v for k, v in os.environ.items() if k not in ("BUILDGATE_CONFIG", "BUILDGATE_DEBUG")}
    run = subprocess.run([sys.executable, "-m", "buildgate", "run", "--mem", "100M", "--",
                          "sh", "-c", "cat /proc/self/cgroup"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("0::/build.slice/buildgate-"), run.stdout

    doctor = subprocess.run([sys.executable, "-m", "buildgate", "doctor"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "FAIL" not in doctor.stdout, doctor.stdout
    js = subprocess.run([sys.executable, "-m", "buildgate", "doctor", "--json"], env=env, capture_output=True,
                        text=True, timeout=120)
    checks = {c["name"]: c for c in json.loads(js.stdout)}
    assert checks["cgroup"]["data"]["version"] == 2
    for name in ("sshd", "slice", "budget", "swap", "systemd", "backend"):
        assert checks[name]["status"] == "ok", checks[name]
