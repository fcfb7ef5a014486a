"""buildgate._records must behave like dataclasses for what buildgate uses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from buildgate import _records


def _make(mod):
    @mod.dataclass(frozen=True)
    class Frozen:
        a: int
        b: str = "x"
        c: tuple = mod.field(default_factory=tuple)
        d: bool = mod.field(default=False, compare=False)

    @mod.dataclass
    class Mutable:
        a: int
        b: int | None = None

    return Frozen, Mutable


@pytest.mark.parametrize("mod", [dataclasses, _records], ids=["dataclasses", "records"])
def test_same_behaviour(mod):
    Frozen, Mutable = _make(mod)
    f = Frozen(1)
    assert (f.a, f.b, f.c, f.d) == (1, "x", (), False)
    assert Frozen(1, "y").b == "y"
    assert Mutable(1).b is None
    assert Frozen(1, d=True) == Frozen(1, d=False)  # compare=False
    assert Frozen(1) != Frozen(2)
    assert hash(Frozen(1, "z")) == hash(Frozen(1, "z"))
    with pytest.raises(AttributeError):
        f.a = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Frozen()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Frozen(1, nope=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Frozen(1, a=1)  # type: ignore[misc]
    g = _records.replace(f, b="q")
    assert (g.a, g.b) == (1, "q") and f.b == "x"
    assert [x.name for x in _records.fields(Frozen)] == ["a", "b", "c", "d"]
    assert (mod.asdict if mod is dataclasses else _records.asdict)(Frozen(3)) == {"a": 3, "b": "x", "c": (), "d": False}
    m = Mutable(1)
    m.b = 5
    assert m == Mutable(1, 5) and repr(m).endswith(".Mutable(a=1, b=5)")
    with pytest.raises(TypeError):
        hash(m)


def test_records_module_does_not_import_dataclasses():
    code = "import sys, buildgate.runner, buildgate.queue, buildgate.config; print('dataclasses' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
