#!/usr/bin/env python3
"""The incident replay: two builds that do not fit, with no gate, `flock`, buildgate.

    sudo bench/replay [--repeats N] [--quick] [--arms none,flock,buildgate] [--no-mixed]

The seed incident, scaled down to the e2e guest (e2e/vm.py: Debian 12, systemd,
cgroup v2, 1536 MiB RAM, 2 vCPUs under TCG) with its 1 GiB /swapfile on and two
resident "services" (svc-db 300 MiB, svc-web 100 MiB, python processes walking
their memory every 2 s). Per arm and repeat, on a freshly booted guest:

1. boot, copy bench/replay_guest/ in, swap on, services up; for the buildgate
   arm `buildgate setup --budget BUDGET` (with the services running);
2. start two "builds" at once (bgbuild: grows to 560 MiB over ~40% of its work
   while computing, then keeps walking its heap), bare / under
   `flock /var/lock/vps-build.lock` / under `buildgate run --mem 600M`;
3. meanwhile probe the guest's ssh banner from the host once a second
   (127.0.0.1:PORT, qemu's forward; a probe = connect + read until `SSH-2.0`,
   at most --probe-timeout s);
4. the guest driver reports on the serial console when the builds are over (or
   killed at the deadline); no banner for --recover s after that = the host
   "needed a reset" (the VM is killed and the next arm boots a fresh one);
5. collect: build exit codes and times, global / cgroup OOM kills (dmesg),
   the services' unit state (Result=oom-kill) and their slowest pass;
6. flock and buildgate arms then run the mixed queue in the same guest (2 large
   + 4 small builds, submitted in the order L S S L S S): buildgate with
   per-build reservations vs `flock` serialization.

Writes docs/replay.md, docs/replay.png and docs/replay.json. Everything is
bounded; a VM is always shut down (`vm.py down --kill`). The state dir is
$BGVM_STATE (default here /var/lib/buildgate-e2e-replay).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = ROOT / "bench" / "replay_guest"
VM = ROOT / "e2e" / "vm.py"
os.environ.setdefault("BGVM_STATE", "/var/lib/buildgate-e2e-replay")
STATE = Path(os.environ["BGVM_STATE"])
CACHE = Path(os.environ.get("BGVM_CACHE", "/var/cache/buildgate-e2e"))
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "bench"))
from bench import REPLAY_BEGIN, REPLAY_END  # noqa: E402  (one definition of the markers)

WORK = STATE / "replay"

ARMS = ("none", "flock", "buildgate")
ARM_LABEL = {"none": "no gate", "flock": "flock", "buildgate": "buildgate"}
COLORS = {"none": "#d62728", "flock": "#1f77b4", "buildgate": "#2ca02c"}


def log(msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} replay: {msg}"
    print(line, file=sys.stderr, flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "replay.log", "a") as fh:
        fh.write(line + "\n")


class ArmError(Exception):
    pass


# --------------------------------------------------------------------------
# the VM, through e2e/vm.py's CLI


def vm(*args: str, timeout: float = 600) -> int:
    cmd = [sys.executable, str(VM), *args]
    with open(WORK / "vm-cli.log", "a") as out:
        out.write(f"\n### {time.strftime('%H:%M:%S')} {shlex.join(args)}\n")
        out.flush()
        try:
            return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def vm_rec() -> dict:
    return json.loads((STATE / "vm.json").read_text())


def ssh_cmd(rec: dict, timeout_connect: int = 15) -> list[str]:
    key = CACHE / rec["base"] / "id_ed25519"
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(rec["port"]),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", f"ConnectTimeout={timeout_connect}",
            "-o", "LogLevel=ERROR", "root@127.0.0.1"]


def ssh(rec: dict, command: str, timeout: float, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """command in the guest, bounded here and (timeout -k) there."""
    remote = f"timeout -k 5 {int(timeout)} bash -c {shlex.quote(command)}"
    try:
        return subprocess.run(ssh_cmd(rec) + [remote], input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=timeout + 20)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 124, b"", b"timed out (host side)")


def ssh_json(rec: dict, command: str, timeout: float) -> dict:
    r = ssh(rec, command, timeout)
    out = r.stdout.decode(errors="replace").strip().splitlines()
    if r.returncode != 0 or not out:
        raise ArmError(f"`{command}` exit {r.returncode}: {r.stderr.decode(errors='replace').strip()[-300:]}")
    return json.loads(out[-1])


def banner(port: int, timeout: float) -> tuple[float | None, str]:
    """Seconds until sshd's `SSH-2.0` banner, or (None, why)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = b""
            while b"SSH-2.0" not in data:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, "timeout"
                s.settimeout(left)
                chunk = s.recv(256)
                if not chunk:
                    return None, "closed"
                data += chunk
            return time.monotonic() - t0, "ok"
    except socket.timeout:
        return None, "timeout"
    except OSError as exc:
        return None, type(exc).__name__


class Prober:
    """One banner probe a second, each in its own thread (a slow probe does
    not delay the next), each bounded by timeout."""

    def __init__(self, port: int, timeout: float, t_ref: float):
        self.port, self.timeout, self.t_ref = port, timeout, t_ref
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.ticker = threading.Thread(target=self._tick, daemon=True)

    def start(self) -> None:
        self.ticker.start()

    def _one(self) -> None:
        t = time.monotonic()
        lat, why = banner(self.port, self.timeout)
        with self.lock:
            self.results.append({"t": round(t - self.t_ref, 2), "lat": None if lat is None else round(lat, 4),
                                 "why": why})

    def _tick(self) -> None:
        nxt = time.monotonic()
        while not self.stop.is_set():
            th = threading.Thread(target=self._one, daemon=True)
            th.start()
            self.threads.append(th)
            nxt += 1.0
            self.stop.wait(max(0.0, nxt - time.monotonic()))

    def finish(self) -> list[dict]:
        self.stop.set()
        self.ticker.join()
        for th in self.threads:
            th.join(self.timeout + 5)
        return sorted(self.results, key=lambda r: r["t"])


def serial_has(marker: str) -> bool:
    try:
        with open(STATE / "serial.log", "rb") as fh:
            return marker.encode() in fh.read()
    except OSError:
        return False


def serial_oom_lines() -> list[str]:
    try:
        txt = (STATE / "serial.log").read_text(errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in txt.splitlines() if "oom-kill:constraint" in ln or "Killed process" in ln]


# --------------------------------------------------------------------------
# one arm


def guest_payload() -> bytes:
    bgbuild = WORK / "bgbuild"
    if not bgbuild.exists() or bgbuild.stat().st_mtime < (GUEST_DIR / "bgbuild.c").stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-static", "-o", str(bgbuild), str(GUEST_DIR / "bgbuild.c")],
                       check=True, timeout=120)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(bgbuild, "bgbuild")
        for name in ("svc.py", "driver.py"):
            tar.add(GUEST_DIR / name, name)
    return buf.getvalue()


def boot() -> dict:
    for attempt in (1, 2):
        vm("down", "--kill", timeout=120)
        t = time.monotonic()
        rc = vm("up", timeout=600)
        if rc == 0:
            rec = vm_rec()
            rec["boot_s"] = round(time.monotonic() - t, 1)
            return rec
        log(f"boot attempt {attempt} failed (exit {rc}); see {WORK}/vm-cli.log")
    raise ArmError("the VM did not boot")


def wait_done(tag: str, bound: float) -> bool:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if serial_has(f"REPLAY-DONE {tag}"):
            return True
        time.sleep(0.5)
    return False


def wait_banner(port: int, bound: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        lat, _ = banner(port, min(20.0, bound))
        if lat is not None:
            return time.monotonic() - t0
        time.sleep(1)
    return None


def build_spec(cfg, which: str) -> list[dict]:
    L = {"mib": cfg.large_mib, "units": cfg.large_units, "mem": cfg.large_mem}
    S = {"mib": cfg.small_mib, "units": cfg.small_units, "mem": cfg.small_mem}
    if which == "replay":
        R = {"mib": cfg.replay_mib, "units": cfg.replay_units, "mem": cfg.replay_mem}
        return [dict(R, name="app1", delay=0), dict(R, name="app2", delay=0)]
    order = [("L1", L), ("S1", S), ("S2", S), ("L2", L), ("S3", S), ("S4", S)]
    return [dict(b, name=n, delay=round(i * 0.5, 1)) for i, (n, b) in enumerate(order)]


def run_builds(rec: dict, cfg, arm: str, tag: str, builds: list[dict], deadline_s: float,
               probe: bool) -> dict:
    spec = {"tag": tag, "arm": arm, "builds": builds, "deadline_s": deadline_s}
    r = ssh(rec, f"cat > /root/replay/spec-{tag}.json", 60, stdin=json.dumps(spec).encode())
    if r.returncode != 0:
        raise ArmError(f"could not write the spec: {r.stderr.decode(errors='replace')[-200:]}")
    t_ref = time.monotonic() + cfg.pre_probe
    prober = Prober(rec["port"], cfg.probe_timeout, t_ref) if probe else None
    if prober:
        prober.start()
        time.sleep(cfg.pre_probe)
    r = ssh(rec, f"python3 /root/replay/driver.py start /root/replay/spec-{tag}.json", 60)
    t_started = time.monotonic()
    if r.returncode != 0:
        if prober:
            prober.finish()
        raise ArmError(f"driver start failed: {r.stdout.decode()} {r.stderr.decode()}")
    done = wait_done(tag, deadline_s + cfg.grace)
    t_done = time.monotonic()
    out = {"tag": tag, "arm": arm, "done": done, "host_wait_s": round(t_done - t_started, 1)}
    recovered_s = None
    if not done:
        log(f"{tag}: no REPLAY-DONE within {deadline_s + cfg.grace:.0f}s: is the guest alive?")
        recovered_s = wait_banner(rec["port"], cfg.recover)
        out["done"] = done = wait_done(tag, 1)
    if prober:
        time.sleep(cfg.post_probe)
        out["probes"] = prober.finish()
        out["probe_window"] = [0.0, round(t_done - t_ref, 2)]
    out["reset_needed"] = False
    if not done and recovered_s is None:
        out["reset_needed"] = True
        out["serial_oom"] = serial_oom_lines()[-20:]
        log(f"{tag}: no ssh banner for {cfg.recover:.0f}s after the deadline: the guest needs a reset")
        return out
    try:
        out["guest"] = ssh_json(rec, f"python3 /root/replay/driver.py collect {tag}", 180)
    except (ArmError, ValueError) as exc:
        out["collect_error"] = str(exc)
        out["serial_oom"] = serial_oom_lines()[-20:]
    return out


def run_arm(cfg, arm: str, rep: int) -> dict:
    res: dict = {"arm": arm, "rep": rep, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "scenario": cfg.scenario,
                 "replay_spec": {"mib": cfg.replay_mib, "mem": cfg.replay_mem, "units": cfg.replay_units}}
    t0 = time.monotonic()
    rec = boot()
    res["boot_s"] = rec["boot_s"]
    res["host_load_at_start"] = os.getloadavg()
    res["other_qemu"] = other_qemus(rec["pid"])
    try:
        r = ssh(rec, "mkdir -p /root/replay && tar -x -C /root/replay", 60, stdin=guest_payload())
        if r.returncode != 0:
            raise ArmError(f"copying the payload: {r.stderr.decode(errors='replace')[-200:]}")
        res["prep"] = ssh_json(rec, f"python3 /root/replay/driver.py prep {arm} {cfg.services} {cfg.budget}",
                               400)
        log(f"{arm}#{rep}: prepared: {res['prep'].get('mem')} load {res['prep'].get('load')}")
        res["replay"] = run_builds(rec, cfg, arm, f"{arm}{rep}r", build_spec(cfg, "replay"),
                                   cfg.deadline, probe=True)
        log(f"{arm}#{rep}: replay: " + summary_line(res["replay"]))
        if cfg.mixed and arm in ("flock", "buildgate") and not res["replay"]["reset_needed"]:
            res["mixed"] = run_builds(rec, cfg, arm, f"{arm}{rep}m", build_spec(cfg, "mixed"),
                                      cfg.mixed_deadline, probe=False)
            m = (res["mixed"].get("guest") or {}).get("result") or {}
            log(f"{arm}#{rep}: mixed queue makespan {m.get('makespan')}s")
    except ArmError as exc:
        res["error"] = str(exc)
        log(f"{arm}#{rep}: ERROR {exc}")
    finally:
        vm("down", "--kill", timeout=120)
    res["arm_s"] = round(time.monotonic() - t0, 1)
    return res


def other_qemus(mine: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != mine:
            try:
                if open(f"/proc/{d}/comm").read().strip().startswith("qemu-system"):
                    out.append(int(d))
            except OSError:
                pass
    return out


# --------------------------------------------------------------------------
# statistics


def pct(values: list[float], p: float) -> float:
    data = sorted(values)
    k = max(1, math.ceil(p / 100 * len(data)))
    return data[k - 1]


def probe_stats(rep: dict, timeout: float) -> dict:
    probes = [p for p in rep.get("probes", []) if p["t"] >= 0]
    if not probes:
        return {}
    lat = [p["lat"] if p["lat"] is not None else timeout for p in probes]
    failed = sum(1 for p in probes if p["lat"] is None)
    return {"n": len(probes), "failed": failed, "min": min(lat), "median": statistics.median(lat),
            "p99": pct(lat, 99), "max": max(lat), "censored": failed > 0}


def replay_facts(rep: dict, timeout: float) -> dict:
    g = rep.get("guest") or {}
    result = g.get("result") or {}
    builds = result.get("builds", [])
    kills = g.get("oom_kills", [])
    serial = rep.get("serial_oom", [])
    svc = g.get("services", {})
    svc_killed = sorted(n for n, s in svc.items()
                        if s.get("Result") == "oom-kill" or s.get("ActiveState") != "active")
    svc_killed += sorted({k["task"] for k in kills if "svc-" in k.get("memcg", "")} - set(svc_killed))
    if rep.get("reset_needed"):
        svc_killed_s = "unknown (no ssh)" if not any("python3" in ln for ln in serial) else "maybe (serial log)"
    else:
        svc_killed_s = ", ".join(svc_killed) if svc_killed else "no"
    worst_svc = max((s.get("status", {}).get("worst_s", 0) for s in svc.values()), default=None)
    idle = [p["lat"] for p in rep.get("probes", []) if p["t"] < 0 and p["lat"] is not None]
    return {
        **probe_stats(rep, timeout),
        "idle_median": statistics.median(idle) if idle else None,
        "makespan": result.get("makespan"),
        "builds_ok": sum(1 for b in builds if b.get("rc") == 0),
        "builds_n": len(builds),
        "killed_at_deadline": result.get("killed_at_deadline", []),
        "global_oom": sum(1 for k in kills if k["constraint"] != "CONSTRAINT_MEMCG"),
        "cap_oom": sum(1 for k in kills if k["constraint"] == "CONSTRAINT_MEMCG"),
        "oom_victims": [k["task"] for k in kills],
        "svc_killed": svc_killed_s,
        "svc_worst_pass_s": worst_svc,
        "reset": bool(rep.get("reset_needed")),
        "swap_peak": max((s["swap_used"] for s in result.get("samples", [])), default=None),
        "psi_full_peak": max((s["psi_full"] or 0 for s in result.get("samples", [])), default=None),
    }


def summary_line(rep: dict) -> str:
    f = replay_facts(rep, 20.0)
    return (f"probes {f.get('n')} failed {f.get('failed')} median {f.get('median', 0):.2f}s "
            f"max {f.get('max', 0):.1f}s makespan {f.get('makespan')} builds ok {f['builds_ok']}/{f['builds_n']} "
            f"global oom {f['global_oom']} cap oom {f['cap_oom']} svc killed {f['svc_killed']} "
            f"reset {f['reset']} swap peak {f['swap_peak']}M")


def mixed_facts(rep: dict, budget_mib: float, ncpu: int) -> dict:
    result = ((rep.get("guest") or {}).get("result")) or {}
    builds = result.get("builds", [])
    return {"makespan": result.get("makespan"),
            "ok": sum(1 for b in builds if b.get("rc") == 0), "n": len(builds),
            "builds": [{k: b.get(k) for k in ("name", "mib", "mem", "submitted", "ran_from", "end", "run_s", "rc")}
                       for b in builds]}


def parse_mib(size: str) -> float:
    units = {"K": 1 / 1024, "M": 1, "G": 1024}
    return float(size[:-1]) * units[size[-1].upper()] if size[-1].isalpha() else float(size) / (1 << 20)


# --------------------------------------------------------------------------
# report


def fmt(x, nd=2, suffix="") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}{suffix}"
    return f"{x}{suffix}"


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary_table(w, runs: list[dict], arms, T: float) -> None:
    facts = {a: [replay_facts(r["replay"], T) for r in runs if r["arm"] == a and "replay" in r] for a in arms}
    w("| arm | banner before the builds | banner min | median | p99 | max | probes failed | makespan of the two builds | builds ok | "
      "service OOM-killed | global OOM kills | slowest service pass | swap used peak | reset needed |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for a in arms:
        fs = facts[a]
        if not fs:
            continue
        n = len(fs)
        failed = [f.get("failed") for f in fs]
        makes = [f["makespan"] for f in fs]
        cens = any(f.get("censored") for f in fs)
        ge = "≥" if cens else ""
        stopped = any(f["killed_at_deadline"] for f in fs)
        mk = (f"≥ {fmt(med(makes), 0, ' s')} (stopped at the deadline)" if stopped else fmt(med(makes), 0, ' s'))
        w(f"| **{ARM_LABEL[a]}** | {fmt(med([f.get('idle_median') for f in fs]), 3)} | {fmt(med([f.get('min') for f in fs]), 3)} | {fmt(med([f.get('median') for f in fs]), 3)} "
          f"| {ge}{fmt(med([f.get('p99') for f in fs]), 1)} | {ge}{fmt(med([f.get('max') for f in fs]), 1)} "
          f"| {fmt(med(failed), 0 if all(isinstance(x, int) for x in failed if x is not None) else 1)} "
          f"(of {fmt(med([f.get('n') for f in fs]), 0)}) | {mk} "
          f"| {sum(f['builds_ok'] for f in fs)}/{sum(f['builds_n'] for f in fs)} "
          f"| {sum(1 for f in fs if f['svc_killed'] not in ('no',))}/{n} runs "
          f"| {fmt(med([f['global_oom'] for f in fs]), 0)} | {fmt(med([f['svc_worst_pass_s'] for f in fs]), 1, ' s')} "
          f"| {fmt(med([f['swap_peak'] for f in fs]), 0, ' MiB')} | {sum(1 for f in fs if f['reset'])}/{n} runs |")


def repeat_table(w, runs: list[dict], T: float) -> None:
    w("| arm | # | probes (failed) | banner median / max | makespan | builds rc | OOM kills (victims) | "
      "services | slowest service pass | swap peak | PSI full peak | reset | other qemu on host | boot |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if "replay" not in r:
            w(f"| {ARM_LABEL[r['arm']]} | {r['rep']} | error: {r.get('error', '?')} ||||||||||||")
            continue
        f = replay_facts(r["replay"], T)
        rcs = ",".join(str(b.get("rc")) for b in ((r["replay"].get("guest") or {}).get("result") or {}).get("builds", []))
        kills = f"{f['global_oom']} global, {f['cap_oom']} cap"
        if f["oom_victims"]:
            kills += f" ({', '.join(f['oom_victims'])})"
        w(f"| {ARM_LABEL[r['arm']]} | {r['rep']} | {f.get('n')} ({f.get('failed')}) "
          f"| {fmt(f.get('median'), 3)} / {fmt(f.get('max'), 1)} | {fmt(f['makespan'], 0, ' s')} "
          f"| {rcs or '–'}{' (killed at deadline)' if f['killed_at_deadline'] else ''} | {kills} | {f['svc_killed']} "
          f"| {fmt(f['svc_worst_pass_s'], 1, ' s')} | {fmt(f['swap_peak'], 0, ' MiB')} | {fmt(f['psi_full_peak'], 0, '%')} "
          f"| {'YES' if f['reset'] else 'no'} | {len(r.get('other_qemu', []))} | {fmt(r.get('boot_s'), 0, ' s')} |")
    w("")


def reading(w, runs: list[dict], T: float) -> None:
    """What the table says, in words computed from the same data."""
    f = {a: [replay_facts(r["replay"], T) for r in runs if r["arm"] == a and "replay" in r] for a in ARMS}
    if not all(f.values()):
        return
    none, fl, bg = f["none"], f["flock"], f["buildgate"]
    failed = sum(x.get("failed") or 0 for x in none)
    stopped = sum(1 for x in none if x["killed_at_deadline"])
    svc_none = med([x["svc_worst_pass_s"] for x in none])
    svc_gated = max(x["svc_worst_pass_s"] or 0 for x in fl + bg)
    w("What this shows:")
    w("")
    w(f"* **No gate**: the two builds pushed {fmt(med([x['swap_peak'] for x in none]), 0)} MiB (median peak) into "
      f"swap and then made almost no progress: {sum(x['builds_ok'] for x in none)} of "
      f"{sum(x['builds_n'] for x in none)} finished, in {stopped} of {len(none)} runs both were still running "
      f"at the deadline while flock finished both in ~{fmt(med([x['makespan'] for x in fl]), 0)} s. "
      f"The services stalled: their slowest pass over their memory took {fmt(svc_none, 1)} s (median of runs) "
      f"against at most {fmt(svc_gated, 1)} s in the gated arms. "
      + ("sshd, though, kept answering: no probe failed, the worst banner took "
         f"{fmt(max(x['max'] for x in none), 1)} s. The incident's lost ssh did not reproduce at this scale "
         "(see the caveat on emulated swap below)."
         if failed == 0 else
         f"{failed} banner probes got no answer within {T:.0f} s."))
    w(f"* **flock and buildgate** both ran the builds one after the other: no swap, no stall "
      f"(banner max {fmt(med([x['max'] for x in fl]), 1)} s and {fmt(med([x['max'] for x in bg]), 1)} s, "
      f"idle baseline ~{fmt(med([x.get('idle_median') for x in fl + bg]), 2)} s under TCG). Their makespans "
      f"({fmt(med([x['makespan'] for x in fl]), 0)} s and {fmt(med([x['makespan'] for x in bg]), 0)} s) are the "
      "same schedule; the difference is noise: one build's run time varies by ±30% between runs here with the "
      "load on the 2 host CPUs (another VM shared them during most arms), and buildgate adds its own start-up "
      "(~2-3 s per build under TCG).")
    w("")


def reading_over(w, runs: list[dict], T: float) -> None:
    f = {a: [replay_facts(r["replay"], T) for r in runs if r["arm"] == a and "replay" in r] for a in ARMS}
    if not all(f.values()):
        return
    w("What this shows:")
    w("")
    fl, bg = f["flock"], f["buildgate"]
    if (not any(x["builds_ok"] for x in fl) and all((x["swap_peak"] or 0) < 16 for x in bg)
            and all(x["cap_oom"] for x in bg) and not any(x["global_oom"] or x["reset"] for x in bg)):
        w(f"*Here `flock` does not help: one such build alone is more than the host can spare, so it swaps the host "
          f"(swap peak {fmt(med([x['swap_peak'] for x in fl]), 0, ' MiB')}, services' slowest pass "
          f"{fmt(med([x['svc_worst_pass_s'] for x in fl]), 1, ' s')}) and makes no progress, exactly as without a gate. "
          f"buildgate's cap kills each build in its own cgroup ({sum(x['cap_oom'] for x in bg)} kills by a build's cap, "
          f"exit 137 with the message), the host never swaps ({fmt(med([x['swap_peak'] for x in bg]), 0, ' MiB')}) and "
          f"sshd answers within {fmt(max(x['max'] for x in bg), 1, ' s')} throughout: the deploy fails loudly, the host is "
          "untouched.*")
        w("")
    for a in ARMS:
        fs = f[a]
        ok = sum(x["builds_ok"] for x in fs)
        n = sum(x["builds_n"] for x in fs)
        stopped = sum(1 for x in fs if x["killed_at_deadline"])
        failed = sum(x.get("failed") or 0 for x in fs)
        rcs = sorted({b.get("rc") for r in runs if r["arm"] == a and "replay" in r
                      for b in (((r["replay"].get("guest") or {}).get("result")) or {}).get("builds", [])},
                     key=str)
        text = (f"* **{ARM_LABEL[a]}**: {ok} of {n} builds finished (exit codes {', '.join(map(str, rcs))}); "
                f"stopped at the deadline in {stopped} of {len(fs)} runs; makespan median "
                f"{fmt(med([x['makespan'] for x in fs]), 0, ' s')}; swap peak {fmt(med([x['swap_peak'] for x in fs]), 0, ' MiB')}; "
                f"services' slowest pass {fmt(med([x['svc_worst_pass_s'] for x in fs]), 1, ' s')}; "
                f"banner max {fmt(med([x['max'] for x in fs]), 1, ' s')}, {failed} probes failed; "
                f"OOM kills: {sum(x['global_oom'] for x in fs)} global, {sum(x['cap_oom'] for x in fs)} by a build's own cap; "
                f"reset needed in {sum(1 for x in fs if x['reset'])}.")
        w(text)
    w("")


def write_report(cfg, runs: list[dict], meta: dict) -> None:
    config = {k: v for k, v in vars(cfg).items() if k not in ("honest", "report_from")}
    data = {"meta": meta, "config": config, "runs": runs}
    (DOCS / "replay.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    over = [r for r in runs if r.get("scenario") == "oversized"]
    runs = [r for r in runs if r.get("scenario", "together") == "together"]
    chart_ok = draw_chart(cfg, runs)
    over_chart = draw_chart(cfg, over, "replay-oversized.png",
                            "Oversized builds (each more than the host can spare), probed once a second") if over else False
    T = cfg.probe_timeout

    lines = []
    w = lines.append
    w("# Incident replay: two builds that do not fit")
    w("")
    w(f"Generated by `sudo bench/replay` (bench/replay.py) on {meta['date']}; "
      f"{meta['repeats']} repeat(s) per arm, arms interleaved; whole run {meta['run_min']:.0f} min. "
      "Do not edit by hand: rerun it.")
    w("")
    w("```sh")
    w("sudo e2e/vm.py build && sudo e2e/vm.py install      # the guest image and this checkout (cached)")
    w("sudo bench/replay                                    # 3 arms x 3 repeats + mixed queue, ~35-40 min")
    w("sudo bench/replay --scenario oversized --replay-mib 1200 --no-mixed --no-report --repeats 2")
    w("sudo bench/replay --report-from RAW.json [RAW2.json]  # rewrite this page from raw results")
    w("```")
    w("")
    w("## The setup")
    w("")
    w(f"The seed incident (two ~2.5 GB builds in the same minute on a 7.6 GB VPS with its apps resident: "
      f"swap storm, sshd cannot answer, hard reboot), scaled down to the e2e guest (`e2e/vm.py`): "
      f"Debian 12, systemd 252, cgroup v2, **{meta.get('guest_mem', '?')} MiB RAM, 1 GiB swap on**, 2 vCPUs "
      f"emulated by TCG (roughly 15x slower than the host), on a host with {meta['host_cpus']} CPUs.")
    w("")
    svc = ", ".join(f"{n} {m} MiB" for n, m in (i.split(":") for i in cfg.services.split(",")))
    w(f"* **Services**: {svc} — python processes in their own units (`svc-*.service`) that write to "
      "every page of their memory every 2 s (a database walking its cache); the slowest such pass is "
      "reported. A service counts as OOM-killed when its unit ended (`Result=oom-kill`).")
    w(f"* **Builds**: `bgbuild` ([bench/replay_guest/bgbuild.c](../bench/replay_guest/bgbuild.c)) grows its heap "
      f"to {cfg.replay_mib} MiB in 4 MiB steps over the first 40% of its work while computing, then keeps "
      f"computing and writing to random pages of the heap ({cfg.replay_units} work units, ~"
      f"{meta.get('iso_large_s', '?')} s alone in the guest). Two start at the same moment: together with the "
      f"services they want about {2 * cfg.replay_mib + sum(int(i.split(':')[1]) for i in cfg.services.split(','))} "
      f"MiB of a {meta.get('guest_mem', '?')} MiB guest.")
    w("* **Arms**, each on a freshly booted guest:")
    w("  * **no gate**: both builds start at once, as in the incident;")
    w("  * **flock**: each under `flock /var/lock/vps-build.lock` (the classic fix; no cap, no sshd protection);")
    w(f"  * **buildgate**: `buildgate setup --budget {cfg.budget}` (with the services running; a budget "
      "the automatic sizing would not pick here, see below), then each build under "
      f"`buildgate run --mem {cfg.replay_mem}`.")
    w(f"* **Probe**: from the host, once a second, connect to the guest's forwarded ssh port and read until "
      f"`SSH-2.0` (bounded: {T:.0f} s; a probe that gets no banner in time counts as failed and as {T:.0f} s in "
      "the latency figures, which are therefore lower bounds where probes failed). Window: from the builds' "
      "start to the driver's report that they are over.")
    w(f"* **Bounds**: the builds are stopped at {cfg.deadline:.0f} s; if the guest then shows no ssh banner "
      f"for {cfg.recover:.0f} s more, it **needed a reset** (the VM is killed, the next arm boots a fresh one).")
    w("")
    w("## Results")
    w("")
    w("Medians over the repeats (per-repeat values below). Latencies in seconds.")
    w("")
    summary_table(w, runs, cfg.arms, T)
    w("")
    if chart_ok:
        w("![ssh banner latency and swap during the replay](replay.png)")
        w("")
        w("*Top: every banner probe of every repeat (x: seconds since the builds started; a cross at the top: "
          "no banner within the bound). Bottom: swap in use in the guest.*")
        w("")
    reading(w, runs, T)
    w("Per repeat:")
    w("")
    repeat_table(w, runs, T)
    # mixed queue
    mixed = {a: [mixed_facts(r["mixed"], parse_mib(cfg.budget), 2) for r in runs if r["arm"] == a and "mixed" in r]
             for a in ("flock", "buildgate")}
    if mixed["flock"] and mixed["buildgate"]:
        w("## Mixed queue: reservations vs serialization")
        w("")
        w(f"In the flock and buildgate guests, after the replay: 2 large builds ({cfg.large_mib} MiB, "
          f"`--mem {cfg.large_mem}`) and 4 small ones ({cfg.small_mib} MiB, {cfg.small_units} units, "
          f"`--mem {cfg.small_mem}`), submitted 0.5 s apart in the order L1 S1 S2 L2 S3 S4, budget "
          f"{cfg.budget}. flock runs them one at a time; buildgate admits them in strict FIFO order whenever "
          "the head's reservation fits next to the running ones.")
        w("")
        rows = []
        for fm, bm in zip(mixed["flock"], mixed["buildgate"]):
            runs_f = {b["name"]: b.get("run_s") for b in fm["builds"]}
            area = sum(parse_mib(b["mem"]) * (runs_f.get(b["name"]) or 0) for b in fm["builds"]) / parse_mib(cfg.budget)
            longest = max((v or 0) for v in runs_f.values())
            cpu_lb = sum((v or 0) for v in runs_f.values()) / 2
            lb = max(area, longest)
            rows.append({"flock": fm["makespan"], "bg": bm["makespan"], "area": area, "longest": longest,
                         "lb": lb, "cpu_lb": cpu_lb, "ok": f"{fm['ok']}/{fm['n']}, {bm['ok']}/{bm['n']}"})
        w("| # | flock makespan | buildgate makespan | ratio flock/buildgate | area lower bound | "
          "longest build | CPU lower bound (2 vCPUs) | buildgate / max(area, longest) | builds ok (flock, buildgate) |")
        w("|---|---|---|---|---|---|---|---|---|")
        for i, x in enumerate(rows):
            ratio = x["flock"] / x["bg"] if x["flock"] and x["bg"] else None
            eff = x["bg"] / x["lb"] if x["bg"] and x["lb"] else None
            w(f"| {i + 1} | {fmt(x['flock'], 0, ' s')} | {fmt(x['bg'], 0, ' s')} | {fmt(ratio, 2)} | "
              f"{fmt(x['area'], 0, ' s')} | {fmt(x['longest'], 0, ' s')} | {fmt(x['cpu_lb'], 0, ' s')} | {fmt(eff, 2)} | {x['ok']} |")
        ratios = [x["flock"] / x["bg"] for x in rows if x["flock"] and x["bg"]]
        w(f"| **median** | {fmt(med([x['flock'] for x in rows]), 0, ' s')} | {fmt(med([x['bg'] for x in rows]), 0, ' s')} "
          f"| **{fmt(med(ratios), 2)}** | {fmt(med([x['area'] for x in rows]), 0, ' s')} | "
          f"{fmt(med([x['longest'] for x in rows]), 0, ' s')} | {fmt(med([x['cpu_lb'] for x in rows]), 0, ' s')} | | |")
        w("")
        w("Area lower bound = Σ(reservation × the build's own run time under flock, i.e. alone) / budget: no "
          "schedule that respects the reservations can finish earlier, nor earlier than the longest build. The "
          "builds are single-threaded and CPU-bound, so with 2 vCPUs Σ run time / 2 bounds any schedule too; "
          "builds that overlap share the vCPUs (and the emulating host's CPUs), so each runs slower than alone.")
        w("")
    if over:
        o = over[0].get("replay_spec", {})
        w("## Oversized builds: each wants more than the host can spare")
        w("")
        w(f"The same three arms, but each build grows to {o.get('mib', '?')} MiB: more than the "
          f"~{meta.get('guest MemAvailable with the services up, before the builds (MiB)', '?')} MiB the guest has "
          f"available with its services up, and two of them more than RAM + swap. buildgate still reserves "
          f"`--mem {o.get('mem', '?')}` (what fits in the budget): its cap is then below what the build wants. "
          "No mixed queue here.")
        w("")
        table_and_chart(w, over, cfg.arms, T, over_chart, OVER_PNG)
        reading_over(w, over, T)
        w("Per repeat:")
        w("")
        repeat_table(w, over, T)
        w("")
    w("## Where buildgate does not help")
    w("")
    for line in honest(over):
        w(line)
    w("")
    w("## Conditions of this run")
    w("")
    for k, v in meta.items():
        w(f"* {k}: {v}")
    w("")
    (DOCS / "replay.md").write_text("\n".join(lines))
    write_benchmarks_section(cfg, runs, over, meta, chart_ok, over_chart, mixed)


MAIN_PNG = ("replay.png", "ssh banner latency and swap during the replay")
OVER_PNG = ("replay-oversized.png", "ssh banner latency and swap with oversized builds")


def table_and_chart(w, runs: list[dict], arms, T: float, chart: bool, png: tuple[str, str]) -> None:
    summary_table(w, runs, arms, T)
    w("")
    if chart:
        w(f"![{png[1]}]({png[0]})")
        w("")


def write_benchmarks_section(cfg, runs, over, meta, chart_ok, over_chart, mixed) -> None:
    """The replay's summary in docs/benchmarks.md, between markers that
    bench/bench.py keeps when it rewrites the rest of that file."""
    T = cfg.probe_timeout
    lines: list[str] = []
    w = lines.append
    w(REPLAY_BEGIN)
    w("## Incident replay: does it solve the problem? (cgroup v2 VM)")
    w("")
    w(f"From `sudo bench/replay` on {meta['date']} (full report, per-repeat values, method and raw data: "
      "[replay.md](replay.md)). The seed incident scaled down to the e2e guest: Debian 12, systemd 252, "
      f"cgroup v2, {meta.get('guest_mem', '?')} MiB RAM and 1 GiB swap, a 300 MiB and a 100 MiB service "
      "resident, sshd probed from the host once a second. Three arms on fresh boots: no gate, plain `flock`, "
      f"buildgate after `buildgate setup --budget {cfg.budget}`. Medians over {meta['repeats']} repeat(s).")
    w("")
    w(f"**Two builds of {cfg.replay_mib} MiB each start together** (each fits alone, both do not; "
      f"buildgate reserves `--mem {cfg.replay_mem}` each):")
    w("")
    table_and_chart(w, runs, cfg.arms, T, chart_ok, MAIN_PNG)
    if over:
        o = over[0].get("replay_spec", {})
        w(f"**Two oversized builds of {o.get('mib', '?')} MiB each** (each alone more than the guest can "
          f"spare next to its services; buildgate still reserves `--mem {o.get('mem', '?')}`, so its cap "
          "is below what the build wants):")
        w("")
        table_and_chart(w, over, cfg.arms, T, over_chart, OVER_PNG)
    if mixed.get("flock") and mixed.get("buildgate"):
        ratios = [f["makespan"] / b["makespan"] for f, b in zip(mixed["flock"], mixed["buildgate"])
                  if f["makespan"] and b["makespan"]]
        w(f"**Mixed queue** (2 large and 4 small builds, budget {cfg.budget}): flock's makespan / "
          f"buildgate's = **{fmt(med(ratios), 2)}** (median of {len(ratios)}; bounds and per-repeat values "
          "in [replay.md](replay.md#mixed-queue-reservations-vs-serialization)).")
        w("")
    w("Where buildgate does not help:")
    w("")
    for line in honest(over):
        w(line)
    w(REPLAY_END)
    section = "\n".join(lines)
    path = DOCS / "benchmarks.md"
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = "# Benchmarks\n"
    start, end = old.find(REPLAY_BEGIN), old.find(REPLAY_END)
    if start >= 0 and end > start:
        text = old[:start] + section + old[end + len(REPLAY_END):]
    else:
        text = old.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(".benchmarks.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def draw_chart(cfg, runs: list[dict], out: str = "replay.png", title: str | None = None) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib: no chart (python3 -m venv /var/lib/buildgate-bench-venv && "
            "/var/lib/buildgate-bench-venv/bin/pip install matplotlib)")
        return False
    T = cfg.probe_timeout
    mixed_pair = next(((f, b) for f in runs for b in runs
                       if f["arm"] == "flock" and b["arm"] == "buildgate" and f["rep"] == b["rep"]
                       and "mixed" in f and "mixed" in b), None) if out == "replay.png" else None
    fig = plt.figure(figsize=(15, 7) if mixed_pair else (10, 7))
    gs = fig.add_gridspec(2, 2 if mixed_pair else 1, height_ratios=[3, 1.3],
                          width_ratios=[1.9, 1] if mixed_pair else [1])
    ax1 = fig.add_subplot(gs[0, 0])
    ax2 = fig.add_subplot(gs[1, 0], sharex=ax1)
    seen = set()
    for r in runs:
        rep = r.get("replay")
        if not rep:
            continue
        a = r["arm"]
        pr = [p for p in rep.get("probes", []) if p["t"] >= -cfg.pre_probe]
        ok = [(p["t"], p["lat"]) for p in pr if p["lat"] is not None]
        bad = [p["t"] for p in pr if p["lat"] is None]
        label = ARM_LABEL[a] if a not in seen else None
        seen.add(a)
        ax1.scatter([x for x, _ in ok], [y for _, y in ok], s=9, color=COLORS[a], alpha=0.6, label=label)
        ax1.scatter(bad, [T * 1.15] * len(bad), s=24, marker="x", color=COLORS[a], alpha=0.8)
        samples = (((rep.get("guest") or {}).get("result")) or {}).get("samples", [])
        ax2.plot([s["t"] for s in samples], [s["swap_used"] for s in samples], color=COLORS[a], alpha=0.7, lw=1)
    ax1.set_yscale("log")
    ax1.axhline(T, color="grey", lw=0.8, ls="--")
    ax1.text(0, T * 0.8, f"x above the line: no banner within {T:.0f} s", fontsize=8, color="grey")
    ax1.set_ylabel("ssh banner latency (s, log)")
    ax1.set_title(title or "Incident replay: two builds that do not fit, probed from the host once a second",
                  fontsize=10)
    ax1.legend(loc="upper right")
    ax1.grid(alpha=0.3, which="both")
    ax2.set_ylabel("swap in use (MiB)")
    ax2.set_xlabel("seconds since both builds were started")
    ax2.grid(alpha=0.3)
    if mixed_pair:
        ax3 = fig.add_subplot(gs[:, 1])
        y = 0
        ticks, labels = [], []
        end_max = 0
        for r in mixed_pair:
            res = ((r["mixed"].get("guest") or {}).get("result")) or {}
            for b in sorted(res.get("builds", []), key=lambda b: b["name"], reverse=True):
                if b.get("ran_from") is None or b.get("run_s") is None:
                    continue
                big = b["mib"] >= cfg.large_mib
                ax3.barh(y, b["run_s"], left=b["ran_from"], height=0.7,
                         color=COLORS[r["arm"]], alpha=0.85 if big else 0.45)
                ax3.barh(y, b["ran_from"] - b.get("submitted", 0), left=b.get("submitted", 0), height=0.15,
                         color="grey", alpha=0.5)
                ticks.append(y)
                labels.append(f"{ARM_LABEL[r['arm']]} {b['name']} ({b['mem']})")
                end_max = max(end_max, b["ran_from"] + b["run_s"])
                y += 1
            ax3.axvline(res.get("makespan") or 0, color=COLORS[r["arm"]], ls="--", lw=1)
            y += 0.8
        ax3.set_yticks(ticks)
        ax3.set_yticklabels(labels, fontsize=8)
        ax3.set_xlabel("seconds since the first submission")
        ax3.set_title(f"Mixed queue (repeat {mixed_pair[0]['rep']})\nbar: running, thin: queued, dashed: makespan",
                      fontsize=9)
        ax3.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(DOCS / out, dpi=110)
    plt.close(fig)
    return True


HONEST = [
    "* **It is serialization, and serialization costs time.** With two builds that each need most of the "
    "budget, buildgate does what `flock` does: one after the other, and the makespan is that of `flock`, not "
    "better. What it adds in that case is the per-build hard cap (`MemoryMax=`, `MemorySwapMax=0`: a build that "
    "outgrows its reservation is OOM-killed in its own cgroup instead of swapping the host to a standstill{OVER}) "
    "and sshd's protection from `setup`. Packing pays only when builds are small enough to "
    "share the budget (mixed queue), and then only up to the CPUs: these builds are CPU-bound and the guest has "
    "2 vCPUs, so no schedule beats Σ run time / 2, and the mixed queue's gain is capped near 2x by that as much "
    "as by memory.",
    "* **Reservations must be right.** `--mem` too low: the build is killed by its cap (exit 137, and it says "
    "so) — the host survives, the deploy fails. `--mem` too high: builds that would fit together wait.",
    "* **A build bigger than the budget is refused**, not run. On this small guest `buildgate setup` without "
    "`--budget` computes a budget (MemTotal minus max(in use + margin, 1G)) smaller than one build's "
    "reservation; the bench therefore sets `--budget` explicitly, as an operator who knows the builds would.",
    "* **Strict FIFO, no backfill**: a large build at the head of the queue makes the small ones behind it "
    "wait even when they would fit now. That keeps large builds from starving, at some cost in packing.",
    "* **Services are not gated.** buildgate caps builds; a service that grows (a leak, a traffic peak) still "
    "presses on the host, and the budget was sized for the services as they were at `setup` time.",
    "* **Work done outside the scope is not capped**: `docker build` (BuildKit runs `RUN` steps in dockerd's "
    "cgroups), builds handed to a daemon or a remote runner that is not wrapped.",
    "* **buildgate costs start-up time**: it is a Python program; under TCG each `buildgate run` spends ~2-3 s "
    "before the build starts (natively a fraction of a second, see benchmarks.md). With 6 builds submitted "
    "0.5 s apart, the order in which they reach the queue can differ from the order they were started in.",
    "* **Caveat on the emulation, which flatters the no-gate arm**: the guest's swap file lives in the host's "
    "page cache (qcow2 overlay, `cache=unsafe`), so swap I/O is fast compared with the ~15x slowed emulated "
    "CPU, much faster than on a VPS's network disk. And a build that grows while it works is slowed by its own "
    "thrashing, so it never reaches its full size before the deadline: the global OOM killer did not fire in "
    "any run. Here the no-gate failure is builds that never finish and services stalled for tens of seconds, "
    "not the incident's unreachable sshd; an earlier check on this kind of guest with two allocators that take "
    "1.2 GiB at once (no gradual growth) did lose ssh banners for 20-60 s until the OOM killer fired.",
]


def honest(over: list[dict]) -> list[str]:
    """The limits, with the numbers the oversized arm measured (if it ran)."""
    def ran(b: dict) -> float | None:
        if b.get("run_s") is not None:
            return b["run_s"]
        if b.get("end") is not None and b.get("ran_from") is not None:
            return b["end"] - b["ran_from"]
        return None

    capped = [ran(b) for r in over if r["arm"] == "buildgate" and "replay" in r
              for b in (((r["replay"].get("guest") or {}).get("result")) or {}).get("builds", [])
              if b.get("rc") == 137 and ran(b) is not None]
    lines = [HONEST[0].replace("{OVER}", ", see the oversized builds" if over else "")]
    if capped:
        lo, hi = min(capped), max(capped)
        lines.append(
            "* **A build that outgrows its cap dies slowly.** Each scope has `MemoryHigh=` 1/16 under its "
            "`MemoryMax=` and no swap, so an anonymous-memory build is throttled at `memory.high` (the kernel's "
            "reclaim penalty, which cannot reclaim anything) before `memory.max` kills it: in the oversized arm "
            f"the capped builds ran {lo:.0f}-{hi:.0f} s before their cap killed them ({len(capped)} builds), and "
            "the next build waited that long. Host and services were fine meanwhile; the queue was not.")
    return lines + HONEST[1:]


def make_meta(cfg, runs: list[dict], load0, load1, run_min: float, date: str | None = None) -> dict:
    iso = [b.get("run_s") for r in runs if "replay" in r and r["arm"] == "flock" and r.get("scenario", "together") == "together"
           for b in (((r["replay"].get("guest") or {}).get("result")) or {}).get("builds", []) if b.get("run_s")]
    mem_total = next((r["prep"]["mem"]["MemTotal"] for r in runs if r.get("prep")), None)
    avail = [r["prep"]["mem"]["MemAvailable"] for r in runs if r.get("prep")]
    return {
        "date": date or dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "repeats": max((r["rep"] for r in runs), default=0),
        "run_min": run_min,
        "host_cpus": os.cpu_count(),
        "host load average (1 min) at start / end": f"{load0[0]:.2f} / {load1[0]:.2f}",
        "host load average (1 min) at the start of each arm": ", ".join(
            f"{ARM_LABEL[r['arm']]}#{r['rep']} {r['host_load_at_start'][0]:.1f}" for r in runs),
        "arms during which another qemu (another VM) ran on the host": f"{sum(1 for r in runs if r.get('other_qemu'))} of {len(runs)}",
        "guest_mem": mem_total,
        "guest MemAvailable with the services up, before the builds (MiB)": (
            f"{min(avail)}-{max(avail)}" if avail else "?"),
        "iso_large_s": f"{med(iso):.0f}" if iso else "?",
        "arm order": "none, flock, buildgate on odd repeats, reversed on even ones; a fresh boot per arm",
        "time per arm (boot, prep, replay, mixed queue, shutdown)": ", ".join(
            f"{ARM_LABEL[r['arm']]}#{r['rep']} {r['arm_s']:.0f} s" for r in runs),
        "raw data": "[replay.json](replay.json) (every probe, every sample)",
    }


def report_from(cfg, paths: list[Path]) -> int:
    runs: list[dict] = []
    dates: list[str] = []
    for path in paths:
        data = json.loads(path.read_text())
        runs += data["runs"] if isinstance(data, dict) else data
        # when the runs were made: the report's own date, else the raw file's time
        when = (data.get("meta") or {}).get("date") if isinstance(data, dict) else None
        when = when or dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        if when not in dates:
            dates.append(when)
    loads = [r.get("host_load_at_start", [0.0]) for r in runs]
    date = " and ".join(sorted(dates))
    meta = make_meta(cfg, runs, loads[0], loads[-1], sum(r.get("arm_s", 0) for r in runs) / 60, date)
    write_report(cfg, runs, meta)
    log(f"wrote {DOCS / 'replay.md'} from {', '.join(map(str, paths))}")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arms", default="none,flock,buildgate")
    ap.add_argument("--no-mixed", dest="mixed", action="store_false")
    ap.add_argument("--quick", action="store_true", help="1 repeat, shorter builds (a smoke test of the bench)")
    ap.add_argument("--services", default="db:300,web:100")
    ap.add_argument("--budget", default="850M")
    ap.add_argument("--scenario", choices=("together", "oversized"), default="together",
                    help="a label for the report: builds that fit one at a time (together), "
                         "or each bigger than the host can spare (oversized: with --replay-mib 1200 --no-mixed)")
    ap.add_argument("--replay-mib", type=int, default=720)
    ap.add_argument("--replay-units", type=int, default=3_000_000)
    ap.add_argument("--replay-mem", default="800M")
    ap.add_argument("--large-mib", type=int, default=560)
    ap.add_argument("--large-units", type=int, default=2_500_000)
    ap.add_argument("--large-mem", default="600M")
    ap.add_argument("--small-mib", type=int, default=150)
    ap.add_argument("--small-units", type=int, default=1_000_000)
    ap.add_argument("--small-mem", default="200M")
    ap.add_argument("--deadline", type=float, default=240, help="builds are stopped after this (s)")
    ap.add_argument("--mixed-deadline", type=float, default=400)
    ap.add_argument("--grace", type=float, default=60, help="host waits this long past the deadline")
    ap.add_argument("--recover", type=float, default=120, help="no banner this long after that: reset")
    ap.add_argument("--probe-timeout", type=float, default=20)
    ap.add_argument("--pre-probe", type=float, default=5)
    ap.add_argument("--post-probe", type=float, default=3)
    ap.add_argument("--wait-idle", type=float, default=0,
                    help="wait up to this many s for no other qemu on the host before starting")
    ap.add_argument("--no-report", action="store_true", help="measure, print, write nothing to docs/")
    ap.add_argument("--report-from", type=Path, metavar="JSON", nargs="+",
                    help="measure nothing: rewrite the report from docs/replay.json or a raw runs-*.json")
    cfg = ap.parse_args(argv)
    cfg.arms = [a for a in cfg.arms.split(",") if a]
    if cfg.quick:
        cfg.repeats = 1
        cfg.large_units //= 3
        cfg.replay_units //= 3
        cfg.small_units //= 3
        cfg.deadline = min(cfg.deadline, 180)
    cfg.honest = HONEST
    if cfg.report_from:
        return report_from(cfg, cfg.report_from)
    if os.geteuid() != 0:
        print("replay: run as root (qemu, the e2e cache)", file=sys.stderr)
        return 1
    WORK.mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_run = time.monotonic()
    if cfg.wait_idle:
        end = time.monotonic() + cfg.wait_idle
        while other_qemus(-1) and time.monotonic() < end:
            log(f"waiting for other qemu to finish: {other_qemus(-1)}")
            time.sleep(15)
    load0 = os.getloadavg()
    runs: list[dict] = []
    raw = WORK / f"runs-{time.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        for rep in range(1, cfg.repeats + 1):
            order = cfg.arms if rep % 2 else list(reversed(cfg.arms))
            for arm in order:
                log(f"=== {arm} repeat {rep}")
                r = run_arm(cfg, arm, rep)
                runs.append(r)
                raw.write_text(json.dumps(runs) + "\n")
                log(f"{arm}#{rep} took {r['arm_s']:.0f}s")
    except KeyboardInterrupt:
        log("interrupted: shutting the VM down")
        vm("down", "--kill", timeout=120)
        return 130
    meta = make_meta(cfg, runs, load0, os.getloadavg(), (time.monotonic() - t_run) / 60)
    log(f"raw results: {raw}")
    if not cfg.no_report:
        write_report(cfg, runs, meta)
        log(f"wrote {DOCS / 'replay.md'}")
    else:
        for r in runs:
            if "replay" in r:
                print(r["arm"], r["rep"], summary_line(r["replay"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
