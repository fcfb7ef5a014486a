from __future__ import annotations

import os

import pytest

from buildgate.budget import Budget, default_reserve, parse_meminfo, resolve_budget
from buildgate.config import Config, load_config, parse_config
from buildgate.errors import ConfigError

G = 1024**3


def test_defaults_when_the_default_file_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BUILDGATE_CONFIG", raising=False)
    monkeypatch.setattr("buildgate.config.DEFAULT_PATH", "/nonexistent/buildgate.conf")
    cfg = load_config()
    assert cfg == Config()
    # the documented defaults (docs/config.md), pinned: the seed's `flock -w 900`,
    # the slice setup writes, the queue on tmpfs, the seed's lock file
    assert cfg.wait == 900 and cfg.slice == "build.slice" and cfg.state_dir == "/run/buildgate"
    assert cfg.legacy_lock == "/var/lock/vps-build.lock" and cfg.backend == "auto" and cfg.budget is None
    assert cfg.cpu_weight < 100 and cfg.io_weight < 100  # below services' default weight


def test_a_full_config_parses() -> None:
    cfg = parse_config(
        'budget = "6G"\nslice = "ci.slice"\nstate_dir = "/var/lib/bg"\nlegacy_lock = ""\n'
        "wait = 60\ncpu_weight = 20\nio_weight = 30\ntasks_max = 100\nstop_timeout = 2.5\n",
        "/etc/x.conf",
    )
    assert cfg.budget == "6G" and cfg.slice == "ci.slice" and cfg.legacy_lock == ""
    assert cfg.wait == 60 and cfg.stop_timeout == 2.5 and cfg.source == "/etc/x.conf"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("budget = ", "not valid TOML"),
        ("budgett = '1G'", "unknown key 'budgett'"),
        ("budget = 5", "budget must be a str"),
        ("budget = 'lots'", "budget: it is not a number"),
        ("slice = 'build'", "ending in .slice"),
        ("state_dir = 'relative'", "absolute path"),
        ("wait = -1", "wait must be >= 0"),
        ("cpu_weight = 0", "between 1 and 10000"),
        ("tasks_max = true", "tasks_max must be a int"),
        ("legacy_lock = 'x.lock'", "legacy_lock must be an absolute path"),
    ],
)
def test_invalid_config_names_the_file_and_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "/etc/buildgate/buildgate.conf")
    assert needle in str(err.value)
    assert str(err.value).startswith("config /etc/buildgate/buildgate.conf: ")
    assert "\n" not in str(err.value)


def test_explicit_missing_or_unreadable_config_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.conf"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    bad = tmp_path / "bin.conf"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(bad))


def test_env_points_at_the_config(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.conf"
    path.write_text('budget = "1G"\n')
    monkeypatch.setenv("BUILDGATE_CONFIG", str(path))
    assert load_config().budget == "1G"


def test_budget_prefers_the_smaller_of_config_and_slice() -> None:
    cfg = Config(budget="4G", source="c")
    assert resolve_budget(cfg, 8 * G, 3 * G) == Budget(3 * G, "MemoryMax of build.slice, below the budget in c")
    assert resolve_budget(cfg, 8 * G, 5 * G).bytes == 4 * G
    assert resolve_budget(cfg, 8 * G, None).bytes == 4 * G
    assert resolve_budget(Config(), 8 * G, 5 * G).bytes == 5 * G
    assert resolve_budget(Config(budget="50%"), 8 * G, None).bytes == 4 * G


def test_derived_budget_keeps_a_reserve_for_the_host() -> None:
    assert resolve_budget(Config(), 8 * G, None).bytes == 6 * G
    assert default_reserve(2 * G) == G
    assert resolve_budget(Config(), 2 * G, None).bytes == G


def test_parse_meminfo() -> None:
    info = parse_meminfo("MemTotal:        8039212 kB\nMemFree:  100 kB\nHugePages_Total:       0\n")
    assert info["MemTotal"] == 8039212 * 1024
    assert info["HugePages_Total"] == 0
    assert os.path.exists("/proc/meminfo")
