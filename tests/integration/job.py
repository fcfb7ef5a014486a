"""A stand-in build for the integration tests.

    job.py LOG LABEL [--until FILE] [--sleep S] [--alloc MB] [--daemon PIDFILE [--daemon-ticks 1]] [--exit N]

Appends "start LABEL t" / "end LABEL t" to LOG (O_APPEND, one write per line),
optionally touches MB megabytes, leaves a daemon behind (which ignores SIGTERM and logs
"tick LABEL t" every 10 ms with --daemon-ticks), waits for FILE to exist
or sleeps, then exits with N.
"""

from __future__ import annotations

import os
import sys
import time


def log(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{text} {time.time():.6f} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    logfile, label = argv[0], argv[1]
    opts = dict(zip(argv[2::2], argv[3::2]))
    admitted = os.environ.get("BUILDGATE_ADMITTED")
    if admitted:  # the queue's own order: admissions happen one at a time
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"admit {label} {admitted} {os.getpid()}\n".encode())
        os.close(fd)
    log(logfile, f"start {label}")
    if "--alloc" in opts:
        block = bytearray(int(opts["--alloc"]) * 1024 * 1024)
        for i in range(0, len(block), 4096):  # touch every page: really charge it
            block[i] = 1
    if "--daemon" in opts:
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                with open(opts["--daemon"], "w") as fh:
                    fh.write(str(os.getpid()))
                os.closerange(0, 256)
                if "--daemon-ticks" in opts:  # proof of life until it is SIGKILLed
                    import signal

                    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn leftover: stopping it takes a while
                    for _ in range(50000):
                        log(logfile, f"tick {label}")
                        time.sleep(0.01)
                time.sleep(1000)
            os._exit(0)
        os.waitpid(pid, 0)
        while not os.path.exists(opts["--daemon"]):
            time.sleep(0.01)
    if "--until" in opts:
        deadline = time.time() + 120
        while not os.path.exists(opts["--until"]) and time.time() < deadline:
            time.sleep(0.02)
    if "--sleep" in opts:
        time.sleep(float(opts["--sleep"]))
    log(logfile, f"end {label}")
    return int(opts.get("--exit", "0"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
