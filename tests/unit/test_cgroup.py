"""cgroup file parsers over canned v1 and v2 text, and the reader over a fake root."""

from __future__ import annotations

from buildgate import cgroup
from buildgate.cgroup import Layout, MemoryCgroup, detect_layout, parse_limit, parse_proc_cgroup
from buildgate.procs import parse_stat_starttime

V1_PROC_CGROUP = """12:pids:/system.slice/x.service
4:memory:/build.slice/buildgate-web-3.scope
3:cpu,cpuacct:/build.slice
1:name=systemd:/build.slice/buildgate-web-3.scope
0::/build.slice/buildgate-web-3.scope
"""

V2_MEMORY_EVENTS = "low 0\nhigh 12\nmax 340\noom 2\noom_kill 1\noom_group_kill 0\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"


def test_proc_cgroup_keys_each_controller_and_v2() -> None:
    parsed = parse_proc_cgroup(V1_PROC_CGROUP)
    assert parsed["memory"] == "/build.slice/buildgate-web-3.scope"
    assert parsed["cpu"] == parsed["cpuacct"] == "/build.slice"
    assert parsed[""] == "/build.slice/buildgate-web-3.scope"
    assert parse_proc_cgroup("0::/user.slice\n") == {"": "/user.slice"}


def test_oom_kill_counters_v1_and_v2() -> None:
    assert cgroup.oom_kills(V2_MEMORY_EVENTS) == 1
    assert cgroup.oom_kills(V1_OOM_CONTROL) == 3
    assert cgroup.oom_kills("oom_kill_disable 0\nunder_oom 0\n") == 0  # kernel < 4.13


def test_limits() -> None:
    assert parse_limit("max\n") is None
    assert parse_limit("9223372036854771712\n") is None  # v1 "unlimited"
    assert parse_limit("104857600\n") == 100 * 1024**2


def test_stat_starttime_survives_odd_comm() -> None:
    line = "4242 (we ird) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10"
    assert parse_stat_starttime(line) == 987654


def _v2_root(tmp_path):
    root = tmp_path / "cg"
    scope = root / "build.slice" / "b-1.scope"
    scope.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    (scope / "memory.max").write_text("209715200\n")
    (scope / "memory.events").write_text(V2_MEMORY_EVENTS)
    (scope / "memory.peak").write_text("1234567\n")
    (scope / "memory.current").write_text("1000\n")
    (scope / "cgroup.procs").write_text("10\n11\n")
    (scope / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return root


def test_reader_v2_over_a_fake_root(tmp_path) -> None:
    root = _v2_root(tmp_path)
    layout = detect_layout(str(root))
    assert layout == Layout(2, str(root))
    cg = MemoryCgroup(layout, "/build.slice/b-1.scope")
    assert cg.limit() == 200 * 1024**2
    assert cg.oom_kills() == 1
    assert cg.peak() == 1234567
    assert cg.pids() == [10, 11]
    assert cg.populated()
    gone = MemoryCgroup(layout, "/build.slice/gone.scope")
    assert gone.oom_kills() is None and gone.peak() is None and not gone.populated()


def test_reader_v1_over_a_fake_root(tmp_path) -> None:
    root = tmp_path / "cg"
    scope = root / "memory" / "build.slice" / "b-1.scope"
    scope.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (scope / "memory.limit_in_bytes").write_text("104857600\n")
    (scope / "memory.oom_control").write_text(V1_OOM_CONTROL)
    (scope / "memory.max_usage_in_bytes").write_text("99999\n")
    (scope / "cgroup.procs").write_text("")
    layout = detect_layout(str(root))
    assert layout.version == 1 and layout.memory_key == "memory"
    cg = MemoryCgroup(layout, "/build.slice/b-1.scope")
    assert (cg.limit(), cg.oom_kills(), cg.peak(), cg.populated()) == (100 * 1024**2, 3, 99999, False)


def test_no_memory_controller(tmp_path) -> None:
    assert detect_layout(str(tmp_path)).version == 0


MOUNTINFO = (
    "30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw\n"
    "35 30 0:31 /process_api/abc/sandbox.1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "36 30 0:32 / /sys/fs/cgroup/with\\040space rw - cgroup2 cgroup2 rw\n"
)


def test_mountinfo_roots_and_paths_relative_to_them() -> None:
    roots = cgroup.parse_mountinfo_roots(MOUNTINFO)
    assert roots["/sys/fs/cgroup/memory"] == "/process_api/abc/sandbox.1"
    assert roots["/sys/fs/cgroup/with space"] == "/"
    layout = Layout(1, "/sys/fs/cgroup/memory", "/process_api/abc/sandbox.1")
    # a reader outside the container's cgroup namespace sees the full path
    assert layout.dir_of("/process_api/abc/sandbox.1/build.slice/x.scope") == "/sys/fs/cgroup/memory/build.slice/x.scope"
    # a reader inside it sees the path from the namespace root
    assert layout.dir_of("/build.slice/x.scope") == "/sys/fs/cgroup/memory/build.slice/x.scope"


def test_slice_cgroup_paths_nest_on_dashes() -> None:
    from buildgate.backends import slice_cgroup

    assert slice_cgroup("build.slice") == "build.slice"
    assert slice_cgroup("ci-builds.slice") == "ci.slice/ci-builds.slice"
    assert slice_cgroup("a-b-c.slice") == "a.slice/a-b.slice/a-b-c.slice"
    assert slice_cgroup("-.slice") == ""


def _v2_dir(tmp_path, **files: str):
    d = tmp_path / "cg"
    d.mkdir()
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(text)
    return str(d)


def test_v2_memory_blocked_by_processes_in_a_non_root_parent(tmp_path) -> None:
    """A container's namespace root: writable, has processes, memory not yet
    enabled for children -> cgroupfs cannot work there (EBUSY on +memory)."""
    from buildgate.backends import v2_memory_blocked

    busy = _v2_dir(tmp_path, cgroup_type="domain\n", cgroup_procs="1\n57\n",
                   cgroup_controllers="cpu io memory pids\n", cgroup_subtree_control="")
    why = v2_memory_blocked(busy)
    assert why is not None and "has processes of its own" in why and "cgroup_root" in why


def test_v2_memory_not_blocked_where_children_can_have_it(tmp_path) -> None:
    from buildgate.backends import v2_memory_blocked

    # already enabled for children
    (tmp_path / "a").mkdir()
    assert v2_memory_blocked(_v2_dir(tmp_path / "a", cgroup_type="domain\n", cgroup_procs="1\n",
                                     cgroup_controllers="memory\n", cgroup_subtree_control="memory pids\n")) is None
    # the real root (no cgroup.type) may always enable, processes or not
    (tmp_path / "b").mkdir()
    assert v2_memory_blocked(_v2_dir(tmp_path / "b", cgroup_procs="1\n", cgroup_controllers="memory\n",
                                     cgroup_subtree_control="")) is None
    # an empty delegated cgroup
    (tmp_path / "c").mkdir()
    assert v2_memory_blocked(_v2_dir(tmp_path / "c", cgroup_type="domain\n", cgroup_procs="",
                                     cgroup_controllers="memory\n", cgroup_subtree_control="")) is None


def test_v2_memory_blocked_when_the_parent_does_not_delegate_memory(tmp_path) -> None:
    from buildgate.backends import v2_memory_blocked

    why = v2_memory_blocked(_v2_dir(tmp_path, cgroup_type="domain\n", cgroup_procs="",
                                    cgroup_controllers="cpu pids\n", cgroup_subtree_control=""))
    assert why is not None and "memory controller is not available" in why


def test_mountinfo_unescaping_matches_the_old_regex() -> None:
    """cgroup.py unescapes by hand (re costs every build ~10 ms to import)."""
    import re

    from buildgate.cgroup import _unescape

    def old(field: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

    for field in ["plain", "with\\040space", "tab\\011", "\\134", "end\\04", "\\", "\\\\040",
                  "bad\\089", "\\040\\040x", "x\\0400", "\\12", ""]:
        assert _unescape(field) == old(field), field
