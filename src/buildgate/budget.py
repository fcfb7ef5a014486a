"""The host's build budget: how much memory all builds together may reserve."""

from __future__ import annotations

import os

from buildgate import cgroup
from buildgate.config import Config
from buildgate.errors import Unavailable
from buildgate.sizes import format_size, parse_size

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:  # the real thing for type checkers; see _records.py
    from dataclasses import dataclass
else:
    from buildgate._records import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # for messages: where the number came from


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> bytes per key."""
    result = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            result[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return result


def mem_total() -> int:
    with open(os.path.join(cgroup.PROC_ROOT, "meminfo"), encoding="ascii") as fh:
        return parse_meminfo(fh.read())["MemTotal"]


def default_reserve(total: int) -> int:
    """What a host keeps for the OS, sshd and its services when nobody said:
    a quarter of RAM, at least 1 GiB."""
    return max(GiB, total // 4)


def resolve_budget(cfg: Config, total: int, slice_max: int | None) -> Budget:
    """Pure: config budget and slice MemoryMax, the smaller wins; else derived.

    The slice cap is what the kernel enforces for all builds together, so a
    configured budget above it would admit builds that then fight inside the
    slice; a budget below it is the operator being careful, and is honoured.
    """
    configured = parse_size(cfg.budget, percent_of=total) if cfg.budget else None
    if configured is not None and slice_max is not None:
        if configured <= slice_max:
            return Budget(configured, f"budget in {cfg.source}")
        return Budget(slice_max, f"MemoryMax of {cfg.slice}, below the budget in {cfg.source}")
    if configured is not None:
        return Budget(configured, f"budget in {cfg.source}")
    if slice_max is not None:
        return Budget(slice_max, f"MemoryMax of {cfg.slice}")
    derived = max(total - default_reserve(total), 256 * 1024**2)
    return Budget(derived, f"MemTotal {format_size(total)} minus {format_size(default_reserve(total))} for the host")


def query_slice_max(slice_name: str) -> int | None:
    """MemoryMax of the slice as systemd sees it (unit file or runtime).

    A ``systemctl show`` subprocess rather than D-Bus here keeps pystemd out of
    a process that may then wait for a long time.
    """
    import subprocess  # only here: the usual path reads the slice's cgroup

    try:
        out = subprocess.run(
            ["systemctl", "show", "--property=MemoryMax", "--value", slice_name],
            capture_output=True, text=True, timeout=15, check=False,
        )
    except FileNotFoundError:
        raise Unavailable("systemctl not found: buildgate needs a systemd host") from None
    except subprocess.TimeoutExpired:
        raise Unavailable("systemctl show timed out: check `systemctl is-system-running`") from None
    if out.returncode != 0:
        why = " ".join(out.stderr.split())[:200] or f"exit {out.returncode}"
        raise Unavailable(f"cannot ask systemd about {slice_name} ({why}): check `systemctl is-system-running`")
    value = out.stdout.strip()
    if not value or value == "infinity":
        return None
    try:
        return parse_size(value)
    except Exception:
        return None
