from __future__ import annotations

import re

import pytest

from buildgate.errors import UsageError
from buildgate.runner import check_name, default_name

_VALID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@pytest.mark.parametrize("name", ["web", "a", "x" * 64, "my-site_2.0:prod", "x" * 65, "", "a b",
                                  "ünïcode", "a/b", "name\n", "a\x00", "..", "-"])
def test_check_name_accepts_exactly_a_unit_name_part(name: str) -> None:
    if _VALID.fullmatch(name):
        assert check_name(name) == name
    else:
        with pytest.raises(UsageError, match="invalid --name"):
            check_name(name)


@pytest.mark.parametrize("argv0, expected", [
    ("npx", "npx"), ("./node_modules/.bin/vite", "vite"), ("/usr/bin/my tool", "my_tool"),
    ("ünï", "_n_"), ("a" * 50, "a" * 40), ("dir/", "build"),
])
def test_default_name_is_the_command_made_safe(argv0: str, expected: str) -> None:
    assert default_name([argv0, "x"]) == expected
    assert _VALID.fullmatch(default_name([argv0]))
