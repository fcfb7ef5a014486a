"""What only exists on cgroup v2: memory.high/memory.swap.max/memory.peak on a
build's cgroup, MemorySwapMax=0 making the cap kill with swap on, systemd's
OOMPolicy=stop and Result=oom-kill.

Every test here is marked ``cgroup2``: on a cgroup v1 host (the tests/run
sandbox on our CI machines) conftest deselects them; the cgroup v2 VM tier
(``tests/run --vm``, e2e/vm.py) runs them, and there a v1 host is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import TEST_SLICE, Gate, M, require_throwaway_host, wait_gone

pytestmark = pytest.mark.cgroup2

PROBE = r"""
import json, os, sys
from buildgate.cgroup import MemoryCgroup
cg = MemoryCgroup.of_pid(os.getpid())
files = {}
for name in ("memory.max", "memory.high", "memory.swap.max", "memory.peak", "memory.events"):
    try:
        files[name] = open(os.path.join(cg.dir, name)).read().strip()
    except OSError as exc:
        files[name] = "ERROR " + exc.strerror
json.dump({"path": cg.path, "scope": os.environ["BUILDGATE_SCOPE"], "files": files}, sys.stdout)
"""


def high_for(mem: int) -> int:
    """MemoryHigh= for a cap: a sixteenth under it, at least 4M under."""
    return mem - max(mem // 16, 4 * M)


@pytest.mark.backends("systemd", "cgroupfs")
def test_the_scope_has_memory_max_high_and_swap_max_zero(gate: Gate) -> None:
    out = gate.run("run", "--mem", "160M", "--name", "v2probe", "--", sys.executable, "-c", PROBE)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    files = seen["files"]
    assert seen["path"].endswith(f"/{TEST_SLICE}/{seen['scope']}"), seen
    assert files["memory.max"] == str(160 * M)
    assert files["memory.high"] == str(high_for(160 * M))
    assert files["memory.swap.max"] == "0"
    # kernel >= 5.19: the peak comes from memory.peak, not from sampling
    assert files["memory.peak"].isdigit(), files
    assert "oom_kill 0" in files["memory.events"].splitlines()


@pytest.mark.backends("systemd")
def test_systemd_shows_the_v2_properties_of_the_running_scope(gate: Gate, tmp_path: Path) -> None:
    dump = tmp_path / "show"
    script = (f"systemctl show -p MemoryMax,MemoryHigh,MemorySwapMax,OOMPolicy,Slice \"$BUILDGATE_SCOPE\" > {dump}")
    out = gate.run("run", "--mem", "200M", "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    props = dict(line.split("=", 1) for line in dump.read_text().splitlines())
    assert props == {"MemoryMax": str(200 * M), "MemoryHigh": str(high_for(200 * M)),
                     "MemorySwapMax": "0", "OOMPolicy": "stop", "Slice": TEST_SLICE}, props


@pytest.mark.backends("systemd", "cgroupfs")
def test_peak_in_the_summary_is_the_kernels_memory_peak(gate: Gate) -> None:
    out = gate.run("run", "--mem", "200M", "--name", "peaky", "--", *gate.job("a", "--alloc", "120"))
    assert out.returncode == 0, out.stderr
    m = re.search(r"peaky: waited \S+, ran \S+, peak (\d+(?:\.\d)?)M of 200M cap; ok", out.stderr)
    assert m, out.stderr
    # 120M touched plus the interpreter; never above the cap
    assert 120 <= float(m.group(1)) < 200, out.stderr


# ---------------------------------------------------------------- swap


@pytest.fixture
def swap_on():
    """Swap on for the test: /swapfile (the e2e guest has one, off by default)
    or a swap file made for the test; turned off again afterwards."""
    active = subprocess.run(["swapon", "--noheadings", "--show=NAME"], capture_output=True,
                            text=True).stdout.split()
    if active:
        yield active[0]
        return
    require_throwaway_host("turning swap on")
    made = None
    path = Path("/swapfile")
    if not path.exists():
        made = path = Path("/var/tmp/buildgate-test.swap")
        subprocess.run(["fallocate", "-l", "512M", str(path)], check=True)
        path.chmod(0o600)
        subprocess.run(["mkswap", "-q", str(path)], check=True)
    subprocess.run(["swapon", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["swapoff", str(path)], check=True, timeout=300)
        if made is not None:
            made.unlink()


def test_without_memory_swap_max_a_capped_allocation_swaps_instead_of_dying(swap_on: str) -> None:
    """The premise of MemorySwapMax=0: with swap on, MemoryMax alone does not
    kill 300M in a 120M scope (it is pushed to swap).  Plain systemd-run."""
    name = f"bgtest-noswapmax-{os.getpid()}"
    out = subprocess.run(["systemd-run", "--quiet", "--scope", f"--unit={name}", f"--slice={TEST_SLICE}",
                          "-p", "MemoryMax=120M", sys.executable, "-c",
                          "b = bytearray(300 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"],
                         capture_output=True, text=True, timeout=600)
    subprocess.run(["systemctl", "stop", f"{name}.scope"], capture_output=True)
    assert out.returncode == 0 and out.stdout.strip() == "survived", (out.returncode, out.stderr)


@pytest.mark.backends("systemd", "cgroupfs")
def test_with_swap_on_the_cap_still_kills(gate: Gate, swap_on: str) -> None:
    out = gate.run("run", "--mem", "120M", "--name", "swapper", "--", *gate.job("a", "--alloc", "300"),
                   timeout=600)
    assert out.returncode == 137, out.stderr
    assert "swapper: " in out.stderr and "killed by its 120M memory cap, peak " in out.stderr
    assert "end a" not in gate.events_text()
    assert gate.status() == []


# ---------------------------------------------------------------- OOMPolicy, Result


def _journal(unit: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = subprocess.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit],
                              capture_output=True, text=True).stdout
        if "oom-kill" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.mark.backends("systemd")
def test_an_oom_kill_inside_the_build_stops_the_whole_scope(gate: Gate, tmp_path: Path) -> None:
    """OOMPolicy=stop (systemd's default for scopes): when the cap kills one
    process, systemd stops the scope, so a build cannot carry on half-dead; the
    unit's result is oom-kill and buildgate reports the cap and exits 137.

    systemd stops the scope when it sees the oom_kill event (inotify on
    memory.events), so the shell may still run a quick step after the killed
    child (`echo survived` did in a slow VM); what it cannot do is finish: it
    then waits on a 1000 s sleep, and a scope that were not stopped would end
    the run only at the test's timeout, never with 137."""
    pids = tmp_path / "pids"
    job = " ".join(gate.job("child", "--alloc", "300"))
    script = (f"echo $BUILDGATE_SCOPE > {tmp_path}/scope; sleep 1000 & echo $! >> {pids}; "
              f"echo $$ >> {pids}; {job}; echo survived >> {tmp_path}/after; wait; "
              f"echo finished >> {tmp_path}/after")
    out = gate.run("run", "--mem", "120M", "--name", "halfdead", "--", "sh", "-c", script, timeout=300)
    assert out.returncode == 137, out.stderr
    assert "halfdead: " in out.stderr and "killed by its 120M memory cap" in out.stderr
    after = (tmp_path / "after").read_text() if (tmp_path / "after").exists() else ""
    assert "finished" not in after, "the shell finished after the OOM kill"
    for pid in pids.read_text().split():
        assert wait_gone(int(pid), 30), f"pid {pid} survived the scope's stop"
    scope = (tmp_path / "scope").read_text().strip()
    journal = _journal(scope)
    assert "Failed with result 'oom-kill'" in journal, journal
    assert gate.status() == []


@pytest.mark.backends("systemd")
def test_the_oom_killed_scope_is_collected(gate: Gate, tmp_path: Path) -> None:
    """CollectMode=inactive-or-failed: a scope that failed with oom-kill does not
    linger as a failed unit (a host with many OOM-killed builds stays clean)."""
    out = gate.run("run", "--mem", "100M", "--name", "collected", "--",
                   "sh", "-c", f"echo $BUILDGATE_SCOPE > {tmp_path}/scope; exec " + " ".join(gate.job("a", "--alloc", "300")))
    assert out.returncode == 137, out.stderr
    scope = (tmp_path / "scope").read_text().strip()
    deadline = time.monotonic() + 30
    while True:
        load = subprocess.run(["systemctl", "show", "-p", "LoadState,ActiveState", "--value", scope],
                              capture_output=True, text=True).stdout.split()
        if load and load[0] == "not-found":
            break
        assert time.monotonic() < deadline, f"{scope} lingers: {load}"
        time.sleep(0.2)
    failed = subprocess.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend", "buildgate-*"],
                            capture_output=True, text=True).stdout
    assert scope not in failed


# ---------------------------------------------------------------- containers


@pytest.fixture
def busy_cgroup():
    """A cgroup with a process of its own and memory not enabled for its
    children: what a container's cgroup namespace root looks like from inside."""
    from buildgate.cgroup import detect_layout

    path = Path(detect_layout().mount) / f"bgtest-busy-{os.getpid()}"
    path.mkdir()
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        (path / "cgroup.procs").write_text(str(sleeper.pid))
        yield path
    finally:
        sleeper.kill()
        sleeper.wait()
        assert wait_gone(sleeper.pid)
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@pytest.mark.backends("cgroupfs")
def test_a_busy_v2_parent_is_refused_for_cgroupfs_and_auto_falls_back(gate: Gate, busy_cgroup: Path) -> None:
    """v2's no-internal-processes rule: the probe sees that memory cannot be
    enabled for children of a cgroup with processes in it, so --backend cgroupfs
    is a clear 69 (the build never ran) and auto goes lock-only, loudly."""
    assert "memory" not in (busy_cgroup / "cgroup.subtree_control").read_text().split()
    gate.write_conf(backend="cgroupfs", cgroup_root=str(busy_cgroup))
    out = gate.run("run", "--mem", "100M", "--", *gate.job("a"))
    assert out.returncode == 69, out.stderr
    assert "has processes of its own" in out.stderr and "cgroup_root" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "start a" not in gate.events_text()

    gate.write_conf(backend="auto", cgroup_root=str(busy_cgroup))
    cmd = " ".join(gate.cmd("run", "--mem", "100M", "--", *gate.job("b")))
    out = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs none /run/systemd && exec " + cmd],
                         env=gate.env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "this build runs UNCAPPED" in out.stderr and "start b" in gate.events_text()
    # nothing was created under the busy cgroup
    assert not [p for p in busy_cgroup.iterdir() if p.is_dir()]
