"""How memopt reads YAML (recipe files and the values of ``key=value`` overrides).

PyYAML follows YAML 1.1, whose numbers surprise in a config: ``010`` is octal 8, ``2024_11_24``
the integer 20241124, ``0x1f`` 31, ``1:30`` 90 (base 60), while ``1e-5`` (no dot) is a string
and ``2024-11-24`` a date. ``ConfigLoader`` (a ``SafeLoader``) reads numbers as YAML 1.2 does
instead: decimal integers (``010`` is 10) and floats with or without a dot (``1e-5``); the
other forms stay text, which an integer key then refuses by name (``memopt.config._fields``).
Booleans stay YAML 1.1's (``yes``/``on`` are true), there are no dates, and a key given twice
in one mapping is an error (plain YAML keeps the last one silently).

A string key (``checkpoint.directory``, ``model.init_from``, ``sharding.nvme_path``, ...) keeps
its value as written whatever it looks like: ``directory: 1.10`` is ``"1.10"`` (the float would
give ``"1.1"``) and ``directory: 0123`` is ``"0123"``. ``load_document`` does this from the YAML
nodes, ``load_value`` for an override's text; which keys are strings, the caller says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

import yaml

from memopt.config._fields import YAML12_FLOAT, YAML12_INT

_TAG = "tag:yaml.org,2002:"
_NOT_TEXT = (_TAG + "str", _TAG + "null")  # plain scalars whose value is not their text


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 numbers, no dates, and unique keys (module docstring)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); "
                    "keep one", key_node.start_mark)  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _decimal_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    try:
        return int(text)  # decimal: "010" is 10 (SafeLoader's would be octal 8)
    except ValueError:  # (an explicit !!int tag on text that is not a decimal integer)
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a decimal integer", node.start_mark) from None


_YAML11 = (_TAG + "int", _TAG + "float", _TAG + "timestamp")
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_TAG + "int", YAML12_INT, list("-+0123456789"))
ConfigLoader.add_implicit_resolver(_TAG + "float", YAML12_FLOAT, list("-+0123456789."))
ConfigLoader.add_constructor(_TAG + "int", _decimal_int)


def _compose(stream: str | IO[str]) -> tuple[yaml.Node | None, Any]:
    loader = ConfigLoader(stream)
    try:
        node = loader.get_single_node()
        return node, (None if node is None else loader.construct_document(node))
    finally:
        loader.dispose()


def _written(node: yaml.Node) -> str | None:
    """The text of a plain scalar YAML read as a number or boolean (else None)."""
    if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag not in _NOT_TEXT:
        return str(node.value)
    return None


def load_document(stream: str | IO[str], is_text: Callable[[str, str], bool]) -> Any:
    """A config file's data; ``is_text(section, key)`` names the string keys, whose plain
    scalars keep their written text (module docstring)."""
    node, data = _compose(stream)
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        return data
    for section_node, body in node.value:
        section = data.get(section_node.value)
        if not isinstance(body, yaml.MappingNode) or not isinstance(section, dict):
            continue
        for key_node, value_node in body.value:
            text = _written(value_node)
            if text is not None and is_text(section_node.value, key_node.value):
                section[key_node.value] = text
    return data


def load_value(text: str, is_text: bool) -> Any:
    """An override's value: YAML (``[0.9, 0.95]``, ``null``, ``1e-5``), or, for a string key
    (``is_text``), the written text of a scalar YAML would read as a number or boolean."""
    node, value = _compose(text)
    written = _written(node) if is_text and node is not None else None
    return value if written is None else written
