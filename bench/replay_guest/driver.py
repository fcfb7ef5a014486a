#!/usr/bin/env python3
"""The guest side of bench/replay.py (plain python3, no dependencies).

    driver.py prep ARM SVC_SPEC [BUDGET]   swap on, services up, (buildgate) setup
    driver.py start SPEC.json              run the builds of SPEC (in a transient unit)
    driver.py run SPEC.json                (what `start` runs) the builds, then the result
    driver.py collect TAG                  print one JSON: result, services, OOM kills

`run` starts every build of the spec at once (each after its `delay`), wrapped
for the arm: `none` runs it bare, `flock` under `flock /var/lock/vps-build.lock`,
`buildgate` under `buildgate run --mem MEM --name NAME --`. It samples memory
and swap every second, stops what is still running at the deadline, writes
/root/replay/result-TAG.json and then tells the host on the serial console
(`REPLAY-DONE TAG`): no ssh needed to learn that the builds are over.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

D = "/root/replay"
BGBUILD = f"{D}/bgbuild"
LOCK = "/var/lock/vps-build.lock"


def sh(cmd, timeout=120):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)


def meminfo():
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) // 1024   # MiB
    return out


def pressure():
    try:
        with open("/proc/pressure/memory") as fh:
            txt = fh.read()
    except OSError:
        return {}
    out = {}
    for line in txt.splitlines():
        kind, rest = line.split(" ", 1)
        f = dict(kv.split("=") for kv in rest.split())
        out[kind] = {"avg10": float(f["avg10"]), "total_us": int(f["total"])}
    return out


def prep(arm, svc_spec, budget=None):
    out = {}
    r = sh("swapon /swapfile && swapon --show=NAME,SIZE --noheadings")
    out["swap"] = (r.stdout + r.stderr).strip()
    for item in svc_spec.split(","):
        name, mib = item.split(":")
        unit = (f"[Unit]\nDescription=replay service {name} ({mib} MiB resident)\n\n"
                f"[Service]\nExecStart=/usr/bin/python3 {D}/svc.py {name} {mib}\nRestart=no\n")
        with open(f"/etc/systemd/system/svc-{name}.service", "w") as fh:
            fh.write(unit)
    sh("systemctl daemon-reload")
    names = [i.split(":")[0] for i in svc_spec.split(",")]
    sh("systemctl start " + " ".join(f"svc-{n}.service" for n in names))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(os.path.exists(f"/run/svc-{n}.json") for n in names):
            break
        time.sleep(0.5)
    else:
        out["error"] = "services did not come up"
    if arm == "buildgate":
        r = sh(f"buildgate setup --budget {budget}", timeout=300)
        out["setup_rc"] = r.returncode
        out["setup"] = (r.stdout + r.stderr).strip().splitlines()[-12:]
    time.sleep(3)
    m = meminfo()
    out["mem"] = {k: m[k] for k in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")}
    out["load"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out))
    return 0 if "error" not in out and out.get("setup_rc", 0) == 0 else 1


def wrap(arm, b):
    argv = [BGBUILD, str(b["mib"]), str(b["units"])]
    if arm == "flock":
        return ["flock", LOCK] + argv
    if arm == "buildgate":
        return ["buildgate", "run", "--mem", b["mem"], "--name", b["name"], "--"] + argv
    return argv


def run(spec_path):
    spec = json.load(open(spec_path))
    tag, arm = spec["tag"], spec["arm"]
    builds = spec["builds"]
    t0 = time.monotonic()
    wall0 = time.time()
    procs = {}
    order = sorted(builds, key=lambda b: b.get("delay", 0))
    samples = []
    deadline = t0 + spec["deadline_s"]
    killed = []

    def sample():
        m = meminfo()
        p = pressure()
        samples.append({"t": round(time.monotonic() - t0, 2), "avail": m["MemAvailable"],
                        "swap_used": m["SwapTotal"] - m["SwapFree"],
                        "psi_some": p.get("some", {}).get("avg10"), "psi_full": p.get("full", {}).get("avg10")})

    pending = list(order)
    next_sample = 0.0
    while True:
        el = time.monotonic() - t0
        while pending and pending[0].get("delay", 0) <= el:
            b = pending.pop(0)
            log = open(f"{D}/{tag}-{b['name']}.log", "w")
            p = subprocess.Popen(wrap(arm, b), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            procs[b["name"]] = {"p": p, "start": time.monotonic() - t0, "end": None, "rc": None}
        for st in procs.values():
            if st["end"] is None and st["p"].poll() is not None:
                st["end"], st["rc"] = time.monotonic() - t0, st["p"].returncode
        if not pending and all(st["end"] is not None for st in procs.values()):
            break
        if el >= next_sample:
            sample()
            next_sample = el + 1.0
        if time.monotonic() > deadline:
            for name, st in procs.items():
                if st["end"] is None:
                    killed.append(name)
                    try:
                        os.killpg(st["p"].pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            stop_by = time.monotonic() + 20
            while time.monotonic() < stop_by and any(st["p"].poll() is None for st in procs.values()):
                time.sleep(0.2)
            for st in procs.values():
                if st["p"].poll() is None:
                    try:
                        os.killpg(st["p"].pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    st["p"].wait()
                if st["end"] is None:
                    st["end"], st["rc"] = time.monotonic() - t0, st["p"].returncode
            pending = []
            break
        time.sleep(0.1)
    sample()
    res = {"tag": tag, "arm": arm, "wall0": wall0, "deadline_s": spec["deadline_s"], "killed_at_deadline": killed,
           "builds": [], "samples": samples}
    for b in builds:
        st = procs.get(b["name"])
        row = dict(b)
        if st:
            row.update(submitted=round(st["start"], 2), end=round(st["end"], 2), rc=st["rc"])
            txt = open(f"{D}/{tag}-{b['name']}.log", errors="replace").read()
            m = re.search(r"bgbuild: start ([0-9.]+)", txt)
            if m:
                row["ran_from"] = round(float(m.group(1)) - wall0, 2)
            m = re.search(r"bgbuild: \d+ units, \d+ MiB, ([0-9.]+) s", txt)
            if m:
                row["run_s"] = float(m.group(1))
            row["log_tail"] = txt.strip().splitlines()[-3:]
        res["builds"].append(row)
    ends = [r["end"] for r in res["builds"] if "end" in r]
    res["makespan"] = round(max(ends), 2) if ends else None
    tmp = f"{D}/result-{tag}.json.tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh)
    os.replace(tmp, f"{D}/result-{tag}.json")
    try:
        with open("/dev/ttyS0", "w") as tty:
            tty.write(f"\nREPLAY-DONE {tag} makespan={res['makespan']}\n")
    except OSError:
        pass
    return 0


def start(spec_path):
    spec = json.load(open(spec_path))
    r = sh(f"systemd-run --unit=replay-{spec['tag']} --collect --no-block "
           f"/usr/bin/python3 {D}/driver.py run {spec_path}")
    print((r.stdout + r.stderr).strip())
    return r.returncode


def collect(tag):
    out = {}
    try:
        out["result"] = json.load(open(f"{D}/result-{tag}.json"))
    except OSError as e:
        out["result"] = None
        out["result_error"] = str(e)
    svcs = {}
    for f in os.listdir("/etc/systemd/system"):
        m = re.match(r"svc-(\w+)\.service$", f)
        if not m:
            continue
        r = sh(f"systemctl show {f} -p ActiveState,SubState,Result,NRestarts,ExecMainStatus,MainPID")
        st = dict(line.split("=", 1) for line in r.stdout.strip().splitlines() if "=" in line)
        try:
            st["status"] = json.load(open(f"/run/svc-{m.group(1)}.json"))
        except (OSError, ValueError):
            pass
        svcs[m.group(1)] = st
    out["services"] = svcs
    r = sh("dmesg")
    kills = []
    for line in r.stdout.splitlines():
        m = re.search(r"oom-kill:constraint=(\w+),.*?task_memcg=([^,]*),task=([^,]*),pid=(\d+)", line)
        if m:
            kills.append({"constraint": m.group(1), "memcg": m.group(2), "task": m.group(3), "pid": int(m.group(4))})
    out["oom_kills"] = kills
    out["dmesg_tail"] = [ln for ln in r.stdout.splitlines() if "Killed process" in ln or "invoked oom-killer" in ln][-12:]
    m = meminfo()
    out["mem_after"] = {k: m[k] for k in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prep":
        sys.exit(prep(*sys.argv[2:]))
    if cmd == "start":
        sys.exit(start(sys.argv[2]))
    if cmd == "run":
        sys.exit(run(sys.argv[2]))
    if cmd == "collect":
        sys.exit(collect(sys.argv[2]))
    sys.exit(f"unknown command {cmd}")
