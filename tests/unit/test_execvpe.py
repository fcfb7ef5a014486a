"""runner._execvpe (os.execvpe without its import of warnings) against os.execvpe,
in real forked processes over real PATH directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from buildgate.runner import _execvpe


def _outcome(fn, file: str, env: dict[str, str]) -> tuple[str, int]:
    """Run fn(file, argv, env) in a fork; (stdout, exit code) or the errno it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.dup2(w, 1)
        try:
            fn(file, [file, "hi"], env)
        except OSError as exc:
            os.write(1, f"errno {exc.errno}".encode())
        os._exit(99)
    os.close(w)
    with os.fdopen(r) as fh:
        out = fh.read()
    _, status = os.waitpid(pid, 0)
    return out, os.waitstatus_to_exitcode(status)


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, str]:
    made = {}
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        made[name] = str(tmp_path / name)
    script = "#!/bin/sh\necho ran {} \"$1\"\n"
    (tmp_path / "b" / "tool").write_text(script.format("b"))
    (tmp_path / "b" / "tool").chmod(0o755)
    (tmp_path / "a" / "tool").write_text(script.format("a-not-executable"))
    (tmp_path / "a" / "tool").chmod(0o644)
    (tmp_path / "c" / "only-here").write_text(script.format("c"))
    (tmp_path / "c" / "only-here").chmod(0o644)
    (tmp_path / "file").write_text("")
    made["file"] = str(tmp_path / "file")
    return made


@pytest.mark.parametrize("file, path", [
    ("tool", "b"), ("tool", "a:b"), ("tool", "c"), ("only-here", "a:c"), ("only-here", "c:b"),
    ("missing", "a:b"), ("tool", "file:b"), ("tool", ""), ("sh", None), ("/bin/sh", "a"),
    ("./nope", "b"),
])
def test_it_finds_and_fails_exactly_like_os_execvpe(dirs: dict[str, str], file: str, path: str | None) -> None:
    env = {"PATH": ":".join(dirs.get(p, p) for p in path.split(":"))} if path is not None else {}
    ours = _outcome(_execvpe, file, env)
    theirs = _outcome(os.execvpe, file, env)
    assert ours == theirs
    # the cases do differ: some ran a script, some failed, and with which errno
    if (file, path) == ("tool", "a:b"):
        assert ours == ("ran b hi\n", 0)
    if (file, path) == ("only-here", "a:c"):
        assert ours == ("errno 13", 99)
    if (file, path) == ("sh", None):  # no PATH at all: os.defpath
        assert ours[1] != 99  # sh ran (and failed to open a script "hi")
