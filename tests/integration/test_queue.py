"""The queue against real processes: order, overlap, timeouts, crashes, signals."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import Gate, alive, kill, wait_gone


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_two_full_budget_builds_never_overlap(gate: Gate) -> None:
    procs = [gate.popen("run", "--", *gate.job(label, "--sleep", "1")) for label in "ab"]
    assert [p.wait(60) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    iv = gate.intervals()
    assert set(iv) == {"a", "b"}
    assert not _overlaps(iv["a"], iv["b"]), iv


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_three_half_budget_builds_run_two_at_a_time(gate: Gate) -> None:
    procs = [gate.popen("run", "--mem", "200M", "--", *gate.job(label, "--sleep", "1.5")) for label in "abc"]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    iv = gate.intervals()
    pairs = [_overlaps(iv[x], iv[y]) for x, y in itertools.combinations("abc", 2)]
    assert sum(pairs) >= 1, f"half-budget builds were serialized: {iv}"
    # never three at once
    for t, _ in iv.values():
        assert sum(1 for s, e in iv.values() if s <= t < e) <= 2, iv


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_fifo_of_five_queued_builds_with_mixed_sizes(gate: Gate) -> None:
    go = gate.root / "go"
    # a: 300M runs and blocks the rest; then b (200M) is the head, and c (100M),
    # which would fit next to a, must still not pass it.
    sizes = {"a": "300M", "b": "200M", "c": "100M", "d": "400M", "e": "100M"}
    procs = {}
    for n, (label, mem) in enumerate(sizes.items(), start=1):
        procs[label] = gate.popen("run", "--mem", mem, "--name", label, "--",
                                  *gate.job(label, "--until", str(go) + label))
        gate.wait_queue(n)
    assert gate.start_order() == ["a"]
    time.sleep(0.5)
    assert gate.start_order() == ["a"], "a later, smaller build overtook the head of the queue"
    for label in "abcde":
        (gate.root / f"go{label}").touch()
        gate.wait_log(f"end {label}")
    assert all(p.wait(60) == 0 for p in procs.values())
    assert gate.start_order() == list("abcde")
    iv = gate.intervals()
    mem = {k: int(v[:-1]) for k, v in sizes.items()}
    for t, _ in iv.values():  # the budget held at every start
        assert sum(mem[k] for k, (s, e) in iv.items() if s <= t < e) <= 400, iv


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_wait_timeout_gives_124_and_the_command_never_ran(gate: Gate) -> None:
    hold = gate.popen("run", "--", *gate.job("h", "--until", str(gate.root / "go")))
    gate.wait_log("start h")
    marker = gate.root / "ran"
    t0 = time.monotonic()
    out = gate.run("run", "--wait", "1", "--", "touch", str(marker))
    assert out.returncode == 124, out.stderr
    assert time.monotonic() - t0 >= 1
    assert "gave up waiting: needs 400M, 400M of 400M reserved by" in out.stderr
    assert not marker.exists()
    out = gate.run("run", "--wait", "0.2", "-E", "3", "--", "touch", str(marker))
    assert out.returncode == 3 and not marker.exists()
    assert len(gate.status()) == 1  # the timed-out tickets left the queue
    (gate.root / "go").touch()
    assert hold.wait(60) == 0


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_no_wait_gives_75_when_it_cannot_start_now(gate: Gate) -> None:
    hold = gate.popen("run", "--mem", "300M", "--", *gate.job("h", "--until", str(gate.root / "go")))
    gate.wait_log("start h")
    marker = gate.root / "ran"
    out = gate.run("run", "--no-wait", "--mem", "200M", "--", "touch", str(marker))
    assert out.returncode == 75, out.stderr
    assert "cannot start now" in out.stderr and not marker.exists()
    # one that fits next to it starts at once
    assert gate.run("run", "--no-wait", "--mem", "100M", "--", "touch", str(marker)).returncode == 0
    assert marker.exists()
    (gate.root / "go").touch()
    assert hold.wait(60) == 0


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_waiting_line_names_the_holder(gate: Gate) -> None:
    hold = gate.popen("run", "--name", "holder", "--", *gate.job("h", "--until", str(gate.root / "go")))
    gate.wait_log("start h")
    waiter = gate.popen("run", "--name", "waiter", "--", "true")
    gate.wait_queue(2)
    (gate.root / "go").touch()
    assert hold.wait(60) == 0 and waiter.wait(60) == 0
    err = waiter.stderr.read()
    assert f"waiting: needs 400M, 400M of 400M reserved by holder (pid {hold.pid}) 400M running" in err, err


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_sigkill_of_a_waiting_buildgate_leaves_the_queue_clean(gate: Gate) -> None:
    hold = gate.popen("run", "--", *gate.job("h", "--until", str(gate.root / "go")))
    gate.wait_log("start h")
    waiter = gate.popen("run", "--", *gate.job("w"))
    gate.wait_queue(2)
    kill(waiter)
    waiter.wait(10)
    assert len(gate.wait_queue(1)) == 1
    (gate.root / "go").touch()
    assert hold.wait(60) == 0
    assert gate.run("run", "--no-wait", "--", *gate.job("next")).returncode == 0
    assert "start w" not in gate.events_text()
    assert os.listdir(gate.state / "q") == []  # nothing stale left behind


def test_sigkill_of_a_running_buildgate_keeps_the_reservation_until_the_build_ends(gate: Gate, tmp_path) -> None:
    go = gate.root / "go"
    pidfile = tmp_path / "daemon.pid"
    hold = gate.popen("run", "--name", "orphan", "--", *gate.job("h", "--daemon", str(pidfile), "--until", str(go)))
    gate.wait_log("start h")
    while not pidfile.exists():
        time.sleep(0.02)
    kill(hold)
    hold.wait(10)
    main_pid = [pid for kind, _, _, pid in gate.events() if kind == "start"][0]
    assert alive(main_pid)
    # The build still runs under its cap: nothing else may be admitted next to it.
    out = gate.run("run", "--no-wait", "--", "true")
    assert out.returncode == 75, out.stderr
    assert "buildgate gone" in out.stderr
    entries = gate.status()
    assert len(entries) == 1 and entries[0]["orphan"] and entries[0]["main_pid"] == main_pid
    # and plain flock scripts stay excluded: the build's processes hold the legacy lock
    assert subprocess.run(["flock", "-n", str(gate.legacy), "true"]).returncode == 1
    # A queued build starts once the orphan's main process exits, and its
    # leftover daemon is stopped with the scope.
    waiter = gate.popen("run", "--", *gate.job("next"))
    gate.wait_queue(2)
    time.sleep(0.3)
    assert "start next" not in gate.events_text()
    go.touch()
    assert waiter.wait(60) == 0, waiter.stderr.read()
    assert gate.intervals()["next"][0] >= gate.intervals()["h"][1]
    assert wait_gone(int(pidfile.read_text()), 15), "the orphan's leftover daemon survived"
    assert gate.status() == []
    assert subprocess.run(["flock", "-n", str(gate.legacy), "true"]).returncode == 0


def _pids_in_log(gate: Gate) -> list[int]:
    return [pid for kind, _, _, pid in gate.events() if kind == "start"]


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_sigint_and_sigterm_stop_the_whole_scope(gate: Gate, tmp_path) -> None:
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        pidfile = tmp_path / f"d{sig}.pid"
        p = gate.popen("run", "--", *gate.job(f"s{sig}", "--daemon", str(pidfile), "--until", str(tmp_path / "never")))
        gate.wait_log(f"start s{sig}")
        while not pidfile.exists():
            time.sleep(0.02)
        p.send_signal(sig)
        assert p.wait(30) == code
        err = p.stderr.read()
        assert f"interrupted by {signal.Signals(sig).name}: stopped the whole scope" in err, err
        assert wait_gone(int(pidfile.read_text()), 10)
        assert wait_gone(_pids_in_log(gate)[-1], 10)
    assert gate.status() == []


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_github_actions_cancel_leaves_no_process_behind(gate: Gate, tmp_path) -> None:
    """SIGINT, then SIGTERM 7.5 s later, then SIGKILL - against a build that
    ignores SIGINT and SIGTERM.  stop_timeout (2 s here) escalates to SIGKILL."""
    pids = tmp_path / "pids"
    script = (f"trap '' INT TERM; sleep 1000 & echo $! >> {pids}; sleep 1000 & echo $! >> {pids}; "
              f"echo $$ >> {pids}; mv {pids} {pids}.done; wait; wait")
    p = gate.popen("run", "--", "sh", "-c", script)
    done = tmp_path / "pids.done"
    while not done.exists():
        time.sleep(0.02)
    scope_pids = done.read_text().split()
    assert len(scope_pids) == 3
    p.send_signal(signal.SIGINT)
    try:
        p.wait(7.5)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(2.5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for pid in scope_pids:
        assert wait_gone(int(pid), 15), f"pid {pid} survived the cancel"


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_interop_with_plain_flock_on_the_legacy_path(gate: Gate) -> None:
    log = gate.log
    legacy_job = f"echo start L $(date +%s.%N) $$ >> {log}; sleep 1; echo end L $(date +%s.%N) $$ >> {log}"
    # legacy first, buildgate second
    legacy = subprocess.Popen(["flock", str(gate.legacy), "sh", "-c", legacy_job])
    gate.wait_log("start L")
    bg = gate.popen("run", "--mem", "100M", "--", *gate.job("b"))
    assert bg.wait(60) == 0 and legacy.wait(60) == 0
    iv = gate.intervals()
    assert iv["b"][0] >= iv["L"][1], iv
    # buildgate first, legacy second
    gate.log.unlink()
    bg = gate.popen("run", "--mem", "100M", "--", *gate.job("b", "--sleep", "1"))
    gate.wait_log("start b")
    legacy = subprocess.Popen(["flock", str(gate.legacy), "sh", "-c", legacy_job])
    assert bg.wait(60) == 0 and legacy.wait(60) == 0
    iv = gate.intervals()
    assert iv["L"][0] >= iv["b"][1], iv
    # and a legacy holder makes --no-wait fail fast
    legacy = subprocess.Popen(["flock", str(gate.legacy), "sleep", "2"])
    time.sleep(0.3)
    assert gate.run("run", "--no-wait", "--", "true").returncode == 75
    legacy.wait(30)


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_a_waiting_buildgate_has_not_loaded_pystemd_or_psutil(gate: Gate) -> None:
    hold = gate.popen("run", "--", *gate.job("h", "--until", str(gate.root / "go")))
    gate.wait_log("start h")
    waiter = gate.popen("run", "--", "true")
    gate.wait_queue(2)
    maps = open(f"/proc/{waiter.pid}/maps").read()
    assert "pystemd" not in maps and "psutil" not in maps
    (gate.root / "go").touch()
    assert hold.wait(60) == 0 and waiter.wait(60) == 0


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_on_a_terminal_the_waiting_line_is_refreshed_in_place(gate: Gate) -> None:
    hold = gate.popen("run", "--name", "holder", "--", *gate.job("h", "--until", str(gate.root / "go")))
    gate.wait_log("start h")
    inner = " ".join(gate.cmd("run", "--name", "tty", "--", "true"))
    # script(1) gives the waiter a pseudo-terminal
    waiter = subprocess.Popen(["script", "-qfec", inner, "/dev/null"], env=gate.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    gate.wait_queue(2)
    time.sleep(2.5)  # long enough for at least one refresh (1 s on a TTY)
    (gate.root / "go").touch()
    out = waiter.communicate(timeout=60)[0].decode()
    assert hold.wait(60) == 0 and waiter.returncode == 0, out
    assert out.count("\r\x1b[Kbuildgate: waiting: needs 400M") >= 2, repr(out)
    assert "tty: waited" in out


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_tickets_from_an_earlier_boot_and_corrupt_files_are_ignored_and_reaped(gate: Gate) -> None:
    """What a crash or a reboot can leave in a persistent state_dir: a 'running'
    ticket of another boot whose main pid is alive again in this boot (pid
    reuse), a record cut off mid-write, a temp file. None of it holds memory,
    none needs manual cleanup: a full-budget build starts at once and the
    next scan deletes them."""
    from buildgate import procs
    from buildgate.queue import RUNNING, Entry

    q = gate.state / "q"
    q.mkdir(parents=True)
    me = os.getpid()
    other_boot = Entry(seq=1, pid=me, pid_start=procs.starttime(me), boot="not-" + procs.boot_id(), uid=0,
                       name="before-reboot", mem=400 << 20, argv="npm run build", cwd="/", state=RUNNING,
                       main_pid=me, main_start=procs.starttime(me), scope="buildgate-x-1.scope")
    (q / "1.json").write_text(other_boot.to_json())
    (q / "1.lock").write_text("")
    (q / "2.json").write_text('{"seq": 2, "pid": 1, "state": "runn')  # cut off
    (q / "2.lock").write_text("")
    (gate.state / ".3.json.tmp").write_text("{")
    (gate.state / "seq").write_text("garbage\n")

    out = gate.run("run", "--no-wait", "--", *gate.job("a"))
    assert out.returncode == 0, out.stderr
    assert "start a" in gate.events_text()
    assert sorted(p.name for p in q.iterdir()) == [], list(q.iterdir())
    assert not (gate.state / ".3.json.tmp").exists()
    # the counter moved past the numbers it found, never reusing one
    assert int((gate.state / "seq").read_text()) >= 3


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_a_waiter_behind_a_killed_waiter_moves_up_at_once(gate: Gate) -> None:
    """A waiter behind another sleeps until *that* waiter changes (see
    Ticket.wait): here it is SIGKILLed, and the small build behind it starts
    next to the running one without waiting for it. Joiners behind and their
    deaths do not disturb the order."""
    hold = gate.popen("run", "--mem", "200M", "--", *gate.job("h", "--until", str(gate.root / "go")))
    gate.wait_log("start h")
    big = gate.popen("run", "--mem", "400M", "--", *gate.job("big"))
    gate.wait_queue(2)
    small = gate.popen("run", "--mem", "100M", "--", *gate.job("small", "--until", str(gate.root / "go")))
    gate.wait_queue(3)
    # tickets joining behind and dying there are not small's business
    extra = [gate.popen("run", "--mem", "100M", "--", *gate.job(f"x{i}")) for i in range(3)]
    gate.wait_queue(6)
    for p in extra:
        kill(p)
        p.wait(10)
    gate.wait_queue(3)
    assert "start small" not in gate.events_text()  # still behind big
    kill(big)
    big.wait(10)
    gate.wait_log("start small", timeout=30)  # 100M fits next to h's 200M: no need to wait for h
    assert hold.poll() is None
    (gate.root / "go").touch()
    assert hold.wait(60) == 0 and small.wait(60) == 0
    assert "start big" not in gate.events_text() and "start x" not in gate.events_text()


_CLOSE_BEFORE_UNLOCK = """
import fcntl, os, sys, time
lock, trigger = sys.argv[1:]
fd = os.open(lock, os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
while not os.path.exists(trigger):
    time.sleep(0.01)
os.close(os.open(lock, os.O_WRONLY))  # IN_CLOSE_WRITE, the flock still held
time.sleep(0.5)
# the exit closes a read-only fd: IN_CLOSE_NOWRITE, which no waiter watches
"""


_LEGACY_UNLOCK_WITHOUT_EVENT = """
import fcntl, os, sys, time
lock, trigger = sys.argv[1:]
fd = os.open(lock, os.O_RDONLY | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
while not os.path.exists(trigger):
    time.sleep(0.01)
os.close(os.open(lock, os.O_RDONLY))  # IN_CLOSE_NOWRITE, the flock still held
time.sleep(0.5)
fcntl.flock(fd, fcntl.LOCK_UN)  # no inotify event at all
time.sleep(60)
"""


@pytest.mark.backends("none")
def test_a_legacy_flock_dropped_after_its_close_event_still_lets_the_waiter_in(gate: Gate) -> None:
    """The legacy lock's twin of the test below: flock(1)'s exit, too, queues
    its close event before the kernel drops its flock. Here the flock goes
    half a second after a close event, with no event of its own."""
    trigger = gate.root / "close-now"
    holder = subprocess.Popen([sys.executable, "-c", _LEGACY_UNLOCK_WITHOUT_EVENT, str(gate.legacy),
                               str(trigger)], stdout=subprocess.PIPE, text=True)
    procs_left = [holder]
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        bg = gate.popen("run", "--", *gate.job("b"))
        procs_left.append(bg)
        gate.wait_queue(1)
        time.sleep(0.5)  # let it find the legacy lock held and go to sleep on it
        assert "start b" not in gate.events_text()
        trigger.touch()
        assert bg.wait(30) == 0, bg.stderr.read() if bg.stderr else ""
        assert holder.poll() is None  # still alive: only its flock went
    finally:
        for p in procs_left:
            kill(p)
            p.wait(10)


@pytest.mark.backends("systemd", "cgroupfs", "none")
def test_a_lock_closed_before_its_flock_is_dropped_does_not_strand_the_waiter_behind(gate: Gate) -> None:
    """The kernel queues a dying holder's IN_CLOSE_WRITE *before* it drops the
    holder's flock (__fput: fsnotify_close, then locks_remove_file). A waiter
    woken in between sees the lock still held; the event is spent, so without
    a re-check it sleeps forever behind a dead ticket. (CI's slow guest hit
    exactly that in the killed-waiter test above.) Here a fake ticket ahead
    makes the gap half a second wide: its close-for-writing comes first, its
    flock goes later with no event at all."""
    from buildgate import procs
    from buildgate.queue import Entry

    q = gate.state / "q"
    q.mkdir(parents=True)
    trigger = gate.root / "close-now"
    (q / "1.lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", _CLOSE_BEFORE_UNLOCK, str(q / "1.lock"), str(trigger)],
                              stdout=subprocess.PIPE, text=True)
    procs_left = [holder]
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        ahead = Entry(seq=1, pid=holder.pid, pid_start=procs.starttime(holder.pid), boot=procs.boot_id(),
                      uid=0, name="fake-ahead", mem=400 << 20, argv="fake", cwd="/")
        (q / "1.json").write_text(ahead.to_json())
        small = gate.popen("run", "--mem", "100M", "--", *gate.job("small"))
        procs_left.append(small)
        entries = gate.wait_queue(2)
        assert [(e["seq"], e["state"]) for e in entries] == [(1, "waiting"), (2, "waiting")], entries
        trigger.touch()
        assert small.wait(30) == 0, small.stderr.read() if small.stderr else ""
        assert holder.wait(10) == 0
        assert "start small" in gate.events_text()
    finally:
        for p in procs_left:
            kill(p)
            p.wait(10)


@pytest.mark.parametrize("refresh", [None, 1.0])
def test_the_waiting_line_is_repeated_at_the_refresh_pace_and_no_faster(tmp_path, refresh: float | None) -> None:
    """What `run` asks of Ticket.wait for its waiting line (1 s on a TTY, 60 s
    in a log): one report when the situation is first seen, then one per
    ``refresh`` while nothing changes, never one per wakeup. Real lock files,
    flock and inotify; a holder in this process keeps the budget full."""
    from buildgate.errors import QueueTimeout
    from buildgate.queue import RUNNING, Queue, prepare_state_dir

    state = str(tmp_path / "state")
    prepare_state_dir(state)
    queue = Queue(state)
    fields = dict(uid=os.getuid(), mem=100 << 20, argv="x", cwd="/")
    holder = queue.enter(name="holder", **fields)
    holder.update(state=RUNNING)
    waiter = queue.enter(name="waiter", **fields)
    seen: list[float] = []
    t0 = time.monotonic()
    try:
        with pytest.raises(QueueTimeout):
            waiter.wait(100 << 20, t0 + 3.6, progress=lambda d: seen.append(time.monotonic() - t0),
                        refresh=refresh)
    finally:
        waiter.release()
        holder.release()
    if refresh is None:
        assert len(seen) == 1, seen  # nothing changed: said once
    else:
        # repeated (a slow machine may start late, so at least twice in 3.6 s) ...
        assert 2 <= len(seen) <= 4, seen
        # ... a refresh apart, never in a burst
        assert all(b - a >= 0.9 for a, b in zip(seen, seen[1:])), seen
