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


# -- the parsed-config cache (real files; the ownership cases need root) -------

def _setup_cache(tmp_path, monkeypatch: pytest.MonkeyPatch, text: str = 'budget = "3G"\nwait = 60\n'):
    conf = tmp_path / "buildgate.conf"
    conf.write_text(text)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o755)
    cache = cache_dir / "config.cache"
    monkeypatch.setenv("BUILDGATE_CONFIG_CACHE", str(cache))
    return conf, cache


def _tomllib_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import buildgate.config as config

    calls: list[str] = []
    real = config.parse_toml
    monkeypatch.setattr(config, "parse_toml", lambda text, path: calls.append(path) or real(text, path))
    return calls


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root writes the cache; tests/run runs as root")


@needs_root
def test_root_parses_once_then_reads_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, cache = _setup_cache(tmp_path, monkeypatch)
    calls = _tomllib_calls(monkeypatch)
    first = load_config(str(conf))
    assert cache.exists() and calls == [str(conf)]
    second = load_config(str(conf))
    assert calls == [str(conf)], "the second load parsed the TOML again"
    assert first == second and second.budget == "3G" and second.wait == 60 and second.source == str(conf)


@needs_root
def test_any_edit_of_the_file_is_seen_at_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, cache = _setup_cache(tmp_path, monkeypatch)
    load_config(str(conf))
    st = conf.stat()
    conf.write_text('budget = "4G"\nwait = 60\n')  # same size, and the same mtime below
    os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_config(str(conf)).budget == "4G"
    conf.write_text('budget = "4G"\nwait = "soon"\n')
    with pytest.raises(ConfigError, match="wait must be"):
        load_config(str(conf))
    other = tmp_path / "other.conf"
    other.write_text('budget = "4G"\nwait = 60\n')  # the cached text, another file
    assert load_config(str(other)).source == str(other)


@needs_root
def test_a_cache_that_root_does_not_own_alone_is_ignored(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, cache = _setup_cache(tmp_path, monkeypatch)
    load_config(str(conf))
    forged = cache.read_text().replace('"value.budget": "3G"', '"value.budget": "1T"')
    assert forged != cache.read_text()
    calls = _tomllib_calls(monkeypatch)
    for attack in ("chown", "chmod-file", "chmod-dir", "symlink"):
        cache.unlink(missing_ok=True)
        if attack == "symlink":
            (tmp_path / "elsewhere").write_text(forged)
            cache.symlink_to(tmp_path / "elsewhere")
        else:
            cache.write_text(forged)
        if attack == "chown":
            os.chown(cache, 65534, 65534)
        if attack == "chmod-file":
            cache.chmod(0o666)
        if attack == "chmod-dir":
            cache.parent.chmod(0o777)
        assert load_config(str(conf)).budget == "3G", attack
        cache.parent.chmod(0o755)
    assert len(calls) == 4
    cache.unlink()
    cache.write_text(forged)  # the same forgery, trusted: proves the cases above were refused for trust
    assert load_config(str(conf)).budget == "1T"


@needs_root
def test_a_corrupt_or_unwritable_cache_only_means_parsing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, cache = _setup_cache(tmp_path, monkeypatch)
    for junk in ("", "{", "[1]", '{"path": 3}', "\x00\xff"):
        cache.write_text(junk)
        assert load_config(str(conf)).budget == "3G", junk
    monkeypatch.setenv("BUILDGATE_CONFIG_CACHE", str(conf / "not-a-dir" / "config.cache"))
    assert load_config(str(conf)).budget == "3G"


def test_non_root_never_writes_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, cache = _setup_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert load_config(str(conf)).budget == "3G"
    assert not cache.exists()
