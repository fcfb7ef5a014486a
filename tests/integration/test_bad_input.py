"""Every bad input: one line naming problem and fix, a documented code, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import TEST_SLICE, Gate


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("buildgate: ")
    return lines[0]


@pytest.mark.parametrize("mem", ["0", "-1G", "lots", "2.5X", "0%", "150%", ""])
def test_bad_sizes_exit_2_and_run_nothing(gate: Gate, mem: str) -> None:
    marker = gate.root / "ran"
    out = gate.run("run", "--mem", mem, "--", "touch", str(marker))
    assert out.returncode == 2, out.stderr
    assert "invalid size" in _one_line(out.stderr)
    assert not marker.exists()


def test_reservation_over_the_budget_is_refused_at_once(gate: Gate) -> None:
    out = gate.run("run", "--mem", "1G", "--", "true")
    assert out.returncode == 2
    line = _one_line(out.stderr)
    assert "--mem 1G is more than the build budget 400M" in line and "lower --mem" in line


@pytest.mark.backends("systemd")
def test_the_slice_memorymax_is_the_budget(gate: Gate) -> None:
    """A slice with MemoryMax= caps the budget below the configured one."""
    unit = f"/run/systemd/system/{TEST_SLICE}"
    if os.path.exists(f"/etc/systemd/system/{TEST_SLICE}"):
        pytest.fail(f"a host unit {TEST_SLICE} exists; the test would not be isolated")
    with open(unit, "w") as fh:
        fh.write("[Slice]\nMemoryMax=300M\n")
    try:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        out = gate.run("run", "--mem", "350M", "--", "true")
        assert out.returncode == 2
        assert f"more than the build budget 300M (MemoryMax of {TEST_SLICE}" in _one_line(out.stderr)
        hold = gate.popen("run", "--mem", "100M", "--", *gate.job("h", "--until", str(gate.root / "go")))
        gate.wait_log("start h")  # the slice is active now: its cgroup has the limit
        out = gate.run("run", "--mem", "350M", "--", "true")
        assert out.returncode == 2 and "more than the build budget 300M" in out.stderr, out.stderr
        (gate.root / "go").touch()
        assert hold.wait(60) == 0
        out = gate.run("run", "--", "sh", "-c", "true")
        assert out.returncode == 0 and "of 300M cap" in out.stderr
    finally:
        os.unlink(unit)
        subprocess.run(["systemctl", "daemon-reload"], check=True)


def test_wait_and_no_wait_together_is_a_usage_error(gate: Gate) -> None:
    out = gate.run("run", "--wait", "5", "--no-wait", "--", "true")
    assert out.returncode == 2 and "contradict" in _one_line(out.stderr)


@pytest.mark.parametrize("args", [["--wait", "-1"], ["--wait", "soon"], ["-E", "300"], ["--name", "a/b"], []])
def test_bad_options_exit_2_with_one_line(gate: Gate, args: list[str]) -> None:
    marker = gate.root / "ran"
    out = gate.run("run", *args, *(["--", "touch", str(marker)] if args else []))
    assert out.returncode == 2, out.stderr
    _one_line(out.stderr)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, needle",
    [("budget = ", "not valid TOML"), ("colour = 'red'", "unknown key 'colour'"), ("budget = '1Q'", "budget:")],
)
def test_invalid_config_exits_78(gate: Gate, content: str, needle: str) -> None:
    gate.conf.write_text(content + "\n")
    out = gate.run("run", "--", "true")
    assert out.returncode == 78
    line = _one_line(out.stderr)
    assert str(gate.conf) in line and needle in line


def test_unreadable_config_exits_78(gate: Gate) -> None:
    env = gate.env(BUILDGATE_CONFIG=str(gate.root))  # a directory
    out = subprocess.run(gate.cmd("run", "--", "true"), env=env, capture_output=True, text=True)
    assert out.returncode == 78 and "is a directory" in _one_line(out.stderr)
    env = gate.env(BUILDGATE_CONFIG=str(gate.root / "missing.conf"))
    out = subprocess.run(gate.cmd("run", "--", "true"), env=env, capture_output=True, text=True)
    assert out.returncode == 78 and "no such file" in _one_line(out.stderr)


def _with_state(gate: Gate, state) -> None:
    gate.write_conf(state_dir=str(state))


def test_state_dir_symlink_is_refused(gate: Gate) -> None:
    real = gate.root / "elsewhere"
    real.mkdir()
    link = gate.root / "state-link"
    link.symlink_to(real)
    _with_state(gate, link)
    out = gate.run("run", "--", "touch", str(gate.root / "ran"))
    assert out.returncode == 77
    assert "is a symlink: remove it" in _one_line(out.stderr)
    assert not (gate.root / "ran").exists()


def test_state_dir_with_wrong_owner_or_mode_is_refused(gate: Gate) -> None:
    state = gate.root / "st"
    state.mkdir()
    _with_state(gate, state)
    os.chown(state, 4321, 4321)
    out = gate.run("run", "--", "true")
    assert out.returncode == 77 and "owned by uid 4321" in _one_line(out.stderr)
    os.chown(state, 0, 0)
    os.chmod(state, 0o777)
    out = gate.run("run", "--", "true")
    assert out.returncode == 77 and "world-writable" in _one_line(out.stderr)
    os.chmod(state, 0o755)
    assert gate.run("run", "--", "true").returncode == 0


@pytest.mark.backends("systemd")
def test_systemd_unreachable_exits_69(gate: Gate) -> None:
    """In a mount namespace where /run/systemd is empty, systemd looks absent."""
    marker = gate.root / "ran"
    script = (
        "mount -t tmpfs none /run/systemd && exec "
        + " ".join([sys.executable, "-m", "buildgate", "run", "--", "touch", str(marker)])
    )
    out = subprocess.run(["unshare", "--mount", "sh", "-c", script], env=gate.env(), capture_output=True, text=True)
    assert out.returncode == 69, out.stderr
    assert "systemd" in _one_line(out.stderr)
    assert not marker.exists()
