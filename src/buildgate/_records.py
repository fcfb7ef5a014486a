"""A small stand-in for ``dataclasses`` on the hot path.

Every ``buildgate run`` (and every build waiting in the queue) imports the
modules that define buildgate's records.  ``import dataclasses`` pulls in
``inspect``, ``ast``, ``dis`` and ``tokenize`` and then compiles code for every
class: about 2.7 MiB of RSS in each waiting process and ~10 ms per build (see
docs/benchmarks.md).  The records need only the basics, so they get them here:
keyword/positional ``__init__`` with defaults and default factories, ``frozen``,
``__eq__`` (fields with ``compare=False`` left out), ``__hash__`` for frozen
records, ``__repr__``, and ``replace``/``asdict``/``fields``.

Type checkers see the real ``dataclasses`` (the ``TYPE_CHECKING`` import in
each module), so constructor calls are checked exactly as before; the unit
tests check that both behave alike.

For the same reason no hot-path module imports ``typing`` at run time (it
imports ``re``, ``contextlib`` and more: ~7 ms per build): each has
``TYPE_CHECKING = False`` of its own, which type checkers read as true, and
imports ``Any``, ``Callable``... under it; annotations are never evaluated
(``from __future__ import annotations``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:
    from typing import Any, Callable

_MISSING: Any = object()


class Field:
    __slots__ = ("name", "default", "default_factory", "compare")

    def __init__(self, default: Any = _MISSING, default_factory: Any = _MISSING,
                 compare: bool = True) -> None:
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.compare = compare


def field(*, default: Any = _MISSING, default_factory: Any = _MISSING, compare: bool = True) -> Any:
    return Field(default, default_factory, compare)


def _own_annotations(cls: type) -> list[str]:
    return list(cls.__dict__.get("__annotations__", {}))


def dataclass(cls: type | None = None, *, frozen: bool = False) -> Any:
    def wrap(cls: type) -> type:
        specs: dict[str, Field] = {}
        for base in reversed(cls.__mro__[1:]):
            specs.update(getattr(base, "__record_fields__", {}))
        for name in _own_annotations(cls):
            value = cls.__dict__.get(name, _MISSING)
            spec = value if isinstance(value, Field) else Field(default=value)
            spec.name = name
            specs[name] = spec
            if isinstance(value, Field):
                if value.default is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, value.default)
        names = tuple(specs)
        compared = tuple(n for n, s in specs.items() if s.compare)
        required = [n for n, s in specs.items() if s.default is _MISSING and s.default_factory is _MISSING]
        setter: Callable[[Any, str, Any], None] = object.__setattr__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__}() takes {len(names)} positional arguments")
            for name, value in zip(names, args):
                if name in kwargs:
                    raise TypeError(f"{cls.__name__}() got multiple values for {name!r}")
                kwargs[name] = value
            unknown = set(kwargs) - specs.keys()
            if unknown:
                raise TypeError(f"{cls.__name__}() got unexpected keyword(s) {sorted(unknown)}")
            missing = [n for n in required if n not in kwargs]
            if missing:
                raise TypeError(f"{cls.__name__}() missing required argument(s) {missing}")
            for name, spec in specs.items():
                if name in kwargs:
                    value = kwargs[name]
                elif spec.default_factory is not _MISSING:
                    value = spec.default_factory()
                else:
                    value = spec.default
                setter(self, name, value)
            post = getattr(self, "__post_init__", None)
            if post is not None:
                post()

        def __repr__(self: Any) -> str:
            inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
            return f"{type(self).__qualname__}({inner})"

        def __eq__(self: Any, other: Any) -> Any:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return all(getattr(self, n) == getattr(other, n) for n in compared)

        cls.__init__ = __init__  # type: ignore[misc]
        cls.__repr__ = __repr__  # type: ignore[assignment,method-assign]
        cls.__eq__ = __eq__  # type: ignore[assignment,method-assign]
        cls.__record_fields__ = specs  # type: ignore[attr-defined]
        if frozen:
            def __setattr__(self: Any, name: str, value: Any) -> None:
                raise AttributeError(f"cannot assign to field {name!r} of frozen {cls.__name__}")

            def __hash__(self: Any) -> int:
                return hash(tuple(getattr(self, n) for n in compared))

            cls.__setattr__ = __setattr__  # type: ignore[assignment,method-assign]
            cls.__delattr__ = __setattr__  # type: ignore[assignment,method-assign]
            cls.__hash__ = __hash__  # type: ignore[assignment,method-assign]
        else:
            cls.__hash__ = None  # type: ignore[assignment]  # as dataclasses: eq without frozen
        return cls

    return wrap if cls is None else wrap(cls)


def fields(obj: Any) -> tuple[Any, ...]:
    if not hasattr(obj, "__record_fields__"):  # a real dataclass (off the hot path)
        import dataclasses

        return dataclasses.fields(obj)
    return tuple(obj.__record_fields__.values())


def replace(obj: Any, **changes: Any) -> Any:
    if not hasattr(obj, "__record_fields__"):
        import dataclasses

        return dataclasses.replace(obj, **changes)
    values = {n: getattr(obj, n) for n in obj.__record_fields__}
    values.update(changes)
    return type(obj)(**values)


def asdict(obj: Any) -> dict[str, Any]:
    """Shallow: buildgate's records hold plain values only."""
    return {n: getattr(obj, n) for n in obj.__record_fields__}
