"""The pure parts of `buildgate setup`: sizing, templates, keep/overwrite, manifest.

Whole runs (files on disk, systemd) are in tests/integration/test_setup.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from buildgate import setup
from buildgate._records import fields, replace
from buildgate.budget import parse_meminfo
from buildgate.config import Config, parse_config
from buildgate.errors import ConfigError, InternalFailure, UsageError
from buildgate.setup import (
    GONE,
    KEEP,
    OVERWRITE,
    REMOVE,
    UNCHANGED,
    UPDATE,
    WRITE,
    Manifest,
    compute_reserve,
    compute_sizing,
    decide_remove,
    decide_write,
    digest,
    memory_high,
    parse_capabilities,
    parse_manifest,
    parse_show,
    render,
    render_config,
    slice_ancestors,
    systemd_quote,
    unit_size,
)

M = 1024**2
G = 1024**3
REPO = Path(__file__).resolve().parents[2]


def meminfo(total: int, available: int | None) -> dict[str, int]:
    text = f"MemTotal:       {total // 1024} kB\nMemFree:        {(available or 0) // 2048} kB\n"
    if available is not None:
        text += f"MemAvailable:   {available // 1024} kB\n"
    text += "Buffers:        1024 kB\nCached:         2048 kB\nHugePages_Total:       0\n"
    return parse_meminfo(text)


# ---------------------------------------------------------------- sizing


def test_reserve_is_what_the_host_uses_now_plus_a_margin() -> None:
    # 8G host whose services use 3G: keep 3G + 3G/4, give builds the rest
    reserve, why = compute_reserve(meminfo(8 * G, 5 * G))
    assert reserve == 3 * G + 768 * M
    assert why == "in use now 3G + margin 768M"


def test_reserve_margin_is_at_least_512m() -> None:
    reserve, _ = compute_reserve(meminfo(16 * G, 12 * G - 400 * M))  # 4G + 400M in use
    assert reserve == 4 * G + 400 * M + (4 * G + 400 * M) // 4
    reserve, why = compute_reserve(meminfo(64 * G, 64 * G - 1 * G))  # 1G in use, floor 16G
    assert reserve == 16 * G and why.startswith("floor max(1G, MemTotal/4)")


def test_reserve_never_below_a_quarter_or_1g() -> None:
    assert compute_reserve(meminfo(8 * G, 8 * G))[0] == 2 * G  # nothing in use: MemTotal/4
    assert compute_reserve(meminfo(2 * G, 2 * G))[0] == 1 * G  # small host: 1G


def test_reserve_without_memavailable_uses_free_buffers_cached() -> None:
    info = meminfo(8 * G, None)
    assert "MemAvailable" not in info
    used = 8 * G - setup.available(info)
    assert compute_reserve(info)[0] == max(used + max(512 * M, used // 4), 2 * G)


def test_computed_budget_is_memtotal_minus_reserve_rounded_down_and_explained() -> None:
    s = compute_sizing(meminfo(8 * G, 5 * G))
    # 8G - 3.75G = 4.25G, a multiple of 64M already
    assert s.budget == 8 * G - (3 * G + 768 * M)
    assert s.how == "MemTotal 8G - reserve 3.8G"
    assert s.detail is not None and "in use now 3G + margin 768M" in s.detail
    assert "--reserve or --budget" in s.detail
    odd = compute_sizing(meminfo(8 * G - 12345 * 1024, 8 * G))
    assert odd.budget % (64 * M) == 0


@pytest.mark.parametrize(
    "kw, budget",
    [
        ({"budget": "5G"}, 5 * G),
        ({"budget": "50%"}, 4 * G),  # of MemTotal
        ({"reserve": "2G"}, 6 * G),
        ({"reserve": "25%"}, 6 * G),
        ({"config_budget": "3G", "config_source": "/etc/x"}, 3 * G),
        ({"remembered": 7 * G}, 7 * G),
        ({"budget": "5G", "config_budget": "3G"}, 5 * G),  # the option wins over the file
        ({"config_budget": "3G", "remembered": 7 * G}, 3 * G),  # the file wins over memory
    ],
)
def test_budget_sources_in_order(kw: dict, budget: int) -> None:
    s = compute_sizing(meminfo(8 * G, 6 * G), **kw)
    assert s.budget == budget
    assert s.detail is None


def test_budget_from_the_config_is_remembered_not_recomputed() -> None:
    s = compute_sizing(meminfo(8 * G, 6 * G), config_budget="3G", config_source="/etc/buildgate/buildgate.conf")
    assert s.remembered and s.how == "budget in /etc/buildgate/buildgate.conf"


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"budget": "9G"}, "more than MemTotal 8G"),
        ({"budget": "100M"}, "--budget 100M is less than 256M, too little for builds: give more"),
        ({"reserve": "8G"}, "--reserve 8G is all of MemTotal"),
        ({"reserve": "7.9G"}, "leaves builds less than 256M"),
        ({"budget": "lots"}, "invalid size 'lots'"),
        ({"reserve": "0"}, "invalid size '0'"),
    ],
)
def test_bad_budgets_are_usage_errors(kw: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=re.escape(needle)):
        compute_sizing(meminfo(8 * G, 6 * G), **kw)


def test_unused_host_leaves_no_room_is_an_error_with_the_fix() -> None:
    with pytest.raises(UsageError, match="free memory, or give --budget"):
        compute_sizing(meminfo(1 * G, 100 * M))


@pytest.mark.parametrize(
    "value, text",
    [(6 * G, "6G"), (5632 * M, "5632M"), (1536 * 1024, "1536K"), (1000, "1000"), (2 * 1024**4, "2T")],
)
def test_unit_size_is_exact(value: int, text: str) -> None:
    assert unit_size(value) == text
    assert setup.parse_size(text) == value


def test_memory_high_is_a_sixteenth_under_in_whole_mib() -> None:
    assert memory_high(6 * G) == 6 * G - 384 * M
    assert memory_high(300 * M) % M == 0 and memory_high(300 * M) < 300 * M


# ---------------------------------------------------------------- templates


def test_render_fills_placeholders_and_leaves_unit_names_alone() -> None:
    text = render("ExecStart=@BUILDGATE@ helper\n# see buildgate-helper@.service\n", {"BUILDGATE": "/x"})
    assert text == "ExecStart=/x helper\n# see buildgate-helper@.service\n"


def test_render_refuses_a_placeholder_without_value() -> None:
    with pytest.raises(InternalFailure, match="@GROUP@ has no value"):
        render("SocketGroup=@GROUP@\n", {})


def _template_names() -> list[str]:
    return sorted(os.listdir(REPO / "src" / "buildgate" / "templates"))


def test_the_package_templates_are_the_systemd_folder() -> None:
    """systemd/ is the source (what humans read and edit); the package carries
    copies because an installed buildgate has no checkout to read."""
    source = sorted(p.name for p in (REPO / "systemd").iterdir() if p.is_file())
    assert _template_names() == source, "run: cp systemd/* src/buildgate/templates/"
    for name in source:
        assert (REPO / "systemd" / name).read_bytes() == (REPO / "src/buildgate/templates" / name).read_bytes(), (
            f"systemd/{name} differs from its package copy: cp systemd/{name} src/buildgate/templates/"
        )


def test_templates_load_from_the_package() -> None:
    for name in (setup.T_SLICE, setup.T_SSHD, setup.T_SLICE_MIN, setup.T_CONFIG, setup.T_TMPFILES,
                 setup.T_SOCKET, setup.T_SERVICE):
        assert setup.load_template(name) == (REPO / "systemd" / name).read_text()


@pytest.mark.parametrize(
    "name, placeholders",
    [
        ("build.slice", {"MEMORY_MAX", "MEMORY_HIGH", "CPU_WEIGHT", "IO_WEIGHT", "TASKS_MAX"}),
        ("sshd-protect.conf", {"UNIT", "SLICE", "MEMORY_MIN"}),
        ("slice-protect.conf", {"UNIT", "MEMORY_MIN"}),
        ("buildgate.tmpfiles", {"STATE_DIR"}),
        ("buildgate-helper.socket", {"GROUP", "SOCKET"}),
        ("buildgate-helper@.service", {"BUILDGATE"}),
    ],
)
def test_each_template_has_the_placeholders_setup_fills(name: str, placeholders: set[str]) -> None:
    found = set(re.findall(r"@([A-Za-z_]+)@", setup.load_template(name)))
    assert found == placeholders


def test_the_slice_template_renders_to_a_unit_with_the_budget() -> None:
    text = render(setup.load_template("build.slice"), {
        "MEMORY_MAX": "6G", "MEMORY_HIGH": "5760M", "CPU_WEIGHT": 50, "IO_WEIGHT": 50, "TASKS_MAX": 8192})
    lines = text.splitlines()
    for want in ("MemoryMax=6G", "MemoryHigh=5760M", "MemorySwapMax=0", "CPUWeight=50", "IOWeight=50",
                 "TasksMax=8192", "[Slice]"):
        assert want in lines


def test_config_template_keys_are_config_keys() -> None:
    keys = set(re.findall(r"^@([a-z_]+)@$", setup.load_template("buildgate.conf"), re.M))
    assert keys <= set(setup.config_keys())
    assert {"budget", "slice", "state_dir"} <= keys


def test_rendered_config_parses_and_round_trips() -> None:
    cfg = replace(Config(), budget="5G", wait=300.0, legacy_lock="")
    text = render_config(setup.load_template("buildgate.conf"), cfg)
    back = parse_config(text, "/etc/buildgate/buildgate.conf")
    for key in setup.config_keys():
        assert getattr(back, key) == getattr(cfg, key), key
    assert 'budget = "5G"' in text.splitlines()
    assert 'slice = "build.slice"' in text.splitlines()  # always written
    assert "wait = 300" in text.splitlines() and 'legacy_lock = ""' in text.splitlines()
    assert "# cpu_weight = 50" in text.splitlines()  # default: commented out


def test_rendered_config_keeps_keys_the_template_does_not_know() -> None:
    cfg = replace(Config(), budget="1G", tasks_max=77)
    template = "@budget@\n@slice@\n@not_a_key@\n"
    text = render_config(template, cfg)
    assert "not_a_key" not in text
    assert "tasks_max = 77" in text
    assert parse_config(text, "x").tasks_max == 77


def test_defaults_render_as_comments_only() -> None:
    text = render_config(setup.load_template("buildgate.conf"), replace(Config(), budget="1G"))
    active = [ln.split(" = ")[0] for ln in text.splitlines() if ln and not ln.startswith("#")]
    names = {f.name for f in fields(Config)}
    assert set(active) == {"budget", "slice", "group"} & names


@pytest.mark.parametrize(
    "path, quoted",
    [("/usr/local/bin/buildgate", "/usr/local/bin/buildgate"),
     ("/opt/my tools/buildgate", '"/opt/my tools/buildgate"'),
     ("/opt/100%/buildgate", "/opt/100%%/buildgate")],
)
def test_systemd_quote(path: str, quoted: str) -> None:
    assert systemd_quote(path) == quoted


def test_buildgate_command_prefers_the_running_script(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "buildgate"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    python = tmp_path / "bin" / "python3"
    assert setup.buildgate_command(str(script), "/usr/bin/python3") == str(script)
    # run as `python -m buildgate`: the script next to that python
    assert setup.buildgate_command("/x/buildgate/__main__.py", str(python)) == str(script)


def test_buildgate_command_falls_back_to_python_m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert setup.buildgate_command("/x/__main__.py", str(tmp_path / "py")) == f"{tmp_path}/py -m buildgate"


@pytest.mark.parametrize(
    "name, ancestors",
    [("system.slice", ["system.slice"]), ("a-b-c.slice", ["a.slice", "a-b.slice", "a-b-c.slice"]),
     ("-.slice", []), ("ssh.service", [])],
)
def test_slice_ancestors(name: str, ancestors: list[str]) -> None:
    assert slice_ancestors(name) == ancestors


# ---------------------------------------------------------------- keep / overwrite


NEW = b"MemoryMax=6G\n"
OLD = b"MemoryMax=5G\n"
HAND = b"MemoryMax=5G\n# mine\n"


@pytest.mark.parametrize(
    "current, recorded, force, action",
    [
        (None, None, False, WRITE),  # missing
        (None, digest(OLD), False, WRITE),  # setup's, deleted by the operator: put back
        (NEW, None, False, UNCHANGED),  # already right (even if never recorded)
        (NEW, digest(OLD), False, UNCHANGED),
        (OLD, digest(OLD), False, UPDATE),  # still what setup wrote: update
        (HAND, digest(OLD), False, KEEP),  # edited by hand
        (HAND, digest(OLD), True, OVERWRITE),
        (OLD, None, False, KEEP),  # not setup's at all
        (OLD, None, True, OVERWRITE),
    ],
)
def test_decide_write(current: bytes | None, recorded: str | None, force: bool, action: str) -> None:
    assert decide_write(current, recorded, NEW, force) == action


@pytest.mark.parametrize(
    "current, force, action",
    [(None, False, GONE), (OLD, False, REMOVE), (HAND, False, KEEP), (HAND, True, REMOVE)],
)
def test_decide_remove(current: bytes | None, force: bool, action: str) -> None:
    assert decide_remove(current, digest(OLD), force) == action


def test_manifest_round_trips() -> None:
    m = Manifest(files={"/etc/a": digest(b"a")}, budget=6 * G, groups_created=["buildgate"],
                 sshd={"unit": "ssh.service", "pid": 42, "start": "123", "was": 0},
                 dirs_created=["/etc/buildgate"])
    assert parse_manifest(m.to_json(), "m") == m


@pytest.mark.parametrize("text", ["{", "[]", '{"version": 2}', '{"version": 1, "files": []}',
                                  '{"version": 1, "budget": -1}'])
def test_a_bad_manifest_is_a_config_error_with_the_fix(text: str) -> None:
    with pytest.raises(ConfigError, match="remove /etc/buildgate/.setup-manifest.json"):
        parse_manifest(text, "/etc/buildgate/.setup-manifest.json")


# ---------------------------------------------------------------- parsers


def test_parse_show_splits_units() -> None:
    text = "Id=ssh.service\nLoadState=loaded\n\nId=sshd.service\nLoadState=not-found\n"
    assert parse_show(text) == [{"Id": "ssh.service", "LoadState": "loaded"},
                                {"Id": "sshd.service", "LoadState": "not-found"}]


def test_parse_capabilities() -> None:
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n"
    caps = parse_capabilities(status)
    assert not caps >> setup.CAP_SYS_RESOURCE & 1
    assert caps >> 21 & 1  # CAP_SYS_ADMIN
    assert parse_capabilities("") == 0


# ---------------------------------------------------------------- refusals before anything is done


def test_a_live_setup_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setup.os, "geteuid", lambda: 1000)
    with pytest.raises(setup.PermissionProblem, match=r"run it as root \(sudo buildgate setup\), or with --dry-run"):
        setup.run_setup(setup.SetupOptions())


def test_a_live_setup_needs_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setup.os, "geteuid", lambda: 0)
    real_isdir = os.path.isdir
    monkeypatch.setattr(setup.os.path, "isdir", lambda p: False if p == "/run/systemd/system" else real_isdir(p))
    with pytest.raises(setup.Unavailable, match="systemd is not running here: .* use --root DIR"):
        setup.run_setup(setup.SetupOptions())


def test_root_mode_needs_neither(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 8388608 kB\nMemAvailable: 6291456 kB\n")
    monkeypatch.setattr("buildgate.cgroup.PROC_ROOT", str(tmp_path / "proc"))
    monkeypatch.setattr(setup.os, "geteuid", lambda: 1000)
    (tmp_path / "img").mkdir()
    report = setup.run_setup(setup.SetupOptions(root=str(tmp_path / "img"), budget="4G"))
    assert report.exit_code == 0
    assert (tmp_path / "img/etc/systemd/system/build.slice").is_file()
    assert report.lines[-1] == f"not run (--root {tmp_path}/img): systemctl, groupadd, systemd-tmpfiles"
