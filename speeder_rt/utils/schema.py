"""Typed settings: config dataclasses whose annotations say what each field allows, checked recursively.

A field is one line: its type (and range) in the annotation, its default after it::

    batch_size: PositiveInt = 64
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0

Annotations understood: ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``Literal[...]``,
``list[X]``, ``dict[str, X]``, nested config dataclasses, ``TypedDict`` s and ``Annotated[X, Range(...)]``.
Integers are never floats or booleans; a float field takes any finite number; ``null`` for a section that
is not optional means its defaults.

:func:`from_dict` builds a dataclass from a parsed YAML/JSON mapping, keys not given keeping their defaults,
and reports the first problem (an unknown key at any depth, a wrong type, a value out of range, a
dataclass's own cross-field check) as one :class:`ConfigError` naming the key path, the value and what is
allowed. :func:`check`, called from each config dataclass's ``__post_init__``, applies the same rules to
an object built in code (converting nested mappings to their dataclasses).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import math
import numbers
import re
import tokenize
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``Annotated[int, Range(ge=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(f"{op} {bound:g}" for op, bound in bounds if bound is not None)


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
DropoutRate = Annotated[float, Range(ge=0, lt=1)]


class ConfigError(ValueError):
    """A setting that is not allowed: ``<where>: <key path>: <problem>`` for a file's key (``run.yaml:
    train.batch_size: ...``), ``<owner>.<key path>: <problem>`` for an object built in code
    (``SplitConfig.history_len: ...``)."""

    def __init__(self, problem: str, keys: Sequence[str | int] = (), where: str = "", owner: str = "") -> None:
        self.problem, self.keys, self.where, self.owner = problem, tuple(keys), where, owner
        location = ".".join(part for part in (owner, _key_path(self.keys)) if part)
        super().__init__(": ".join(part for part in (where, location, problem) if part))

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.problem, self.keys, self.where, self.owner)


def _key_path(keys: Sequence[str | int]) -> str:
    """``("mpo", 1, "lr")`` -> ``mpo[1].lr``."""
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def invalid(obj: object, key: str, problem: str) -> ConfigError:
    """The error a ``__post_init__`` raises for a cross-field check on field ``key`` of ``obj``."""
    return ConfigError(problem, (key,), owner=type(obj).__name__)


def from_dict(cls: type, raw: Any, where: str = "", base: Any = None) -> Any:
    """``cls`` (a config dataclass) from the mapping ``raw``; keys not in ``raw`` keep the values of ``base``
    (default: the class defaults). Problems raise :class:`ConfigError` prefixed with ``where``."""
    try:
        return _value(cls, raw, (), base)
    except ConfigError as e:
        raise ConfigError(e.problem, e.keys, where) from None


def check(obj: object) -> None:
    """Check every field of dataclass ``obj`` against its annotation (converting in place where the
    annotation asks: an int into a float field, a mapping into a nested dataclass)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            converted = _value(hints[f.name], value, (f.name,), _base(f, None, value))
        except ConfigError as e:
            raise ConfigError(e.problem, e.keys, owner=type(obj).__name__) from None
        if converted is not value:
            object.__setattr__(obj, f.name, converted)  # frozen dataclasses too


class _NoFit(Exception):
    """``value`` does not fit the annotation at this key (reported by ``_value`` with the whole annotation)."""


def _value(tp: Any, value: Any, keys: tuple[str | int, ...], base: Any = None) -> Any:
    try:
        return _fit(tp, value, keys, base)
    except _NoFit:
        hint = ""
        if isinstance(value, str) and _base_type(tp) is float and _parses_as_float(value):
            hint = " (a string: YAML reads 1e-3 as text, write 1.0e-3)"
        raise ConfigError(f"expected {_describe(tp)}, got {_show(value)}{hint}", keys) from None


def _fit(tp: Any, value: Any, keys: tuple[str | int, ...], base: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        value = _fit(args[0], value, keys, base)
        if value is not None and any(value not in r for r in args[1:] if isinstance(r, Range)):
            raise _NoFit
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _fit(option, value, keys, base)
            except _NoFit:
                continue
        raise _NoFit
    if origin is Literal:
        if isinstance(value, str | int) and not isinstance(value, bool) and value in args:
            return value
        raise _NoFit
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _NoFit
        return [_value(args[0], v, (*keys, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _NoFit
        return {_value(args[0], k, keys): _value(args[1], v, (*keys, str(k))) for k, v in value.items()}
    if (dataclasses.is_dataclass(tp) or is_typeddict(tp)) and value is None:
        value = {}  # an empty YAML section (`train:` with every key commented out)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _NoFit
        return _build(tp, value, keys, base if isinstance(base, tp) else None)
    if is_typeddict(tp):
        if not isinstance(value, Mapping):
            raise _NoFit
        return _build_typed_dict(tp, value, keys, base)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _NoFit
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _NoFit
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _NoFit
    if tp is str:
        if isinstance(value, str):
            return value
        raise _NoFit
    raise TypeError(f"speeder_rt.utils.schema: unsupported annotation {tp!r}")


def _build(cls: type, raw: Mapping, keys: tuple[str | int, ...], base: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _refuse_unknown(raw, fields, keys)
    hints = _hints(cls)
    values = {name: _value(hints[name], v, (*keys, name), _base(fields[name], base, v)) for name, v in raw.items()}
    if base is None:
        for name, f in fields.items():
            if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {name!r}", keys)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError as e:  # a cross-field check of the dataclass (its keys are relative to it)
        raise ConfigError(e.problem, (*keys, *e.keys)) from None
    except ValueError as e:  # a check the dataclass delegates (attention.implementation_name)
        raise ConfigError(str(e), keys) from None


def _build_typed_dict(tp: type, raw: Mapping, keys: tuple[str | int, ...], base: Any) -> dict[str, Any]:
    hints = _hints(tp)
    _refuse_unknown(raw, hints, keys)
    out = {**(base or {}), **{name: _value(hints[name], v, (*keys, name)) for name, v in raw.items()}}
    missing = sorted(tp.__required_keys__ - set(out))
    if missing:
        raise ConfigError(f"missing required key {missing[0]!r}", keys)
    return out


def _refuse_unknown(raw: Mapping, known: Mapping[str, Any], keys: tuple[str | int, ...]) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}; allowed: {', '.join(known)}", keys)


def _base(f: dataclasses.Field, owner: Any, value: Any) -> Any:
    """What a section given in part (``value`` a mapping) takes its other keys from: the owner's current
    value, else the field's default (``data.split`` defaults to ``short_users: drop``, not SplitConfig's)."""
    if not isinstance(value, Mapping):
        return None
    if owner is not None:
        return getattr(owner, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _describe(tp: Any) -> str:
    """What annotation ``tp`` allows, in words: ``Annotated[int, Range(ge=1)]`` -> ``an integer >= 1``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        ranges = " and ".join(str(r) for r in args[1:] if isinstance(r, Range))
        return f"{_describe(args[0])} {ranges}".rstrip()
    if origin in (Union, types.UnionType):
        options = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    if dataclasses.is_dataclass(tp) or is_typeddict(tp):
        return f"a mapping with keys {', '.join(_hints(tp))}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, repr(tp))


def _plural(tp: Any) -> str:
    base = _base_type(tp)
    if dataclasses.is_dataclass(base) or is_typeddict(base) or get_origin(base) is dict:
        return "mappings"
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(
        base, "lists" if get_origin(base) is list else "values")


@dataclass(frozen=True)
class KeyDoc:
    """One key of a config schema: its path (``data.split.history_len``), what it allows (in words), its
    default (``MISSING`` when required), the comment on its line in the source and whether it holds a nested
    section (or a list of them) documented on its own."""

    path: str
    allowed: str
    default: Any
    note: str
    section: bool


@dataclass(frozen=True)
class SectionDoc:
    """One mapping of a config schema: its path (``""`` for the top level), the class docstring and its keys."""

    path: str
    doc: str
    keys: list[KeyDoc]


def schema_reference(cls: type, values: Any = None, path: str = "") -> list[SectionDoc]:
    """Every key of config dataclass / TypedDict ``cls``, section by section (nested sections after their parent,
    a list of sections as ``path[i]``). Defaults are read from ``values`` (an instance, or a mapping for a
    TypedDict) where given, else from the class, so a section whose owner sets other defaults shows those."""
    hints, notes = _hints(cls), _field_notes(cls)
    if dataclasses.is_dataclass(cls):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        names = list(fields)
    else:
        fields, names = {}, list(hints)
    own: list[KeyDoc] = []
    nested: list[SectionDoc] = []
    for name in names:
        if values is not None:
            default = values.get(name, dataclasses.MISSING) if isinstance(values, Mapping) else getattr(values, name)
        elif name in fields:
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        else:
            default = dataclasses.MISSING
        key = f"{path}.{name}" if path else name
        section, many = _section_type(hints[name])
        own.append(KeyDoc(key, _describe(hints[name]), default, notes.get(name, ""), section is not None))
        if section is not None:
            given = None if default is dataclasses.MISSING or default is None or many else default
            nested += schema_reference(section, given, f"{key}[i]" if many else key)
    doc = inspect.cleandoc(cls.__doc__ or "") if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
    return [SectionDoc(path, doc, own), *nested]


def _section_type(tp: Any) -> tuple[type | None, bool]:
    """The config class a field holds (unwrapping ``X | None`` and ``list[X]``) and whether it is a list of them."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _section_type(args[0])
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _section_type(options[0]) if len(options) == 1 else (None, False)
    if origin is list:
        inner, _ = _section_type(args[0])
        return inner, inner is not None
    return (tp, False) if dataclasses.is_dataclass(tp) or is_typeddict(tp) else (None, False)


_FIELD_LINE = re.compile(r"\s*(\w+)\s*:")


def _field_notes(cls: type) -> dict[str, str]:
    """The comment at the end of each field's line in the class body (``batch_size: int = 64  # the global batch``)."""
    try:
        lines = inspect.getsource(cls).splitlines(keepends=True)
    except (OSError, TypeError):
        return {}
    notes = {}
    for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if token.type == tokenize.COMMENT:
            match = _FIELD_LINE.match(lines[token.start[0] - 1])
            if match and token.start[1] > match.end():
                notes[match.group(1)] = token.string.lstrip("#").strip()
    return notes


def _base_type(tp: Any) -> Any:
    return _base_type(get_args(tp)[0]) if get_origin(tp) is Annotated else tp


def _parses_as_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
