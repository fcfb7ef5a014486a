"""buildgate run against a real systemd: caps, exit codes, leftovers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TEST_SLICE, Gate, M, alive, wait_gone


def test_build_under_its_cap_passes_and_reports_peak(gate: Gate) -> None:
    out = gate.run("run", "--mem", "200M", "--name", "small", "--", *gate.job("a", "--alloc", "60"))
    assert out.returncode == 0, out.stderr
    m = re.search(r"small: waited \S+, ran \S+, peak (\S+) of 200M cap; ok", out.stderr)
    assert m, out.stderr
    peak = m.group(1)
    assert peak.endswith("M"), peak
    assert 60 <= float(peak[:-1]) < 200, out.stderr


def test_build_over_its_cap_is_oom_killed_with_the_message_and_137(gate: Gate) -> None:
    out = gate.run("run", "--mem", "100M", "--name", "hog", "--", *gate.job("a", "--alloc", "400"))
    assert out.returncode == 137, out.stderr
    assert "killed by its 100M memory cap, peak " in out.stderr
    assert "raise --mem or lower the build's parallelism" in out.stderr
    assert "end a" not in gate.events_text()


def test_the_build_really_runs_in_a_capped_scope_in_the_slice(gate: Gate) -> None:
    # The build reads its own cgroup (mountinfo-aware, so it also works inside
    # the sandbox's cgroup namespace) and the kernel's limit there.
    probe = (
        "import os; from buildgate.cgroup import MemoryCgroup\n"
        "cg = MemoryCgroup.of_pid(os.getpid())\n"
        "sw = os.path.join(cg.dir, 'memory.memsw.limit_in_bytes')\n"
        "swap = open(sw).read().strip() if os.path.exists(sw) else '-'\n"
        "print(cg.path, cg.limit(), os.path.isdir(cg.dir), os.environ['BUILDGATE_MEM'], os.environ['BUILDGATE_SCOPE'], swap)\n"
    )
    out = gate.run("run", "--mem", "150M", "--name", "probe", "--", sys.executable, "-c", probe)
    assert out.returncode == 0, out.stderr
    path, limit, exists, env_mem, env_scope, swap = out.stdout.split()
    if swap != "-":  # cgroup v1 with swap accounting: memory+swap capped too
        assert int(swap) == 150 * M
    assert exists == "True"
    assert int(env_mem) == 150 * M and path.endswith("/" + env_scope)
    assert re.fullmatch(rf".*/{re.escape(TEST_SLICE)}/buildgate-probe-\d+\.scope", path), path
    assert int(limit) == 150 * M


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_exit_status_passes_through(gate: Gate) -> None:
    assert gate.run("run", "--", "sh", "-c", "exit 7").returncode == 7
    assert gate.run("run", "--", "true").returncode == 0
    out = gate.run("run", "--", "false")
    assert out.returncode == 1 and "failed with exit 1" in out.stderr


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_signal_death_is_128_plus_n(gate: Gate) -> None:
    out = gate.run("run", "--", "sh", "-c", "kill -USR1 $$")
    assert out.returncode == 128 + 10, out.stderr
    assert "killed by SIGUSR1" in out.stderr
    assert gate.run("run", "--", "sh", "-c", "kill -TERM $$").returncode == 143


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_command_not_found_is_127_and_not_executable_is_126(gate: Gate, tmp_path) -> None:
    out = gate.run("run", "--", "no-such-command-xyz")
    assert out.returncode == 127
    assert "command not found: no-such-command-xyz" in out.stderr
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    out = gate.run("run", "--", str(script))
    assert out.returncode == 126, out.stderr
    assert "cannot execute" in out.stderr
    assert gate.status() == []  # the reservation went with it


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_dash_dash_is_optional_before_a_plain_command(gate: Gate) -> None:
    out = gate.run("run", "--mem", "50M", "sh", "-c", "echo $0 $1", "x", "-y")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "x -y"


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_stdin_stdout_stderr_are_the_builds(gate: Gate) -> None:
    out = gate.run("run", "--", "sh", "-c", "cat; echo err >&2", input="piped\n")
    assert out.stdout == "piped\n"
    assert "err\n" in out.stderr


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_sigpipe_is_default_in_the_build(gate: Gate) -> None:
    # Python ignores SIGPIPE; a build must not inherit that (yes | head would hang).
    out = gate.run("run", "--", "sh", "-c", "yes | head -n 2", timeout=30)
    assert out.returncode == 0 and out.stdout == "y\ny\n"


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_a_daemonizing_builds_leftover_is_killed(gate: Gate, tmp_path) -> None:
    pidfile = tmp_path / "daemon.pid"
    out = gate.run("run", "--", *gate.job("d", "--daemon", str(pidfile)))
    assert out.returncode == 0, out.stderr
    daemon = int(pidfile.read_text())
    assert wait_gone(daemon, 10), "the leftover daemon survived its build"
    assert "stopped 1 leftover process(es)" in out.stderr


def test_the_next_build_starts_only_after_the_leftovers_are_dead(gate: Gate, tmp_path) -> None:
    """A leftover still uses memory: its reservation is freed only once it is gone
    (an empty scope frees it before the stop job; this one is not empty)."""
    pidfile = tmp_path / "daemon.pid"
    first = gate.popen("run", "--name", "a", "--", *gate.job("a", "--daemon", str(pidfile), "--daemon-ticks", "1", "--sleep", "0.3"))
    gate.wait_log("tick a")
    second = gate.popen("run", "--name", "b", "--", *gate.job("b"))
    assert first.wait(60) == 0 and second.wait(60) == 0, (first.stderr.read(), second.stderr.read())
    assert wait_gone(int(pidfile.read_text()), 10)
    events = gate.events()
    ticks = [t for kind, label, t, _ in events if kind == "tick"]
    b_admitted = min(t for kind, label, t, _ in events if label == "b" and kind in ("admit", "start"))
    assert len(ticks) > 1
    assert max(ticks) < b_admitted, f"the leftover still ran {max(ticks) - b_admitted:.3f}s after b started"


def test_keep_leftovers_keeps_them_and_their_reservation(gate: Gate, tmp_path) -> None:
    pidfile = tmp_path / "daemon.pid"
    out = gate.run("run", "--keep-leftovers", "--", *gate.job("d", "--daemon", str(pidfile)))
    assert out.returncode == 0, out.stderr
    daemon = int(pidfile.read_text())
    assert alive(daemon)
    assert "kept 1 leftover process(es)" in out.stderr
    # the daemon still lives in the capped scope and holds the whole budget
    assert gate.run("run", "--no-wait", "--", "true").returncode == 75
    os.kill(daemon, 9)
    assert wait_gone(daemon)
    out = gate.run("run", "--wait", "60", "--", "true")
    assert out.returncode == 0, out.stderr


@pytest.mark.backends("systemd")
def test_waiting_costs_no_systemd_until_admitted(gate: Gate) -> None:
    """The scope is created only after admission: a queued build has none."""
    hold = gate.popen("run", "--name", "holder", "--", *gate.job("h", "--until", str(gate.root / "go")))
    gate.wait_log("start h")
    waiter = gate.popen("run", "--name", "waiter", "--", "true")
    gate.wait_queue(2)
    units = subprocess.run(["systemctl", "list-units", "--plain", "--no-legend", "buildgate-waiter-*"],
                           capture_output=True, text=True).stdout
    assert units.strip() == ""
    (gate.root / "go").touch()
    assert hold.wait(60) == 0 and waiter.wait(60) == 0


@pytest.mark.backends("none")
def test_lock_only_mode_runs_but_says_loudly_it_is_uncapped(gate: Gate) -> None:
    out = gate.run("run", "--mem", "100M", "--", *gate.job("a", "--alloc", "200"))
    assert out.returncode == 0, out.stderr  # nothing caps it: that is the point of the warning
    lines = out.stderr.splitlines()
    assert lines[0].startswith("buildgate: warning: no cgroup can be written here: this build runs UNCAPPED")
    assert "(UNCAPPED: lock-only mode)" in lines[-1]


@pytest.mark.backends("cgroupfs")
def test_auto_picks_cgroupfs_where_systemd_is_not_init(gate: Gate) -> None:
    """Same host, /run/systemd hidden: auto probes, finds no systemd, caps through
    cgroupfs with the same message and exit code."""
    gate.write_conf(backend="auto")
    cmd = " ".join(gate.cmd("run", "--mem", "100M", "--name", "hog", "--", *gate.job("a", "--alloc", "400")))
    script = "mount -t tmpfs none /run/systemd && exec " + cmd
    out = subprocess.run(["unshare", "--mount", "sh", "-c", script], env=gate.env(), capture_output=True, text=True)
    assert out.returncode == 137, out.stderr
    assert "killed by its 100M memory cap" in out.stderr


def show_scope(scope: str, *props: str) -> dict[str, str]:
    out = subprocess.run(["systemctl", "show", scope, *(f"--property={p}" for p in props)],
                         capture_output=True, text=True, timeout=30)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


@pytest.mark.backends("systemd")
def test_the_scope_has_the_properties_of_issue_2(gate: Gate) -> None:
    """What systemd shows for a running build's scope: the cap, no swap, lower
    CPU/IO weights than services (default 100), a task limit, the command as
    Description, collected even when it failed; all from the config."""
    gate.write_conf(cpu_weight=30, io_weight=40, tasks_max=321)
    hold = gate.popen("run", "--mem", "120M", "--name", "props", "--",
                      *gate.job("p", "--until", str(gate.root / "go")))
    try:
        gate.wait_log("start p")
        [entry] = gate.status()
        scope = entry["scope"]
        assert re.fullmatch(r"buildgate-props-\d+\.scope", scope), scope
        got = show_scope(scope, "MemoryMax", "MemorySwapMax", "CPUWeight", "IOWeight", "TasksMax",
                         "Description", "CollectMode", "Slice", "ActiveState", "SendSIGKILL", "MemoryAccounting")
        assert got["ActiveState"] == "active", got
        assert got["MemoryMax"] == str(120 * M)
        assert got["MemorySwapMax"] == "0"
        assert got["CPUWeight"] == "30" and got["IOWeight"] == "40" and got["TasksMax"] == "321", got
        assert got["Description"].startswith("buildgate: ") and "job.py" in got["Description"], got
        assert got["CollectMode"] == "inactive-or-failed"
        assert got["Slice"] == TEST_SLICE and got["SendSIGKILL"] == "yes"
    finally:
        (gate.root / "go").touch()
    assert hold.wait(60) == 0, hold.communicate()[1]
    # collected once it ended: nothing of it is left in systemd
    assert show_scope(scope, "LoadState")["LoadState"] == "not-found"


@pytest.mark.backends("cgroupfs")
def test_backend_on_the_command_line_overrides_the_config(gate: Gate) -> None:
    """--backend beats `backend =`: the same config, capped by cgroupfs, then
    run lock-only (uncapped, and it says so)."""
    gate.write_conf(backend="none")
    out = gate.run("run", "--backend", "cgroupfs", "--mem", "100M", "--name", "hog", "--",
                   *gate.job("a", "--alloc", "400"))
    assert out.returncode == 137, out.stderr
    assert "killed by its 100M memory cap" in out.stderr
    gate.write_conf(backend="cgroupfs")
    out = gate.run("run", "--backend", "none", "--mem", "100M", "--", *gate.job("b", "--alloc", "200"))
    assert out.returncode == 0, out.stderr
    assert "this build runs UNCAPPED" in out.stderr
    out = gate.run("run", "--backend", "bogus", "--", "true")
    assert out.returncode == 2 and "'bogus' is not one of" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.backends("cgroupfs")
def test_auto_falls_back_to_lock_only_where_no_cgroup_is_writable(gate: Gate) -> None:
    """No systemd and a read-only cgroup tree: auto still queues and runs the
    build, and says loudly that it is not capped."""
    from buildgate.cgroup import detect_layout

    gate.write_conf(backend="auto")
    mount = detect_layout().mount
    cmd = " ".join(gate.cmd("run", "--mem", "100M", "--", "true"))
    script = (f"mount -t tmpfs none /run/systemd && mount -o remount,bind,ro {mount} {mount} "
              f"&& exec {cmd}")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         env=gate.env(), capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "no cgroup can be written here: this build runs UNCAPPED" in out.stderr
    assert "(UNCAPPED: lock-only mode)" in out.stderr


# Modules that once cost every build 5-15 ms each to import (docs/benchmarks.md):
# the run path does without them, and this keeps it that way.
_HEAVY = {"re", "typing", "json", "tomllib", "enum", "contextlib", "dataclasses", "warnings",
          "pprint", "inspect", "functools", "collections", "click", "psutil", "lxml"}


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_the_installed_command_runs_a_build_without_the_heavy_imports(gate: Gate) -> None:
    """Through the `buildgate` command users run (bin/buildgate, as pip installed
    it), the second build with the same config (the first fills the
    parsed-config cache), the build's own child included."""
    command = Path(sys.executable).parent / "buildgate"
    assert command.exists(), f"{command}: the package is not installed with its command"
    argv = [sys.executable, "-X", "importtime", str(command), "run", "--", "true"]
    (gate.root / "config.cache").unlink(missing_ok=True)  # see conftest's env()
    seen = []
    for _ in range(2):
        out = subprocess.run(argv, env=gate.env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        seen.append({line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                     if line.startswith("import time:") and "|" in line})
    assert "buildgate.runner" in seen[1] and "tomllib" in seen[0], "importtime saw nothing"
    assert not _HEAVY & seen[1], sorted(_HEAVY & seen[1])
