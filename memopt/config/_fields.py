"""Typed fields for the config sections: documented defaults, coercion from YAML/CLI text.

Every section is a frozen dataclass whose fields are made with ``opt(default, doc)``: the doc
string goes into ``dataclasses.field(metadata=...)``, where the reference generator
(``memopt.config.reference``) reads it. ``coerce(value, annotation, key)`` turns what YAML or a
``key=value`` override gives into the field's type:

- ``int``/``float``: numbers, numeric strings (``"3e-4"``, ``"10"``: decimal) and, for fields
  marked ``size=True``, byte sizes such as ``"64MiB"``; text with ``_`` (``"2024_11_24"``),
  hex or ``1:30`` forms is refused (YAML 1.1 would read those as other numbers);
- ``bool``: ``true/false/yes/no/1/0``;
- ``Literal[...]``: one of the listed values (numbers compared after coercion);
- ``X | None``: ``None``/``null``/``none`` or an ``X``;
- ``tuple[T, ...]`` / ``tuple[T, U]``: lists (or comma-separated text);
- ``dict[str, T]``: mappings, values coerced.

A wrong value raises ``ValueError`` naming the dotted key, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}  # fmt: skip
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
#: YAML 1.2 (core schema) numbers: decimal integers (``010`` is ten, not octal eight) and
#: floats with or without a dot (``1e-5``); memopt.config._yaml reads plain scalars with these.
YAML12_INT = re.compile(r"^[-+]?[0-9]+$")
YAML12_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


def opt(default: Any, doc: str, *, size: bool = False) -> Any:
    """A documented dataclass field (``size=True``: ints also accept ``"64MiB"``)."""
    meta = {"doc": doc, "size": size}
    if isinstance(default, (dict, list)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_size(text: str) -> int:
    """``"64MiB"`` -> 67108864; ``"1e9"`` -> 10**9; raises ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a byte size (use e.g. 67108864, '64MiB', '2GB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def yaml12_number(text: str) -> int | float | None:
    """``text`` as a YAML 1.2 number (``"1e-5"`` -> 1e-05, ``"010"`` -> 10), else None."""
    t = text.strip()
    if YAML12_INT.match(t):
        return int(t)
    if YAML12_FLOAT.match(t):
        return float(t.replace(".", "", 1) if t.lower().lstrip("+-").startswith((".inf", ".nan"))
                     else t)
    return None


def numbers_in(value: Any) -> Any:
    """``value`` with every string that is a YAML 1.2 number made that number, in nested
    mappings and lists too (``model.overrides``: a mapping of ``Any``, never coerced by type)."""
    if isinstance(value, str):
        number = yaml12_number(value)
        return value if number is None else number
    if isinstance(value, Mapping):
        return {k: numbers_in(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers_in(v) for v in value]
    return value


def _fail(key: str, value: Any, wanted: str) -> ValueError:
    return ValueError(f"config key {key!r}: {value!r} is not {wanted}")


def _is_optional(ann: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) < len(typing.get_args(ann)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
    return False, ann


def describe_type(ann: Any) -> str:
    """A short human spelling of an annotation, for docs and errors."""
    optional, inner = _is_optional(ann)
    if optional:
        return f"{describe_type(inner)} or null"
    origin = typing.get_origin(ann)
    if origin is Literal:
        return " \\| ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(ann))
    if origin is tuple:
        args = typing.get_args(ann)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {describe_type(args[0])}"
        return "[" + ", ".join(describe_type(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {describe_type(typing.get_args(ann)[1])}"
    if ann is Any:
        return "any"
    return getattr(ann, "__name__", str(ann))


def _scalar(value: Any, ann: type, key: str, size: bool) -> Any:
    if ann is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _fail(key, value, "a boolean (true/false)")
    if ann is int:
        if isinstance(value, bool):
            raise _fail(key, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and "_" not in value:  # (int("2024_11_24") is 20241124)
            try:
                if size:
                    return parse_size(value)
                return int(float(value)) if _intlike(value) else int(value)
            except ValueError:
                pass
        if size:
            raise _fail(key, value, "a byte size such as 67108864 or '64MiB'")
        raise _fail(key, value, "an integer (decimal digits, no '_')" if isinstance(value, str)
                    else "an integer")
    if ann is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and "_" in value:  # (float("1_0.5") is 10.5)
            raise _fail(key, value, "a number (no '_')")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _fail(key, value, "a number") from None
    if ann is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _fail(key, value, "a string")
    if ann is Any:
        return value
    raise TypeError(f"config key {key!r}: unsupported annotation {ann!r}")


def _intlike(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False


def coerce(value: Any, ann: Any, key: str, *, size: bool = False) -> Any:
    """``value`` converted to annotation ``ann`` (see the module docstring)."""
    optional, inner = _is_optional(ann)
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return coerce(value, inner, key, size=size)
    origin = typing.get_origin(ann)
    if origin is Literal:
        choices = typing.get_args(ann)
        for c in choices:
            try:
                if _scalar(value, type(c), key, False) == c:
                    return c
            except ValueError:
                continue
        raise ValueError(f"config key {key!r}: {value!r} is not one of {list(choices)}")
    if origin is tuple:
        return _tuple(value, typing.get_args(ann), key)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(key, value, "a mapping")
        vt = typing.get_args(ann)[1]
        return {str(k): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    return _scalar(value, ann, key, size)


def _tuple(value: Any, args: tuple[Any, ...], key: str) -> tuple[Any, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise _fail(key, value, "a list")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise _fail(key, value, f"a list of {len(args)} items")
    pairs = enumerate(zip(value, args, strict=True))
    return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)


def did_you_mean(unknown: list[str], valid: Any) -> str:
    """`` (did you mean 'lr'?)`` for the first unknown name with a close valid one, else ''."""
    for name in unknown:
        close = difflib.get_close_matches(name, list(valid), n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


def section_from_dict(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Build section dataclass ``cls`` from ``data``; unknown keys raise listing the valid ones."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config section {prefix!r} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = [f"{prefix}.{k}" for k in unknown]
        raise ValueError(
            f"unknown config key(s) {names}{did_you_mean(unknown, fields)}; the keys of "
            f"{prefix!r} are: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}"
        size = fields[name].metadata.get("size", False)
        kwargs[name] = coerce(value, hints[name], key, size=size)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"config section {prefix!r}: {e}") from None


def plain(value: Any) -> Any:
    """A section (or value) as YAML-safe plain data: tuples become lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def check_fields(section: Any, prefix: str) -> None:
    """Coerce every field of a (frozen) section to its annotation in place: direct Python
    construction is validated the same way as YAML (lists become tuples, "3e-4" a float)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = coerce(
            getattr(section, f.name), hints[f.name], f"{prefix}.{f.name}",
            size=f.metadata.get("size", False),
        )  # fmt: skip
        object.__setattr__(section, f.name, value)


def positive(section: Any, prefix: str, *names: str, zero_ok: bool = False) -> None:
    """Raise ValueError naming ``prefix.name`` for each listed number that is not > 0 (>= 0)."""
    for name in names:
        v = getattr(section, name)
        if v is None:
            continue
        if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
            bound = ">= 0" if zero_ok else "> 0"
            raise ValueError(f"config key '{prefix}.{name}' must be finite and {bound}, got {v!r}")
