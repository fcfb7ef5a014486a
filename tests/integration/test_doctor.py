"""buildgate doctor on real hosts: the systemd sandbox (or a systemd host) and the bare machine.

Units the tests need live in /run/systemd/system (runtime units, gone at reboot)
and are removed afterwards: ``bgtest.slice`` (never build.slice) and, when the
machine has no ssh server, a fake ``ssh.service`` (``sleep infinity``).  A real
ssh unit is only changed (with a runtime drop-in) inside the throwaway sandbox.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from buildgate.cgroup import detect_layout

from . import test_nonroot as _nonroot
from .conftest import TEST_SLICE, Gate, kill, wait_gone

UNITS = Path("/run/systemd/system")
SANDBOX = os.environ.get("BUILDGATE_TEST_SYSTEMD") == "sandbox"
NAMES = ["config", "systemd", "cgroup", "backend", "swap", "slice", "budget", "sshd",
         "state_dir", "helper", "queue"]
DROPIN = "zz-bgtest-doctor.conf"


def doctor(gate: Gate, *args: str) -> tuple[int, dict[str, dict], str]:
    """Run doctor twice (text and --json); check they agree; return rc, checks by name, text."""
    text = gate.run("doctor", *args)
    assert text.stderr == "", text.stderr
    js = gate.run("doctor", "--json", *args)
    assert js.stderr == "", js.stderr
    assert js.returncode == text.returncode
    checks = json.loads(js.stdout)
    assert [c["name"] for c in checks] == NAMES
    for c in checks:
        assert set(c) >= {"name", "status", "detail", "fix"}
        assert c["status"] in ("ok", "warn", "fail", "info")
        assert (c["fix"] == "") == (c["status"] in ("ok", "info")), c
    # the text output: one line per check (status, name), the fix indented below
    lines = [ln for ln in text.stdout.splitlines() if not ln.startswith(" ")]
    assert [(ln.split()[0].lower(), ln.split()[1].rstrip(":")) for ln in lines] == \
        [(c["status"], c["name"]) for c in checks]
    for c in checks:
        if c["fix"]:
            assert f"\n      fix: {c['fix']}" in text.stdout
    expected_rc = 78 if checks[0]["status"] == "fail" else \
        1 if any(c["status"] == "fail" for c in checks) else 0
    assert text.returncode == expected_rc, text.stdout
    return text.returncode, {c["name"]: c for c in checks}, text.stdout


def systemctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)


def show(unit: str, prop: str) -> str:
    return systemctl("show", "-p", prop, "--value", unit).stdout.strip()


def oom_adjustable() -> bool:
    """Does this kernel let root set a negative oom_score_adj (some sandboxes refuse)?"""
    return subprocess.run(["sh", "-c", "echo -1000 > /proc/self/oom_score_adj"],
                          capture_output=True).returncode == 0


V2 = detect_layout().version == 2


@dataclass
class SshUnit:
    name: str
    created: bool  # the fake ssh.service this fixture made (and runs)
    mutable: bool  # drop-ins allowed: our fake, or any unit inside the throwaway sandbox

    def protect(self, on: bool) -> None:
        assert self.mutable
        d = UNITS / f"{self.name}.d"
        d.mkdir(exist_ok=True)
        body = f"[Service]\nOOMScoreAdjust={-1000 if on else 0}\n"
        if V2:
            body += f"MemoryMin={'64M' if on else '0'}\n"
        (d / DROPIN).write_text(body)
        sys_dropin = UNITS / "system.slice.d" / DROPIN
        if V2 and on:  # v2 bounds memory.min by the ancestors': system.slice too
            sys_dropin.parent.mkdir(exist_ok=True)
            sys_dropin.write_text("[Slice]\nMemoryMin=64M\n")
        elif sys_dropin.exists():
            sys_dropin.unlink()
        assert systemctl("daemon-reload").returncode == 0
        if self.created:  # OOMScoreAdjust applies to processes started after it
            assert systemctl("restart", self.name).returncode == 0

    def cleanup(self) -> None:
        for d in (UNITS / f"{self.name}.d", UNITS / "system.slice.d"):
            if (d / DROPIN).exists():
                (d / DROPIN).unlink()
                try:
                    d.rmdir()
                except OSError:
                    pass
        if self.created:
            systemctl("stop", self.name)
            (UNITS / self.name).unlink()
        systemctl("daemon-reload")


@pytest.fixture
def ssh_unit(gate: Gate):
    existing = next((u for u in ("ssh.service", "sshd.service") if show(u, "LoadState") == "loaded"), None)
    if existing is None:
        assert not (UNITS / "ssh.service").exists()
        (UNITS / "ssh.service").write_text(
            "[Unit]\nDescription=fake sshd for buildgate's doctor tests\n\n"
            "[Service]\nExecStart=/bin/sleep infinity\n")
        assert systemctl("daemon-reload").returncode == 0
        assert systemctl("start", "ssh.service").returncode == 0
        unit = SshUnit(show("ssh.service", "Id"), created=True, mutable=True)
    else:
        unit = SshUnit(show(existing, "Id"), created=False, mutable=SANDBOX)
    try:
        yield unit
    finally:
        unit.cleanup()


@pytest.fixture
def bgtest_slice(gate: Gate):
    """bgtest.slice with a unit file capping it at 300M (runtime unit, removed after)."""
    path = UNITS / TEST_SLICE
    assert not path.exists()
    path.write_text("[Unit]\nDescription=buildgate doctor test slice\n\n[Slice]\nMemoryMax=300M\n")
    assert systemctl("daemon-reload").returncode == 0
    try:
        yield path
    finally:
        systemctl("stop", TEST_SLICE)
        path.unlink()
        systemctl("daemon-reload")


def assert_sshd_consistent(check: dict) -> None:
    """For a real sshd we must not touch: the verdict follows what it is."""
    if check["data"].get("oom_score_adjust") != -1000:
        assert check["status"] == "fail"


@pytest.mark.backends("systemd")
def test_doctor_reports_missing_slice_unprotected_sshd_and_bad_state_dirs(gate: Gate, ssh_unit: SshUnit) -> None:
    assert not (UNITS / TEST_SLICE).exists()
    if ssh_unit.mutable:
        ssh_unit.protect(False)
    real = gate.root / "real-state"
    real.mkdir()
    variants = {
        "world-writable": (lambda p: (p.mkdir(), p.chmod(0o777)), "chmod o-w {p}", "world-writable (mode 0777)"),
        "foreign owner": (lambda p: (p.mkdir(), os.chown(p, 65534, 65534)), "chown root {p}", "owned by uid 65534"),
        "symlink": (lambda p: p.symlink_to(real), "rm {p}", "is a symlink"),
    }
    for n, (label, (make, fix, why)) in enumerate(variants.items()):
        state = gate.root / f"state-{n}"
        make(state)
        gate.write_conf(state_dir=str(state))
        rc, checks, text = doctor(gate)
        assert rc == 1, (label, text)
        st = checks["state_dir"]
        assert st["status"] == "fail" and why in st["detail"], (label, st)
        assert st["fix"] == fix.format(p=state), (label, st)
        assert f"fix: {fix.format(p=state)}" in text
        assert checks["queue"]["status"] == "info" and "unsafe" in checks["queue"]["detail"]

    # what does not depend on the state directory (the last run's output)
    assert checks["config"]["status"] == "ok"
    assert checks["systemd"]["status"] == "ok" and checks["systemd"]["data"]["version"] >= 200
    assert checks["backend"]["status"] == "ok" and checks["backend"]["data"]["backend"] == "systemd"
    assert checks["cgroup"]["status"] == "ok"
    sl = checks["slice"]
    assert sl["status"] == "warn" and f"{TEST_SLICE} has no unit file" in sl["detail"]
    assert sl["fix"] == f"buildgate setup (or by hand: systemctl set-property {TEST_SLICE} MemoryMax=400M)"
    assert f"fix: {sl['fix']}" in text
    assert checks["budget"]["data"]["budget"] == 400 * 1024**2
    sshd = checks["sshd"]
    assert sshd["data"]["unit"] == ssh_unit.name
    if ssh_unit.mutable:
        assert sshd["status"] == "fail"
        assert f"{ssh_unit.name} OOMScoreAdjust=0 (-1000 wanted)" in sshd["detail"]
        assert f"/etc/systemd/system/{ssh_unit.name}.d/50-buildgate.conf" in sshd["fix"]
        assert "OOMScoreAdjust=-1000" in sshd["fix"] and f"fix: {sshd['fix']}" in text
    else:
        assert_sshd_consistent(sshd)


@pytest.mark.backends("systemd")
def test_doctor_is_ok_with_the_slice_defined_and_sshd_protected(
        gate: Gate, ssh_unit: SshUnit, bgtest_slice: Path) -> None:
    state = gate.root / "state"
    state.mkdir(mode=0o755)
    if ssh_unit.mutable:
        ssh_unit.protect(True)
    rc, checks, text = doctor(gate)
    sl = checks["slice"]
    assert sl["status"] == "ok", sl
    assert sl["data"]["memory_max"] == 300 * 1024**2 and str(bgtest_slice) in sl["detail"]
    # the slice's 300M is below the config's 400M: it is the budget
    budget = checks["budget"]
    assert budget["status"] == "ok" and budget["data"]["budget"] == 300 * 1024**2
    assert f"MemoryMax of {TEST_SLICE}" in budget["detail"]
    st = checks["state_dir"]
    assert st["status"] == "ok" and str(state) in st["detail"]
    assert checks["queue"]["status"] == "info"  # no build ran: no q/ yet
    sshd = checks["sshd"]
    if not ssh_unit.mutable:
        assert_sshd_consistent(sshd)
    elif oom_adjustable() or not ssh_unit.created:
        assert sshd["status"] == "ok", sshd
        assert sshd["data"]["oom_score_adjust"] == -1000
        if V2:
            assert sshd["data"]["memory_min_effective"] == 64 * 1024**2
    else:
        # this kernel refuses a negative oom_score_adj (e.g. a sandboxed CI
        # machine): the unit is right but the running sshd is not protected,
        # and doctor must not claim it is
        assert sshd["status"] == "fail", sshd
        assert sshd["data"]["oom_score_adjust"] == -1000
        assert "refuses a negative oom_score_adj" in sshd["detail"]
    for name in ("config", "systemd", "cgroup", "backend"):
        assert checks[name]["status"] == "ok", checks[name]
    if not any(c["status"] == "fail" for c in checks.values()):
        assert rc == 0


def _stale_ticket(state: Path, seq: int) -> None:
    ticket = {"seq": seq, "pid": 999999, "pid_start": 1, "boot": "x", "uid": 0, "name": "ghost",
              "mem": 100 * 1024**2, "argv": "ghost", "cwd": "/", "state": "waiting"}
    (state / "q" / f"{seq}.json").write_text(json.dumps(ticket))
    (state / "q" / f"{seq}.lock").write_text("")


def test_doctor_counts_running_waiting_orphaned_and_stale_tickets(gate: Gate) -> None:
    go = gate.root / "go"
    holder = gate.popen("run", "--mem", "300M", "--name", "hold", "--", *gate.job("h", "--until", str(go)))
    waiter = None
    try:
        gate.wait_log("start h")
        _stale_ticket(gate.state, 99)  # a waiting ticket whose buildgate is gone
        _, checks, _ = doctor(gate)
        q = checks["queue"]
        # the first of the two doctor runs removed the stale ticket
        assert q["status"] == "ok" and q["detail"].startswith("1 running, 0 waiting, 0 orphaned"), q
        assert not (gate.state / "q" / "99.json").exists()
        _stale_ticket(gate.state, 99)
        rc = gate.run("doctor", "--json")
        q = {c["name"]: c for c in json.loads(rc.stdout)}["queue"]
        assert q["data"]["cleaned"] == 1 and "removed 1 stale ticket of dead buildgates" in q["detail"]

        waiter = gate.popen("run", "--mem", "300M", "--name", "wait", "--", "true")
        gate.wait_queue(2)
        _, checks, _ = doctor(gate)
        assert checks["queue"]["detail"].startswith("1 running, 1 waiting, 0 orphaned (300M of 400M reserved)")

        # buildgate of the running build dies; its build runs on and keeps its reservation
        kill(holder, signal.SIGKILL)
        assert wait_gone(holder.pid)
        _, checks, _ = doctor(gate)
        q = checks["queue"]
        assert q["status"] == "ok" and q["detail"].startswith("1 running, 1 waiting, 1 orphaned"), q
        assert q["data"]["orphaned"] == 1
    finally:
        go.touch()
        if waiter is not None:
            assert waiter.wait(60) == 0, waiter.stderr.read() if waiter.stderr else ""
        kill(holder, signal.SIGKILL)
        holder.wait(30)


@pytest.mark.backends("cgroupfs")
def test_doctor_on_this_machine_with_backend_auto(gate: Gate) -> None:
    """Bare machine (no systemd): systemd fails, builds are capped through cgroupfs.
    The same test inside the sandbox sees systemd, and auto picks it."""
    gate.write_conf(backend="auto")
    rc, checks, text = doctor(gate)
    assert rc == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)
    assert checks["cgroup"]["status"] == "ok"
    assert checks["cgroup"]["data"]["version"] == detect_layout().version
    backend = checks["backend"]
    if os.path.isdir("/run/systemd/system"):
        assert checks["systemd"]["status"] == "ok"
        assert backend["status"] == "ok" and backend["data"]["backend"] == "systemd"
        assert checks["slice"]["status"] in ("ok", "warn")
    else:
        sd = checks["systemd"]
        assert sd["status"] == "fail" and "systemd is not the init system" in sd["detail"]
        assert f"PID 1 is {Path('/proc/1/comm').read_text().strip()}" in sd["detail"]
        assert rc == 1 and "FAIL  systemd: systemd is not the init system" in text
        assert backend["status"] == "ok" and backend["data"]["backend"] == "cgroupfs"
        assert "buildgate run would use cgroupfs (backend = auto)" in backend["detail"]
        assert checks["slice"]["status"] in ("info", "ok")
        assert TEST_SLICE in checks["slice"]["detail"]
        assert checks["sshd"]["status"] in ("info", "ok", "fail")
    assert checks["state_dir"]["status"] == "info"  # not created yet


def test_doctor_with_an_invalid_config_fails_that_check_and_exits_78(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text('budgt = "6G"\n')
    env = dict(os.environ, BUILDGATE_CONFIG=str(conf))
    env.pop("BUILDGATE_DEBUG", None)
    for args in (["doctor"], ["doctor", "--json"]):
        out = subprocess.run([sys.executable, "-m", "buildgate", *args], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 78, out
        assert out.stderr == ""
    checks = json.loads(out.stdout)
    assert [c["name"] for c in checks] == NAMES  # the other checks still ran
    config = checks[0]
    assert config["status"] == "fail" and "unknown key 'budgt'" in config["detail"]
    assert config["fix"].startswith(f"edit {conf}: unknown key 'budgt'")
    missing = subprocess.run([sys.executable, "-m", "buildgate", "--config", str(tmp_path / "nope.conf"),
                              "doctor"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 78 and "no such file" in missing.stdout


# -- not root: the privileged helper's side (fixture from test_nonroot) --------

nonroot = _nonroot.nonroot  # the helper socket, socket-activated, for uid 4242 / gid 4243


@pytest.mark.backends("systemd")
def test_doctor_as_a_non_root_member_and_non_member(nonroot: _nonroot.NonRoot) -> None:
    out = nonroot.run("run", "--mem", "100M", "--", "true")  # makes the state directory
    assert out.returncode == 0, out.stderr
    _stale_ticket(nonroot.gate.state, 99)

    out = nonroot.run("doctor", "--json")
    assert out.stderr == "" and out.returncode in (0, 1), out
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert list(checks) == NAMES
    assert out.returncode == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)
    backend = checks["backend"]
    assert backend["status"] == "ok" and backend["data"]["backend"] == "helper", backend
    assert f"goes through the privileged helper ({nonroot.sock})" in backend["detail"]
    helper = checks["helper"]
    assert helper["status"] == "ok" and helper["data"]["gid"] == _nonroot.GID, helper
    # uid 4242 has no passwd entry, and dbus-daemon refuses such callers: then
    # doctor cannot see systemd as this user, and says to run it as root
    # (the build above went through the helper, which is root)
    if checks["systemd"]["status"] != "ok":
        assert checks["systemd"]["status"] == "warn" and checks["systemd"]["fix"] == "sudo buildgate doctor"
        assert checks["slice"]["status"] == "warn" and checks["sshd"]["status"] == "warn"
    assert checks["state_dir"]["status"] == "ok"
    # read-only: the member sees the stale ticket but cannot (and does not) delete it
    q = checks["queue"]
    assert q["data"]["readonly"] and q["data"]["cleaned"] == 1, q
    assert "1 stale ticket of dead buildgates (the next build removes them)" in q["detail"]
    assert (nonroot.gate.state / "q" / "99.json").exists()

    out = nonroot.run("doctor", "--json", groups=_nonroot.OTHER_GID)
    assert out.stderr == "", out.stderr
    backend = {c["name"]: c for c in json.loads(out.stdout)}["backend"]
    assert backend["status"] == "warn" and f"is for group {_nonroot.GID}" in backend["detail"], backend
    assert backend["fix"].startswith(f"usermod -aG {_nonroot.GID} {_nonroot.UID}")


@pytest.mark.backends("systemd", "cgroupfs")
def test_doctor_names_the_largest_memory_user_outside_builds(gate: Gate, tmp_path: Path) -> None:
    """A 'service' holding 300M (a real process, outside the build slice) is named
    in the budget check, with its RSS (psutil's process walk)."""
    name = "bgtest-hog-svc"
    exe = tmp_path / name
    exe.symlink_to(sys.executable)  # psutil's name: the process's comm, from its argv[0] file
    hog = subprocess.Popen([str(exe), "-c", "import sys, time\nb = bytearray(300 << 20)\n"
                            "for i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\ntime.sleep(300)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "ready"
        _rc, checks, text = doctor(gate)
        largest = {u["name"]: u["rss"] for u in checks["budget"]["data"]["largest"]}
        assert largest.get(name, 0) >= 300 << 20, largest  # (a busy host may have bigger ones)
        detail = checks["budget"]["detail"]
        if next(iter(largest)) == name:
            assert f"(largest: {name} 3" in detail, detail
    finally:
        kill(hog)
        hog.wait()
