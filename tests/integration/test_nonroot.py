"""Non-root callers through the privileged helper, against a real systemd.

The helper runs from the shipped unit templates (systemd/buildgate-helper.*),
socket-activated by the sandbox's systemd, with a test config. Callers are uid
4242 with or without group 4243 (numeric: no /etc/passwd or /etc/group entry is
needed, and the host's are never touched).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import JOB, TEST_SLICE, Gate, wait_gone

REPO = Path(__file__).resolve().parents[2]
UID, GID, OTHER_GID = 4242, 4243, 4244
SOCKET_UNIT = "bgtest-helper.socket"


@dataclass
class NonRoot:
    base: Path
    conf: Path
    sock: Path
    log: Path
    gate: Gate

    def env(self, **extra: str) -> dict[str, str]:
        import site

        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        # /root is not readable for uid 4242: run Debian's python on our sources and deps
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *site.getsitepackages()])
        env["BUILDGATE_CONFIG"] = str(self.conf)
        env["HOME"] = str(self.base)
        env.update(extra)
        return env

    def cmd(self, *args: str, groups: int = GID) -> list[str]:
        return ["setpriv", f"--reuid={UID}", f"--regid={groups}", f"--groups={groups}", "--",
                "/usr/bin/python3", "-m", "buildgate", *args]

    def run(self, *args: str, groups: int = GID, env: dict[str, str] | None = None, timeout: float = 90,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args, groups=groups), env=env or self.env(), capture_output=True,
                              text=True, timeout=timeout, cwd=self.base, **kw)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*args), env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=self.base)

    def job(self, label: str, *opts: str) -> list[str]:
        return ["/usr/bin/python3", JOB, str(self.log), label, *opts]

    def raw(self, script: str, groups: int = GID) -> subprocess.CompletedProcess:
        """Speak the helper protocol by hand, as uid 4242 (forged requests)."""
        cmd = ["setpriv", f"--reuid={UID}", f"--regid={groups}", f"--groups={groups}", "--",
               "/usr/bin/python3", "-c", script, str(self.sock)]
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60, cwd=self.base)


def _systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def nonroot(gate: Gate) -> NonRoot:
    if not os.path.exists("/usr/bin/python3"):
        pytest.fail("/usr/bin/python3 is needed to run buildgate as a non-root user")
    base = Path(tempfile.mkdtemp(prefix="bgnr-", dir="/tmp"))
    base.chmod(0o755)
    conf, sock, log = base / "buildgate.conf", base / "helper.sock", base / "events.log"
    log.touch()
    log.chmod(0o666)
    gate.conf = conf
    gate.state = base / "state"
    gate.legacy = base / "legacy.lock"
    gate.log = log
    gate.write_conf(group=str(GID), helper_socket=str(sock))
    conf.chmod(0o644)
    units = Path("/run/systemd/system")
    socket_text = (REPO / "systemd/buildgate-helper.socket").read_text()
    socket_text = socket_text.replace("@SOCKET@", str(sock)).replace("/run/buildgate/helper.sock", str(sock))
    # systemd resolves SocketGroup= by name; our test group has no /etc/group
    # entry (the host's /etc is never touched), so set the same owner by hand.
    socket_text = socket_text.replace("SocketGroup=@GROUP@\n", f"ExecStartPost=/bin/chgrp {GID} {sock}\n")
    assert "@GROUP@" not in socket_text
    service_text = (REPO / "systemd/buildgate-helper@.service").read_text()
    service_text = service_text.replace("@BUILDGATE@", f"{sys.executable} -m buildgate")
    service_text = service_text.replace("[Service]\n", f"[Service]\nEnvironment=BUILDGATE_CONFIG={conf}\n")
    (units / SOCKET_UNIT).write_text(socket_text)
    (units / "bgtest-helper@.service").write_text(service_text)
    _systemctl("daemon-reload")
    _systemctl("start", SOCKET_UNIT)
    try:
        yield NonRoot(base, conf, sock, log, gate)
    finally:
        subprocess.run(["systemctl", "stop", SOCKET_UNIT], capture_output=True)
        for name in (SOCKET_UNIT, "bgtest-helper@.service"):
            (units / name).unlink(missing_ok=True)
        _systemctl("daemon-reload")
        subprocess.run(["rm", "-rf", str(base)])


@pytest.mark.backends("systemd")
def test_a_group_member_runs_a_capped_build_as_itself(nonroot: NonRoot) -> None:
    probe = (
        "import os; from buildgate.cgroup import MemoryCgroup\n"
        "cg = MemoryCgroup.of_pid(os.getpid())\n"
        "print(os.getuid(), cg.path, cg.limit())\n"
    )
    out = nonroot.run("run", "--mem", "150M", "--name", "mine", "--", "/usr/bin/python3", "-c", probe)
    assert out.returncode == 0, out.stderr
    uid, path, limit = out.stdout.split()
    assert int(uid) == UID
    assert f"/{TEST_SLICE}/buildgate-mine-" in path
    assert int(limit) == 150 * 1024**2
    assert "mine: waited" in out.stderr and "of 150M cap; ok" in out.stderr


@pytest.mark.backends("systemd")
def test_a_member_build_over_its_cap_is_killed_with_the_same_message(nonroot: NonRoot) -> None:
    out = nonroot.run("run", "--mem", "100M", "--", *nonroot.job("a", "--alloc", "400"))
    assert out.returncode == 137, out.stderr
    assert "killed by its 100M memory cap" in out.stderr


@pytest.mark.backends("systemd")
def test_a_member_cannot_exceed_the_budget_or_pick_the_slice(nonroot: NonRoot) -> None:
    out = nonroot.run("run", "--mem", "1G", "--", "true")
    assert out.returncode == 2 and "more than the build budget 400M" in out.stderr, out.stderr
    # its own config cannot widen the budget or move the build: the helper uses root's
    mine = nonroot.base / "mine.conf"
    mine.write_text(f'budget = "100G"\nslice = "other.slice"\nhelper_socket = "{nonroot.sock}"\n'
                    f'group = "{GID}"\nstate_dir = "{nonroot.base}/fake"\n')
    mine.chmod(0o644)
    env = nonroot.env(BUILDGATE_CONFIG=str(mine))
    out = nonroot.run("run", "--mem", "1G", "--", "true", env=env)
    assert out.returncode == 2 and "400M" in out.stderr, out.stderr
    out = nonroot.run("run", "--", "cat", "/proc/self/cgroup", env=env)
    assert out.returncode == 0, out.stderr
    assert f"/{TEST_SLICE}/" in out.stdout and "other.slice" not in out.stdout


@pytest.mark.backends("systemd")
def test_a_user_outside_the_group_gets_77(nonroot: NonRoot) -> None:
    marker = nonroot.base / "ran"
    out = nonroot.run("run", "--", "touch", str(marker), groups=OTHER_GID)
    assert out.returncode == 77, out.stderr
    assert f"not allowed: add {UID} to group {GID}" in out.stderr
    assert not marker.exists()


FORGE = r"""
import json, socket, sys, os
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
f = s.makefile("rwb")
def send(o): f.write(json.dumps(o).encode() + b"\n"); f.flush()
def recv():
    line = f.readline()
    return json.loads(line) if line else None
MODE = os.environ["MODE"]
if MODE == "garbage":
    f.write(b"this is not json\n"); f.flush(); print(json.dumps(recv())); sys.exit()
if MODE == "op":
    send({"op": "pids", "main": 1}); print(json.dumps(recv())); sys.exit()
if MODE == "stop":  # stop someone else's build: there is no op that names one
    send({"op": "stop", "scope": os.environ["VICTIM_SCOPE"]}); print(json.dumps(recv())); sys.exit()
if MODE == "uncapped":
    send({"op": "run", "argv": ["true"], "mem": "0"}); print(json.dumps(recv())); sys.exit()
send({"op": "run", "argv": ["sleep", "100"], "mem": "50M"})
while True:
    m = recv()
    if m is None or m.get("event") != "waiting": break
assert m["event"] == "admitted", m
if MODE == "pid1":
    send({"op": "pids", "main": 1, "keeper": 1})
elif MODE == "notmychild":
    send({"op": "pids", "main": int(os.environ["VICTIM"]), "keeper": int(os.environ["VICTIM"])})
print(json.dumps(recv()))
"""


@pytest.mark.backends("systemd")
@pytest.mark.parametrize("mode, needle", [
    ("garbage", "malformed message"),
    ("op", "the first message must be a run request"),
    ("stop", "the first message must be a run request"),
    ("uncapped", "invalid size '0'"),
    ("pid1", "1 is not a process id"),
    ("notmychild", "not a child of the caller"),
])
def test_forged_requests_are_refused(nonroot: NonRoot, mode: str, needle: str) -> None:
    victim = subprocess.Popen(["sleep", "60"])  # root's process: must never land in a build scope
    # root's build, running: a member must not be able to stop it
    gate = nonroot.gate
    other = gate.popen("run", "--mem", "50M", "--name", "roots", "--", *gate.job("r", "--until", str(gate.root / "go")))
    try:
        gate.wait_log("start r")
        [entry] = gate.status()
        out = subprocess.run(
            ["setpriv", f"--reuid={UID}", f"--regid={GID}", f"--groups={GID}", "--",
             "/usr/bin/python3", "-c", FORGE, str(nonroot.sock)],
            env=nonroot.env(MODE=mode, VICTIM=str(victim.pid), VICTIM_SCOPE=entry["scope"]),
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout.strip().splitlines()[-1])
        assert reply["event"] == "error" and needle in reply["message"], reply
        cgroup = Path(f"/proc/{victim.pid}/cgroup").read_text()
        assert "buildgate-" not in cgroup
        assert other.poll() is None and [e["seq"] for e in gate.status()] == [entry["seq"]]
    finally:
        (gate.root / "go").touch()
        victim.kill()
        victim.wait()
    assert other.wait(60) == 0, other.communicate()[1]
    assert "end r" in gate.events_text()  # root's build was never stopped
    assert nonroot.gate.status() == []  # the refused ticket left the queue


@pytest.mark.backends("systemd")
def test_members_and_root_share_one_fifo_queue(nonroot: NonRoot) -> None:
    gate = nonroot.gate
    go = nonroot.base / "go"
    hold = gate.popen("run", "--name", "rootbuild", "--", *gate.job("r", "--until", str(go)))
    gate.wait_log("start r")
    member = nonroot.popen("run", "--name", "memberbuild", "--", *nonroot.job("m"))
    entries = gate.wait_queue(2)
    assert entries[1]["owner"] == str(UID) and entries[1]["state"] == "waiting"
    time.sleep(0.3)
    assert "start m" not in gate.events_text()
    # the member sees the queue too (read-only)
    mine = nonroot.run("status", "--json")
    assert mine.returncode == 0, mine.stderr
    assert [e["name"] for e in json.loads(mine.stdout)] == ["rootbuild", "memberbuild"]
    go.touch()
    assert hold.wait(60) == 0 and member.wait(60) == 0, member.stderr.read()
    iv = gate.intervals()
    assert iv["m"][0] >= iv["r"][1]
    assert "waiting: needs 400M, 400M of 400M reserved by rootbuild" in member.stderr.read()


@pytest.mark.backends("systemd")
def test_sigkill_of_a_member_buildgate_keeps_the_reservation_until_the_build_ends(nonroot: NonRoot) -> None:
    gate = nonroot.gate
    go = nonroot.base / "go"
    member = nonroot.popen("run", "--", *nonroot.job("m", "--until", str(go)))
    gate.wait_log("start m")
    member.send_signal(signal.SIGKILL)
    member.wait(10)
    main_pid = [pid for kind, label, _, pid in gate.events() if kind == "start" and label == "m"][0]
    time.sleep(0.2)
    assert gate.run("run", "--no-wait", "--", "true").returncode == 75
    go.touch()
    assert wait_gone(main_pid, 30)
    out = gate.run("run", "--wait", "30", "--", "true")
    assert out.returncode == 0, out.stderr
