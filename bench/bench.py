#!/usr/bin/env python3
"""buildgate's benchmark: overhead, the cost of a waiting build, handoff latency.

Run it with ``sudo bench/run``, which provides a real systemd (the host's, or a
sandboxed one) and calls this script with the venv's python.  Everything is
measured in one run so that the ratios compare like with like on a noisy
machine; the result overwrites docs/benchmarks.md.

This is a report, not a test: a missed target is written down as MISS and the
exit code stays 0.  A non-zero exit code means the benchmark itself could not
run (no systemd, a build failed, a timeout), and then nothing is written.

Every subprocess has a timeout; every process started here is stopped on the
way out (SIGTERM, which makes a buildgate stop its scope, then SIGKILL), and the
bench's slice is stopped too, so no scope outlives the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks.md"
SLICE = "bgbench.slice"
BUDGET = "1G"
PY = sys.executable  # the venv's python (bench/run calls us with it)
BUILDGATE = str(Path(PY).parent / "buildgate")  # the console script users run

# sizes of the three measurements (keep the whole run well under ~3 minutes)
OVERHEAD_N = 30
OVERHEAD_WARMUP = 3
#: The pause before each measured run of (a). Every cgroup migration (systemd
#: moving a scope's first process in) takes the kernel's cgroup_threadgroup_rwsem
#: for writing, and the first writer after a quiet spell waits for an RCU grace
#: period (rcu_sync_enter: ~10-15 ms here). Back to back, a command that starts
#: its scope within a grace period of the previous command's cgroup writes skips
#: that wait; with the pause, every run starts from a quiet kernel, as a build
#: on a real host does. Both ways are measured and reported.
OVERHEAD_GAP = 0.25
CONTEXT_N = 15
WAIT_WINDOW = 10.0
WAIT_SAMPLE_EVERY = 0.5
HANDOFFS = 20
HANDOFF_SLEEP = 0.2

# targets
TARGET_RATIO = 3.0
TARGET_RSS_MB = 15.0
TARGET_WAKEUPS = 0
TARGET_P95_MS = 50.0

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# statistics


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): always one of the samples."""
    data = sorted(values)
    k = max(1, math.ceil(p / 100 * len(data)))
    return data[k - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


# --------------------------------------------------------------------------
# processes


@dataclass
class Procs:
    """Every long-lived process the bench starts, so that all of them can be stopped."""

    live: list[subprocess.Popen] = field(default_factory=list)

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kw)
        self.live.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float, what: str) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} (pid {proc.pid}) still running after {timeout:.0f}s") from None

    def stop_all(self) -> None:
        running = [p for p in self.live if p.poll() is None]
        for p in running:
            try:
                p.terminate()  # a buildgate stops its scope on SIGTERM
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for p in running:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log(f"warning: pid {p.pid} survived SIGKILL")
        self.live.clear()


def run(argv: list[str], timeout: float = 60, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(argv)}") from None
    if check and out.returncode != 0:
        raise BenchError(f"exit {out.returncode}: {shlex.join(argv)}: {out.stderr.strip()[-500:]}")
    return out


def timed(argv: list[str], env: dict, timeout: float = 60) -> float:
    """Wall time of one run, output discarded (buildgate's summary goes to a pipe)."""
    t0 = time.perf_counter()
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(argv)}") from None
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise BenchError(f"exit {out.returncode}: {shlex.join(argv)}: {out.stderr.decode(errors='replace').strip()[-500:]}")
    return elapsed


# --------------------------------------------------------------------------
# the bench's buildgate


@dataclass
class Gate:
    work: Path
    conf: Path
    state: Path
    legacy: Path
    env: dict

    @classmethod
    def create(cls, work: Path) -> Gate:
        state, legacy, conf = work / "state", work / "legacy.lock", work / "buildgate.conf"
        values = {
            "budget": BUDGET,
            "slice": SLICE,
            "state_dir": str(state),
            "legacy_lock": str(legacy),
            "stop_timeout": 2,
            "wait": 120,
        }
        conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        env = dict(os.environ)
        env["BUILDGATE_CONFIG"] = str(conf)
        env.pop("BUILDGATE_DEBUG", None)
        # Bytecode as on an installed host (pip compiles .pyc at install time),
        # whatever the caller's environment says, and without writing __pycache__
        # into the source tree: a private cache, filled by the warm-ups.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        env["LC_ALL"] = "C"  # $EPOCHREALTIME with a '.' in the jobs
        return cls(work, conf, state, legacy, env)

    def status(self) -> list[dict]:
        out = run([BUILDGATE, "status", "--json"], timeout=30, env=self.env)
        return sorted(json.loads(out.stdout), key=lambda e: e["seq"])

    def wait_queue(self, count: int, timeout: float = 30, running: int | None = None,
                   watch: tuple[subprocess.Popen, Path] | None = None) -> list[dict]:
        """Poll ``buildgate status`` until it lists ``count`` tickets (``running`` of them
        running).  ``watch``: a buildgate (and its stderr file) that must not exit meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.status()
            if len(entries) == count and (running is None or
                                          sum(e["state"] == "running" for e in entries) == running):
                for e in entries:
                    if e.get("backend", "systemd") != "systemd":
                        raise BenchError(f"ticket {e['seq']} uses backend {e['backend']!r}, not systemd: "
                                         "this bench measures systemd scopes")
                return entries
            if watch is not None and watch[0].poll() is not None:
                raise BenchError(f"{shlex.join(watch[0].args)} exited {watch[0].returncode} before it was "
                                 f"queued: {watch[1].read_text()[-800:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"queue never reached {count} tickets: {entries}")
            time.sleep(0.05)

    def release_fifo(self, fifo: Path, timeout: float = 30) -> None:
        """Let a job blocked in ``read _ < FIFO`` go (once it has opened the FIFO)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                if time.monotonic() > deadline:
                    raise BenchError(f"nobody opened {fifo} for reading in {timeout:.0f}s") from None
                time.sleep(0.01)
                continue
            try:
                os.write(fd, b"go\n")
            finally:
                os.close(fd)
            return


def stop_slice() -> None:
    """Stop the bench's slice, and with it any scope a run left behind."""
    try:
        subprocess.run(["systemctl", "stop", SLICE], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        log(f"warning: systemctl stop {SLICE} timed out")


# --------------------------------------------------------------------------
# (a) overhead


@dataclass
class Series:
    label: str
    argv: list[str]
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p90(self) -> float:
        return percentile(self.times, 90)


def interleave(series: list[Series], n: int, warmup: int, env: dict, gap: float = 0.0) -> None:
    """Round-robin over the commands: warm-ups first (not recorded), then n rounds.

    ``gap``: a pause before every run, so that no run inherits kernel state
    left warm by the one before it (see OVERHEAD_GAP)."""
    for _ in range(warmup):
        for s in series:
            timed(s.argv, env)
    for _ in range(n):
        for s in series:
            if gap:
                time.sleep(gap)
            s.times.append(timed(s.argv, env))


def bench_overhead(gate: Gate) -> dict:
    lock = gate.work / "flock.lock"
    lock.touch()
    bg = Series("buildgate run -- true", [BUILDGATE, "run", "--", "true"])
    sr = Series("flock L systemd-run --scope --quiet -p MemoryMax=1G true",
                ["flock", str(lock), "systemd-run", "--scope", "--quiet", "-p", "MemoryMax=1G", "true"])
    # Context, not the target: the same floor with the properties buildgate's
    # scopes carry (issue 2, point 6), so the ratio's two parts can be told
    # apart: what systemd spends on them, and what buildgate itself costs.
    props = ["MemoryAccounting=yes", "MemoryMax=1G", "MemorySwapMax=0", "CPUWeight=50", "IOWeight=50",
             "TasksAccounting=yes", "TasksMax=4096", "CollectMode=inactive-or-failed", "TimeoutStopSec=2",
             "SendSIGKILL=yes"]
    srp = Series("flock L systemd-run --scope --quiet --slice=" + SLICE + " -p " + " -p ".join(props) + " true",
                 ["flock", str(lock), "systemd-run", "--scope", "--quiet", f"--slice={SLICE}",
                  *[x for p in props for x in ("-p", p)], "true"])
    log(f"(a) overhead: {OVERHEAD_WARMUP} warm-ups + {OVERHEAD_N} interleaved runs of each command, "
        f"{OVERHEAD_GAP}s apart")
    interleave([bg, sr, srp], OVERHEAD_N, OVERHEAD_WARMUP, gate.env, gap=OVERHEAD_GAP)
    tight = [Series(s.label, s.argv) for s in (bg, sr, srp)]
    log(f"(a) the same, back to back: {OVERHEAD_N} interleaved runs of each command")
    interleave(tight, OVERHEAD_N, 1, gate.env)

    # Context: where the time of `buildgate run -- true` goes.
    # every module of the package (whichever exist now); pystemd is left out, as
    # buildgate may load it its own way (the import profile below shows it)
    mods = sorted(f"buildgate.{f.stem}" for f in (ROOT / "src" / "buildgate").glob("*.py")
                  if f.stem not in ("__init__", "__main__"))
    imports_all = "import " + ", ".join(mods)
    # label (markdown) -> command
    context = {
        "pass": Series("`python -c pass`", [PY, "-c", "pass"]),
        "click": Series("`python -c 'import click'`", [PY, "-c", "import click"]),
        "cli": Series("`python -c 'import buildgate.cli'` (what the console script imports)",
                      [PY, "-c", "import buildgate.cli"]),
        "all": Series(f"`python -c 'import <all {len(mods)} buildgate modules>'`",
                      [PY, "-c", imports_all]),
        "version": Series("`buildgate --version`", [BUILDGATE, "--version"]),
        "status": Series("`buildgate status --json` (empty queue)", [BUILDGATE, "status", "--json"]),
    }
    log(f"(a) context: {CONTEXT_N} interleaved runs of {len(context)} commands")
    interleave(list(context.values()), CONTEXT_N, 2, gate.env)
    log(f"(a) imports of `buildgate run -- true` (PYTHONPROFILEIMPORTTIME, {IMPORT_RUNS} runs)")
    imports = import_profile(gate)
    return {"bg": bg, "sr": sr, "srp": srp, "tight": tight, "context": context, "ratio": bg.median / sr.median,
            "imports": imports}


IMPORT_RUNS = 5


def import_profile(gate: Gate) -> dict:
    """What `buildgate run -- true` imports, as python itself reports it (-X importtime).

    Returns the median over a few runs of the total, and per top-level import
    (including imports done lazily inside functions), of the cumulative microseconds.
    """
    env = dict(gate.env, PYTHONPROFILEIMPORTTIME="1")

    def top_level(argv: list[str]) -> dict[str, int]:
        out = run(argv, timeout=60, env=env)
        top: dict[str, int] = {}
        for line in out.stderr.splitlines():
            if not line.startswith("import time:") or line.count("|") != 2:
                continue
            _, cumulative, name = line.split("|")
            if not cumulative.strip().isdigit() or name.startswith("  "):
                continue  # the header, or a nested import (counted in its parent)
            top[name.strip()] = top.get(name.strip(), 0) + int(cumulative)
        return top

    # what every interpreter imports at startup (encodings, io, site, ...) is in `python -c pass`
    startup = set(top_level([PY, "-c", "pass"]))
    per_run = []
    for _ in range(IMPORT_RUNS):
        top = top_level([BUILDGATE, "run", "--", "true"])
        per_run.append({k: v for k, v in top.items() if k not in startup})
    names = set().union(*per_run)
    median = {n: statistics.median(r.get(n, 0) for r in per_run) for n in names}
    return {
        "total": statistics.median(sum(r.values()) for r in per_run),
        "top": sorted(median.items(), key=lambda kv: -kv[1]),
    }


# --------------------------------------------------------------------------
# (b) a waiting buildgate's cost


def read_task_counters(pid: int) -> dict:
    """Sum over the process's threads of ctxt switches; RSS/HWM and CPU of the process."""
    result = {"rss_kb": 0, "hwm_kb": 0, "vol": 0, "nonvol": 0, "threads": 0}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                result["rss_kb"] = int(value.split()[0])
            elif key == "VmHWM":
                result["hwm_kb"] = int(value.split()[0])
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key == "voluntary_ctxt_switches":
                        result["vol"] += int(value)
                    elif key == "nonvoluntary_ctxt_switches":
                        result["nonvol"] += int(value)
            result["threads"] += 1
        except FileNotFoundError:
            pass
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    result["state"] = fields[0]
    result["cpu_ticks"] = int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)
    return result


def bench_waiting(gate: Gate, procs: Procs) -> dict:
    log(f"(b) waiting cost: one holder, one waiter, {WAIT_WINDOW:.0f}s window")
    fifo = gate.work / "holder.fifo"
    os.mkfifo(fifo)
    holder_err = open(gate.work / "holder.err", "w")
    waiter_err_path = gate.work / "waiter.err"
    waiter_err = open(waiter_err_path, "w")
    try:
        holder = procs.start([BUILDGATE, "run", "--name", "holder", "--", "sh", "-c", f"read _ < {shlex.quote(str(fifo))}"],
                             stderr=holder_err, env=gate.env)
        gate.wait_queue(1, running=1, watch=(holder, gate.work / "holder.err"))
        waiter = procs.start([BUILDGATE, "run", "--name", "waiter", "--", "true"], stderr=waiter_err, env=gate.env)
        entries = gate.wait_queue(2, watch=(waiter, waiter_err_path))
        if [e["pid"] for e in entries] != [holder.pid, waiter.pid] or entries[1]["state"] != "waiting":
            raise BenchError(f"unexpected queue: {entries}")
        # It is queued; let it print its status line and go to sleep.
        deadline = time.monotonic() + 15
        while "waiting" not in waiter_err_path.read_text():
            if time.monotonic() > deadline:
                raise BenchError(f"the waiter never said it waits: {waiter_err_path.read_text()!r}")
            time.sleep(0.05)
        time.sleep(0.5)

        samples = [read_task_counters(waiter.pid)]
        t0 = time.monotonic()
        while True:
            nxt = t0 + len(samples) * WAIT_SAMPLE_EVERY
            if nxt > t0 + WAIT_WINDOW + 1e-9:
                break
            time.sleep(max(0.0, nxt - time.monotonic()))
            samples.append(read_task_counters(waiter.pid))
        window = time.monotonic() - t0
        if waiter.poll() is not None:
            raise BenchError(f"the waiter exited during the window (exit {waiter.returncode})")

        gate.release_fifo(fifo)
        if procs.wait(holder, 60, "holder") != 0:
            raise BenchError(f"holder failed: {(gate.work / 'holder.err').read_text()[-500:]}")
        if procs.wait(waiter, 60, "waiter") != 0:
            raise BenchError(f"waiter failed: {waiter_err_path.read_text()[-500:]}")
    finally:
        holder_err.close()
        waiter_err.close()
    first, last = samples[0], samples[-1]
    return {
        "window": window,
        "samples": len(samples),
        "rss_max_kb": max(s["rss_kb"] for s in samples),
        "hwm_kb": last["hwm_kb"],
        "cpu_s": (last["cpu_ticks"] - first["cpu_ticks"]) / CLK_TCK,
        "vol": last["vol"] - first["vol"],
        "nonvol": last["nonvol"] - first["nonvol"],
        "threads": max(s["threads"] for s in samples),
        "states": "".join(sorted({s["state"] for s in samples})),
        "stderr": waiter_err_path.read_text().strip().splitlines(),
        "baseline": idle_rss(gate.env),
    }


def idle_rss(env: dict) -> list[tuple[str, int]]:
    """Context for the waiter's RSS: a python process that only imported X (kB)."""
    probe = "\ns = open('/proc/self/status').read(); print(s.split('VmRSS:')[1].split()[0])"
    rows = []
    for label, code in (
        ("`python -c pass`", "pass"),
        ("`python -c 'import click'`", "import click"),
        ("`python -c 'import buildgate.cli'`", "import buildgate.cli"),
        ("`python -c 'import buildgate.cli, buildgate.runner, buildgate._inotify'` + load the config",
         "import buildgate.cli, buildgate.runner, buildgate._inotify, buildgate.config\n"
         "buildgate.config.load_config()"),
    ):
        out = run([PY, "-c", code + probe], timeout=30, env=env)
        rows.append((label, int(out.stdout.split()[-1])))
    return rows


# --------------------------------------------------------------------------
# (c) handoff latency


def handoff_job(i: int, events: Path, fifo: Path | None) -> list[str]:
    """A build that logs ``start I T`` first and ``end I T`` last (bash's
    $EPOCHREALTIME: a timestamp without forking `date`); with ``fifo`` it waits
    for a go signal in between."""
    ev = shlex.quote(str(events))
    hold = f" read _ < {shlex.quote(str(fifo))};" if fifo else ""
    script = (f'printf "start {i} %s\\n" "$EPOCHREALTIME" >> {ev};{hold} sleep {HANDOFF_SLEEP}; '
              f'printf "end {i} %s\\n" "$EPOCHREALTIME" >> {ev}')
    return [BUILDGATE, "run", "--name", f"h{i}", "--", "bash", "-c", script]


def handoff_result(events: Path, builds: int) -> dict:
    start: dict[int, float] = {}
    end: dict[int, float] = {}
    for line in events.read_text().splitlines():
        kind, i, t = line.split()
        (start if kind == "start" else end)[int(i)] = float(t)
    if sorted(start) != list(range(builds)) or sorted(end) != list(range(builds)):
        raise BenchError(f"missing timestamps in {events}: {events.read_text()}")
    lat = [start[i + 1] - end[i] for i in range(builds - 1)]
    return {
        "lat": lat,
        "in_order": sorted(start, key=start.get) == list(range(builds)),
        "overlaps": sum(1 for x in lat if x < 0),
    }


def check_exit(proc: subprocess.Popen, procs: Procs, timeout: float, what: str, err: Path) -> None:
    rc = procs.wait(proc, timeout, what)
    if rc != 0:
        raise BenchError(f"{what} failed (exit {rc}): {err.read_text()[-500:]}")


def bench_handoff(gate: Gate, procs: Procs) -> dict:
    """HANDOFFS + 1 full-budget builds, all queued before the first one ends."""
    builds = HANDOFFS + 1
    log(f"(c) handoff latency: {builds} full-budget builds queued in order")
    events, fifo, err_path = gate.work / "handoff.log", gate.work / "handoff.fifo", gate.work / "handoff.err"
    os.mkfifo(fifo)
    started: list[subprocess.Popen] = []
    with open(err_path, "w") as err:
        for i in range(builds):
            # build 0 waits for the go signal, so that all others queue behind it
            started.append(procs.start(handoff_job(i, events, fifo if i == 0 else None), stderr=err, env=gate.env))
            gate.wait_queue(i + 1, running=1, watch=(started[-1], err_path))
        entries = gate.status()
        if [e["pid"] for e in entries] != [p.pid for p in started]:
            raise BenchError(f"not queued in start order: {[(e['seq'], e['pid']) for e in entries]}")
        gate.release_fifo(fifo)
        deadline = time.monotonic() + 120
        for i, p in enumerate(started):
            check_exit(p, procs, max(1.0, deadline - time.monotonic()), f"handoff build {i}", err_path)
    return handoff_result(events, builds)


def bench_handoff_single(gate: Gate, procs: Procs) -> dict:
    """The same handoff with one waiter at a time (context: what the queue depth costs).

    Build i waits for its own go signal; build i+1 is queued behind it, then i is
    let go.  While a handoff happens the bench only waits for build i's buildgate
    to exit, then watches the event log for build i+1's start.
    """
    builds = HANDOFFS + 1
    log(f"(c) context: {HANDOFFS} handoffs with one waiter at a time")
    events, err_path = gate.work / "single.log", gate.work / "single.err"
    fifos = [gate.work / f"single.{i}.fifo" for i in range(builds)]
    for f in fifos:
        os.mkfifo(f)
    with open(err_path, "w") as err:
        prev = procs.start(handoff_job(0, events, fifos[0]), stderr=err, env=gate.env)
        gate.wait_queue(1, running=1, watch=(prev, err_path))
        for i in range(1, builds):
            nxt = procs.start(handoff_job(i, events, fifos[i]), stderr=err, env=gate.env)
            entries = gate.wait_queue(2, running=1, watch=(nxt, err_path))
            if [e["pid"] for e in entries] != [prev.pid, nxt.pid]:
                raise BenchError(f"unexpected queue: {entries}")
            gate.release_fifo(fifos[i - 1])
            check_exit(prev, procs, 60, f"single-waiter build {i - 1}", err_path)
            deadline = time.monotonic() + 30
            while f"start {i} " not in events.read_text():
                if time.monotonic() > deadline:
                    raise BenchError(f"build {i} never started: {err_path.read_text()[-500:]}")
                time.sleep(0.01)
            prev = nxt
        gate.release_fifo(fifos[-1])
        check_exit(prev, procs, 60, f"single-waiter build {builds - 1}", err_path)
    return handoff_result(events, builds)


# --------------------------------------------------------------------------
# the environment


def cgroup_mode() -> str:
    fstype = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fstype[left.split()[4]] = right.split()[0]
    top = fstype.get("/sys/fs/cgroup")
    if top == "cgroup2":
        mode = "unified (cgroup v2 only)"
    elif fstype.get("/sys/fs/cgroup/unified") == "cgroup2":
        mode = "hybrid (v1 controllers, v2 at /sys/fs/cgroup/unified)"
    else:
        mode = "legacy (cgroup v1 only)"
    try:
        from buildgate.cgroup import detect_layout

        layout = detect_layout()
        mode += f"; buildgate reads memory from cgroup v{layout.version} ({layout.mount})"
    except Exception as exc:  # pragma: no cover - informative only
        mode += f"; detect_layout failed: {exc}"
    return mode


def environment(where: str) -> list[tuple[str, str]]:
    systemd = run(["systemctl", "--version"], timeout=15).stdout.splitlines()[0]
    try:
        cpus = f"{os.cpu_count()} online, {len(os.sched_getaffinity(0))} usable by the bench"
    except AttributeError:  # pragma: no cover
        cpus = str(os.cpu_count())
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    version = run([BUILDGATE, "--version"], timeout=30).stdout.strip()
    version += f" (source: {source_state()})"
    return [
        ("Date", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("Kernel", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("systemd", f"{systemd} — {where}"),
        ("cgroup mode", cgroup_mode()),
        ("CPUs", f"{cpus}" + (f" ({model})" if model else "")),
        ("Memory", mem),
        ("Python", f"{platform.python_implementation()} {platform.python_version()} ({PY})"),
        ("buildgate", version),
    ]


def source_state() -> str:
    """Which code was measured: the commit, and whether src/ had uncommitted changes."""
    try:
        head = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], timeout=15, check=False)
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], timeout=15, check=False)
    except (FileNotFoundError, BenchError):
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = len(dirty.stdout.splitlines())
    return f"commit {head.stdout.strip()}" + (f" + uncommitted changes to {changed} file(s) in src/" if changed else "")


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


# --------------------------------------------------------------------------
# the report


def report(env_rows, notes, load_before, load_after, total_s, a, b, c, c1) -> str:
    bg, sr = a["bg"], a["sr"]
    lat = c["lat"]
    p95 = percentile(lat, 95)
    rss_mb = b["rss_max_kb"] / 1024
    wakeups = b["vol"] + b["nonvol"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/bench.py`; do not edit by hand. Reproduce with:",
        "",
        "```",
        "sudo bench/run",
        "```",
        "",
        "All numbers come from one run, so ratios compare like with like. The machine is",
        "shared and noisy: expect a few percent of drift between runs, and single outliers",
        "in the tails (p90/p95/max). This is a report, not a test: a MISS is a finding.",
        "",
        "## Environment",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in env_rows],
        f"| Load average | {load_before} before, {load_after} after (1/5/15 min) |",
        f"| Bench run time | {total_s:.0f} s (without booting the sandbox) |",
        "",
        *notes,
        "## Summary",
        "",
        "| Measurement | Value | Target | Result |",
        "|---|---|---|---|",
        f"| (a) overhead: median `buildgate run -- true` / median `flock L systemd-run --scope ... true`, "
        f"each run after a {OVERHEAD_GAP * 1000:.0f} ms pause (back to back: see (a)) "
        f"| {a['ratio']:.2f}× ({ms(bg.median)} / {ms(sr.median)}) | ≤ {TARGET_RATIO:.0f}× | {verdict(a['ratio'] <= TARGET_RATIO)} |",
        f"| (b) RSS of a waiting buildgate (max over {b['window']:.0f} s) | {rss_mb:.1f} MiB "
        f"| ≤ {TARGET_RSS_MB:.0f} MiB | {verdict(rss_mb <= TARGET_RSS_MB)} |",
        f"| (b) wakeups (context switches) of a waiting buildgate in {b['window']:.0f} s | {wakeups} "
        f"| {TARGET_WAKEUPS} (no periodic wakeups) | {verdict(wakeups <= TARGET_WAKEUPS)} |",
        f"| (b) CPU used by a waiting buildgate in {b['window']:.0f} s | {b['cpu_s']:.2f} s | — | — |",
        f"| (c) handoff latency p95 over {len(lat)} handoffs | {ms(p95)} | ≤ {TARGET_P95_MS:.0f} ms "
        f"| {verdict(p95 * 1000 <= TARGET_P95_MS)} |",
        "",
        "## (a) Overhead of `buildgate run -- true`",
        "",
        f"{OVERHEAD_WARMUP} warm-ups each, then {OVERHEAD_N} runs each, alternating the commands, with a "
        f"{OVERHEAD_GAP * 1000:.0f} ms pause before every run (why: below). "
        "Wall time from the bench's fork to the command's exit (the bench's own `subprocess.run` "
        "cost is in both). Bench config: budget `\"1G\"`, slice `bgbench.slice`, its own `state_dir` "
        "and `legacy_lock`; `L` is a lock file in the bench's directory. Percentiles are nearest-rank.",
        "",
        "| Command | median | p90 | min | max |",
        "|---|---|---|---|---|",
    ]
    srp = a["srp"]
    for s in (bg, sr, srp):
        label = s.label if s is not srp else "flock L systemd-run --scope ... -p <buildgate's 10 scope properties> true"
        lines.append(f"| `{label}` | {ms(s.median)} | {ms(s.p90)} | {ms(min(s.times))} | {ms(max(s.times))} |")
    lines += [
        "",
        f"Ratio of medians: **{a['ratio']:.2f}×** (target ≤ {TARGET_RATIO:.0f}×); "
        f"buildgate costs {ms(bg.median - sr.median)} more per build. The third row (context, not the "
        f"target) is the same floor with the properties every buildgate scope carries (in its slice, "
        f"`{srp.label.split(' -p ', 1)[1].rsplit(' true', 1)[0].replace(' -p ', ', ')}`): "
        f"{srp.median / bg.median * 100:.0f}% of buildgate's time, a ratio of {bg.median / srp.median:.2f}× to it.",
        "",
        "Why the pause: systemd moves each scope's first process into the scope's cgroups, and every "
        "cgroup migration takes the kernel's `cgroup_threadgroup_rwsem` for writing. The first writer "
        "after a quiet spell waits for an RCU grace period in `rcu_sync_enter()`; writers within about "
        "a grace period of the last one do not. `perf record -e sched:sched_switch -g` on systemd shows "
        "that wait (10-20 ms here, HZ=250) in nearly every scope start after a 0.3 s pause, for "
        "`systemd-run` and for buildgate alike. Back to back, a command that starts its scope soon "
        "after the previous command's cgroup writes (the previous scope's teardown; on cgroup v1 a "
        "scope with CPUWeight= also makes systemd move other units' processes) can skip it: "
        "systemd-run, a small C program, reaches its scope a few ms after exec, a Python tool only "
        "after its interpreter has started. Builds on a real host are minutes apart and each pays "
        "the wait; the pause makes every run here start that way. The same commands back to back, "
        "for comparison:",
        "",
        "| Command, back to back | median | p90 |",
        "|---|---|---|",
        *[f"| `{t.label if t.label != srp.label else 'flock L systemd-run --scope ... -p <the 10> true'}` "
          f"| {ms(t.median)} | {ms(t.p90)} |" for t in a["tight"]],
        "",
        f"Back to back, the ratio is {a['tight'][0].median / a['tight'][1].median:.2f}× "
        f"({ms(a['tight'][0].median)} / {ms(a['tight'][1].median)}).",
        "",
        f"Where the time goes ({CONTEXT_N} interleaved runs each, after 2 warm-ups; `python` is the venv's):",
        "",
        "| Command | median | p90 |",
        "|---|---|---|",
    ]
    ctx = a["context"]
    for s in ctx.values():
        lines.append(f"| {s.label} | {ms(s.median)} | {ms(s.p90)} |")
    imp = a["imports"]
    imp_total = imp["total"] / 1e6
    py_pass = ctx["pass"].median
    # the context rows run back to back: compare them with the back-to-back runs
    tbg, tsr = a["tight"][0], a["tight"][1]
    rest = tbg.median - py_pass - imp_total
    lines += [
        "",
        f"Imports during one `buildgate run -- true`, as python reports them (`PYTHONPROFILEIMPORTTIME=1`, "
        f"median of {IMPORT_RUNS} runs; top-level imports only, each with everything it pulled in; "
        "includes imports done lazily inside functions; leaves out what `python -c pass` imports too; "
        "the profiler itself adds some overhead):",
        "",
        "| Import | cumulative |",
        "|---|---|",
        *[f"| `{name}` | {us / 1000:.1f} ms |" for name, us in imp["top"][:10]],
        f"| all {len(imp['top'])} top-level imports | {imp_total * 1000:.1f} ms |",
        "",
        f"So, roughly, of the {ms(tbg.median)} of `buildgate run -- true` back to back: {ms(py_pass)} is starting the "
        f"interpreter (`python -c pass`), {ms(imp_total)} is importing modules, and the remaining "
        f"{ms(rest)} is the work itself: reading the config (its parsed values from root's cache, "
        "docs/config.md, which the warm-ups filled) and the slice's limit (from its cgroup, no "
        "subprocess), the queue (lock files, records), connecting to systemd, forking the build and "
        "the keeper, creating the scope and waiting for its start job, the build (`true`), and asking "
        "systemd to stop the then empty scope (not waited for: the reservation is freed first), then "
        "leaving without the interpreter's teardown (`os._exit`). The "
        f"floor, `flock L systemd-run ...`, does the scope part in {ms(tsr.median)} back to back; starting "
        f"the Python interpreter alone takes {ms(py_pass)}, so a ratio of 3 there leaves a Python tool "
        f"{ms(3 * tsr.median - py_pass)} for its imports and its work. After a pause (the target row), "
        f"the kernel's grace period and a cold CPU add {ms(sr.median - tsr.median)} to the floor and "
        f"{ms(bg.median - tbg.median)} to buildgate.",
        "",
        "## (b) A waiting buildgate's cost",
        "",
        "A holder build (`buildgate run -- sh -c 'read _ < FIFO'`) runs with the whole budget; a waiter "
        "`buildgate run -- true` (stderr to a file, so non-TTY) queues behind it. Once `buildgate status "
        f"--json` lists both and the waiter has printed its status line, its `/proc/PID/status` and "
        f"`/proc/PID/stat` are sampled every {WAIT_SAMPLE_EVERY} s for {b['window']:.1f} s "
        f"({b['samples']} samples); context switches are summed over its threads ({b['threads']}).",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| VmRSS, max over the window | {rss_mb:.1f} MiB |",
        f"| VmHWM (peak RSS since it started) | {b['hwm_kb'] / 1024:.1f} MiB |",
        f"| CPU (utime + stime) in the window | {b['cpu_s']:.2f} s |",
        f"| voluntary + nonvoluntary context switches in the window | {b['vol']} + {b['nonvol']} = {wakeups} |",
        f"| process state(s) seen | {b['states']} |",
        "",
        "For comparison, the RSS of a python process that only imported:",
        "",
        "| | VmRSS |",
        "|---|---|",
        *[f"| {label} | {kb / 1024:.1f} MiB |" for label, kb in b["baseline"]],
        "",
        "What the waiter printed (non-TTY, so one line, repeated only when something changes "
        "or, by design, once a minute):",
        "",
        "```",
        *b["stderr"][:4],
        "```",
        "",
        "## (c) Handoff latency",
        "",
        f"{HANDOFFS + 1} full-budget builds, each `buildgate run -- bash -c '...'` that appends "
        "`start N $EPOCHREALTIME` as its first instruction and `end N $EPOCHREALTIME` as its last, "
        f"after `sleep {HANDOFF_SLEEP}`. They are started one after another, polling `buildgate status` "
        "until each is queued, so the queue order is the start order; build 0 waits for a go signal "
        "until all are queued. Latency = next build's start − previous build's end.",
        "",
        "| | min | median | p95 | max |",
        "|---|---|---|---|---|",
        f"| handoff latency | {ms(min(lat))} | {ms(statistics.median(lat))} | {ms(p95)} | {ms(max(lat))} |",
        "",
        f"Started in queue order: {'yes' if c['in_order'] else '**no**'}; overlapping builds: {c['overlaps']} "
        "(each needs the whole budget, so there must be none).",
        "",
        "All handoffs (ms): " + ", ".join(f"{x * 1000:.1f}" for x in lat),
        "",
        f"For context, the same handoff with **one waiter at a time** ({len(c1['lat'])} handoffs: build "
        "N+1 is queued behind build N, then N is let go; started in order: "
        f"{'yes' if c1['in_order'] else '**no**'}, overlaps: {c1['overlaps']}). The difference to the "
        "table above is what the other waiters in the queue cost the handoff (little: a waiter behind "
        "another wakes on every change in `q/` but rescans only when that one changes, see "
        "docs/queue.md):",
        "",
        "| | min | median | p95 | max |",
        "|---|---|---|---|---|",
        f"| {len(c['lat'])} waiters queued | {ms(min(lat))} | {ms(statistics.median(lat))} | {ms(p95)} | {ms(max(lat))} |",
        f"| one waiter | {ms(min(c1['lat']))} | {ms(statistics.median(c1['lat']))} "
        f"| {ms(percentile(c1['lat'], 95))} | {ms(max(c1['lat']))} |",
        "",
        "A handoff includes, in order: the previous build's shell exiting; its buildgate noticing "
        "(pidfd), reading the scope's counters, letting the keeper go and checking that the scope "
        "is empty; the ticket's release (its files deleted under the queue mutex; the StopUnit of "
        "the empty scope comes after it and is not waited for); the waiter waking up (inotify "
        "IN_DELETE on `q/`), rescanning the queue, taking the legacy lock, marking itself admitted "
        "(its inotify instance is closed later, off this path); importing pystemd (~2.7 MiB, so a "
        "waiter does not load it ahead: the RSS target of (b)) and "
        "connecting to systemd; forking the build's main process and the keeper, creating the "
        "transient scope (StartTransientUnit, waiting for its job); recording the cgroup; releasing "
        "the child, which execs `bash`, which takes the timestamp.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------


#: The incident replay's part of benchmarks.md: written by bench/replay.py (it
#: needs the e2e VM and ~40 min), kept as it is when this bench rewrites the rest.
REPLAY_BEGIN = "<!-- replay:begin (written by bench/replay.py; bench.py keeps it) -->"
REPLAY_END = "<!-- replay:end -->"


def kept_replay_section(path: Path) -> str:
    try:
        old = path.read_text()
    except FileNotFoundError:
        return ""
    start, end = old.find(REPLAY_BEGIN), old.find(REPLAY_END)
    if start < 0 or end < start:
        return ""
    return "\n" + old[start:end + len(REPLAY_END)] + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"report file (default {OUT})")
    args = parser.parse_args()

    if os.geteuid() != 0:
        log("must run as root: sudo bench/run")
        return 1
    if not os.path.isdir("/run/systemd/system"):
        log("no systemd as init here: run the bench with `sudo bench/run`")
        return 1
    if not os.access(BUILDGATE, os.X_OK):
        log(f"no buildgate at {BUILDGATE}: run with the venv's python")
        return 1
    where = {
        "sandbox": "PID 1 of private namespaces (tests/sandbox/systemd-ns), systemd is not PID 1 on this host",
        "host": "the host's PID 1",
    }.get(os.environ.get("BUILDGATE_BENCH_SYSTEMD", ""), "PID 1" if Path("/proc/1/comm").read_text().strip() == "systemd" else "?")

    # SIGTERM/SIGHUP unwind like ^C, so the finally below always runs.
    def on_signal(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="buildgate-bench."))
    t0 = time.monotonic()
    try:
        stop_slice()
        gate = Gate.create(work)
        env_rows = environment(where)
        notes = []
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            notes += [
                "Note: the caller's environment had `PYTHONDONTWRITEBYTECODE` set; the bench drops it "
                "and gives every python it starts a private bytecode cache (`PYTHONPYCACHEPREFIX`, "
                "filled by the warm-ups), as on an installed host where pip compiled the `.pyc` files. "
                "Without it, this editable install has no `.pyc` for buildgate's own modules and "
                "every `buildgate` command recompiles them.",
                "",
            ]
        load_before = loadavg()
        a = bench_overhead(gate)
        log(f"(a) median {ms(a['bg'].median)} vs {ms(a['sr'].median)}: {a['ratio']:.2f}x")
        b = bench_waiting(gate, procs)
        log(f"(b) rss {b['rss_max_kb'] / 1024:.1f} MiB, cpu {b['cpu_s']:.2f} s, ctxt {b['vol']}+{b['nonvol']}")
        c = bench_handoff(gate, procs)
        log(f"(c) handoff median {ms(statistics.median(c['lat']))}, p95 {ms(percentile(c['lat'], 95))}")
        c1 = bench_handoff_single(gate, procs)
        log(f"(c) one waiter: median {ms(statistics.median(c1['lat']))}, p95 {ms(percentile(c1['lat'], 95))}")
        load_after = loadavg()
        text = report(env_rows, notes, load_before, load_after, time.monotonic() - t0, a, b, c, c1)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        stop_slice()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = text.rstrip("\n") + "\n" + kept_replay_section(args.out)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    log(f"wrote {args.out} in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
