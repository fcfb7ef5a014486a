"""buildgate.systemd loads pystemd.dbuslib with two stand-ins (see _lean_import):
they must not leak, and the x2char_star stand-in must agree with pystemd's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = r"""
import sys
from buildgate.systemd import _dbuslib
m = _dbuslib()
assert "pystemd.dbuslib" in sys.modules and hasattr(m, "DBus"), "no dbuslib"
assert "pprint" not in sys.modules and "pystemd.utils" not in sys.modules, sorted(sys.modules)
import pprint, pystemd.utils                       # the real ones, afterwards
assert hasattr(pprint, "pprint") and pystemd.utils.__file__.endswith("utils.py")
from buildgate.systemd import _x2char_star, _pformat
from pathlib import Path
for value in (b"a", "é", Path("/x/y"), 5, True, None):
    for convert_all in (False, True):
        assert _x2char_star(value, convert_all) == pystemd.utils.x2char_star(value, convert_all), (value, convert_all)
assert _pformat({"a": [1, 2]}) == pprint.pformat({"a": [1, 2]})
print("ok")
"""


def test_the_lean_dbuslib_import_leaves_no_stand_in_behind() -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
