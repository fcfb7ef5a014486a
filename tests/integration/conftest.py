"""Integration fixtures: a real systemd, real cgroups, real processes.

``tests/run`` boots systemd as PID 1 of a private namespace when the host has
none and sets BUILDGATE_TEST_SYSTEMD; then a missing systemd is a failure, never
a skip.  Run bare (plain ``pytest`` on a dev box without systemd) the suite is
skipped with a pointer to ``tests/run``.

Every test gets its own config, state directory and legacy lock; all use the
slice ``bgtest.slice``, so a host's real builds and build.slice are untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

JOB = str(Path(__file__).with_name("job.py"))
#: One slice per test run: concurrent runs on one machine (the bare-machine
#: cgroupfs tests share the real memory hierarchy) never touch each other's builds.
TEST_SLICE = f"bgtest{os.getpid()}.slice"
M = 1024**2


#: Backends this run covers.  tests/run: "systemd,cgroupfs" inside the systemd
#: sandbox, "cgroupfs,none" on the bare machine.
BACKENDS = [b for b in os.environ.get("BUILDGATE_TEST_BACKENDS", "systemd,cgroupfs").split(",") if b]
CAPPED = ("systemd", "cgroupfs")
_UNAVAILABLE = "not-in-this-run"


#: "2" in the cgroup v2 VM tier (e2e/guest-pytest.sh): this host must be cgroup v2.
REQUIRE_CGROUP = os.environ.get("BUILDGATE_TEST_CGROUP", "")


def cgroup_version() -> int:
    from buildgate.cgroup import detect_layout

    return detect_layout().version


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): backends a test applies to (default: capped ones)")
    config.addinivalue_line("markers", "cgroup2: needs cgroup v2; deselected on a v1 host, "
                                       "run by the VM tier (tests/run --vm)")
    if REQUIRE_CGROUP and str(cgroup_version()) != REQUIRE_CGROUP:
        raise pytest.UsageError(f"BUILDGATE_TEST_CGROUP={REQUIRE_CGROUP} but this host's memory controller "
                                f"is on cgroup v{cgroup_version()}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The same behaviour tests run over each backend this run covers."""
    if "gate" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    applies = marker.args if marker else CAPPED
    params = [b for b in BACKENDS if b in applies] or [_UNAVAILABLE]
    metafunc.parametrize("backend", params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test whose backends are not covered by this run is deselected (and
    # counted as such), not skipped: the other half of tests/run runs it.
    # Likewise a cgroup v2 test on a v1 host: the VM tier (tests/run --vm) runs it.
    keep, drop = [], []
    v1_host = any(item.get_closest_marker("cgroup2") for item in items) and cgroup_version() != 2
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == _UNAVAILABLE:
            drop.append(item)
        elif v1_host and item.get_closest_marker("cgroup2") is not None:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def real_systemd() -> None:
    if "systemd" not in BACKENDS or os.path.isdir("/run/systemd/system"):
        return
    if os.environ.get("BUILDGATE_TEST_SYSTEMD") or os.environ.get("CI"):
        pytest.fail("systemd is not running here although tests/run said it would be", pytrace=False)
    pytest.skip("no systemd as init here: run the suite with `sudo tests/run`", allow_module_level=True)


#: Set where the whole host is throwaway (the e2e guest: e2e/guest-pytest.sh).
THROWAWAY = os.environ.get("BUILDGATE_TEST_THROWAWAY") == "1"


def require_throwaway_host(what: str) -> None:
    """Tests that change the host itself (/etc/systemd, build.slice, swap) run
    only in the tests/run sandbox (which gives them a private /etc) or on a host
    marked throwaway: never by surprise on a developer's or a production host.
    In CI such a host is a mistake in the harness, so it fails instead."""
    if THROWAWAY or os.environ.get("BUILDGATE_TEST_SYSTEMD") == "sandbox":
        return
    message = (f"{what} would change this host; run it in the sandbox (sudo tests/run) or the VM tier "
               f"(sudo tests/run --vm), or set BUILDGATE_TEST_THROWAWAY=1 on a throwaway host")
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class Gate:
    root: Path
    conf: Path
    state: Path
    legacy: Path
    log: Path
    backend: str = "systemd"

    def write_conf(self, **extra: object) -> None:
        write_conf(self.conf, self.state, self.legacy, **{"backend": self.backend, **extra})

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["BUILDGATE_CONFIG"] = str(self.conf)
        # the test's own parsed-config cache: never the host's /run/buildgate
        env["BUILDGATE_CONFIG_CACHE"] = str(self.root / "config.cache")
        env.pop("BUILDGATE_DEBUG", None)
        env.update(extra)
        return env

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "buildgate", *args]

    def run(self, *args: str, timeout: float = 90, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), env=self.env(), capture_output=True, text=True,
                              timeout=timeout, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*args), env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)

    def job(self, label: str, *opts: str) -> list[str]:
        return [sys.executable, JOB, str(self.log), label, *opts]

    def status(self) -> list[dict]:
        out = self.run("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait_queue(self, count: int, timeout: float = 30) -> list[dict]:
        """Wait until the queue holds ``count`` tickets."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.status()
            if len(entries) == count:
                return entries
            if time.monotonic() > deadline:
                raise AssertionError(f"queue has {len(entries)} tickets, not {count}: {entries}")
            time.sleep(0.05)

    def wait_log(self, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.events_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} never logged: {self.events_text()}")
            time.sleep(0.02)

    def events_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def events(self) -> list[tuple[str, str, float, int]]:
        rows = []
        for line in self.events_text().splitlines():
            kind, label, t, pid = line.split()
            rows.append((kind, label, float(t), int(pid)))
        return rows

    def intervals(self) -> dict[str, tuple[float, float]]:
        # from admission: a build owns its reservation from then on
        start = {lab: t for k, lab, t, _ in self.events() if k == "admit"}
        start.update({lab: t for k, lab, t, _ in self.events() if k == "start" and lab not in start})
        end = {lab: t for k, lab, t, _ in self.events() if k == "end"}
        return {lab: (start[lab], end.get(lab, float("inf"))) for lab in start}

    def start_order(self) -> list[str]:
        """Order of admission (BUILDGATE_ADMITTED), which the queue serializes;
        process start times can race between builds admitted together."""
        return [lab for k, lab, _, _ in sorted(self.events(), key=lambda r: r[2]) if k == "admit"]

    def admitted(self) -> dict[str, float]:
        return {lab: t for k, lab, t, _ in self.events() if k == "admit"}


def write_conf(path: Path, state: Path, legacy: Path, **extra: object) -> None:
    values: dict[str, object] = {
        "budget": "400M",
        "slice": TEST_SLICE,
        "state_dir": str(state),
        "legacy_lock": str(legacy),
        "stop_timeout": 2,
        "wait": 120,
    }
    values.update(extra)
    lines = []
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def gate(tmp_path: Path, backend: str) -> Gate:
    state = tmp_path / "state"
    legacy = tmp_path / "legacy.lock"
    conf = tmp_path / "buildgate.conf"
    g = Gate(root=tmp_path, conf=conf, state=state, legacy=legacy, log=tmp_path / "events.log",
             backend=backend)
    g.write_conf()
    yield g
    # Nothing a test started may outlive it.
    if backend == "systemd":
        # stopping the test slice stops every scope in it (and only those)
        subprocess.run(["systemctl", "stop", TEST_SLICE], capture_output=True)
    elif backend == "cgroupfs":
        _clean_cgroupfs_slice()


def _clean_cgroupfs_slice() -> None:
    from buildgate.cgroup import detect_layout

    layout = detect_layout()
    slice_dir = Path(layout.mount) / TEST_SLICE
    if not slice_dir.is_dir():
        return
    for scope in slice_dir.iterdir():
        if not scope.is_dir():
            continue
        for _ in range(100):
            try:
                pids = (scope / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        for _ in range(50):
            try:
                scope.rmdir()
                break
            except OSError:
                time.sleep(0.02)
    try:
        slice_dir.rmdir()
    except OSError:
        pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
