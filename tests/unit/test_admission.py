"""Admission order as a pure function: FIFO, reservations, no barging."""

from __future__ import annotations

from buildgate.queue import ADMITTED, RUNNING, WAITING, Entry, admission

M = 1024**2


def e(seq: int, mem: int, state: str = WAITING) -> Entry:
    return Entry(seq=seq, pid=1000 + seq, pid_start=1, boot="b", uid=0, name=f"b{seq}", mem=mem * M,
                 argv="x", cwd="/", state=state)


def test_empty_queue_admits_what_fits() -> None:
    assert admission([e(1, 100)], 1, 100 * M, 400 * M).ok


def test_head_waits_for_memory_and_says_so() -> None:
    entries = [e(1, 300, RUNNING), e(2, 200)]
    d = admission(entries, 2, 200 * M, 400 * M)
    assert not d.ok and d.reason == "memory" and d.used == 300 * M
    assert [h.seq for h in d.holders] == [1]


def test_no_barging_small_build_behind_a_big_one_waits() -> None:
    # 300M runs; 200M waits at the head; a 100M build would fit, but must not pass it.
    entries = [e(1, 300, RUNNING), e(2, 200), e(3, 100)]
    d = admission(entries, 3, 100 * M, 400 * M)
    assert not d.ok and d.reason == "queue" and [a.seq for a in d.ahead] == [2]


def test_builds_that_fit_run_side_by_side() -> None:
    entries = [e(1, 200, ADMITTED), e(2, 200)]
    assert admission(entries, 2, 200 * M, 400 * M).ok
    entries = [e(1, 200, RUNNING), e(2, 200, RUNNING), e(3, 200)]
    assert not admission(entries, 3, 200 * M, 400 * M).ok


def test_full_budget_default_is_a_mutex() -> None:
    entries = [e(1, 400, RUNNING), e(2, 400)]
    assert not admission(entries, 2, 400 * M, 400 * M).ok
    assert admission([e(2, 400)], 2, 400 * M, 400 * M).ok


def test_fifo_over_a_mixed_sequence() -> None:
    """Simulate the queue: start whatever admission allows, finish in order."""
    sizes = {1: 300, 2: 200, 3: 100, 4: 400, 5: 100}
    state = {s: WAITING for s in sizes}
    started: list[int] = []
    for _ in range(10):
        for s in sorted(sizes):
            if state[s] == WAITING:
                live = [e(k, sizes[k], state[k]) for k in sizes if state[k] != "done"]
                if admission(live, s, sizes[s] * M, 400 * M).ok:
                    state[s] = RUNNING
                    started.append(s)
        running = [s for s in sorted(sizes) if state[s] == RUNNING]
        if running:
            state[running[0]] = "done"
    assert started == [1, 2, 3, 4, 5]
