"""``Config``: the whole memopt configuration, loaded from YAML with dotted overrides.

A YAML file has one mapping per section (``optimizer``, ``sharding``, ``activations``,
``checkpoint``, ``model``, ``data``, ``train``); missing sections and keys take their defaults.
``Config.from_yaml(path, overrides=["optimizer.lr=3e-4", "train.steps=50"])`` applies each
override on the parsed mapping before the sections are built, so an override is validated
exactly like the file (``model.overrides.hidden_size=256`` reaches into a mapping field). The
value text is read as YAML (``[0.9, 0.95]``, ``null``, ``true``) and then coerced to the field's
type. Files and overrides read numbers as YAML 1.2 (``010`` is 10, ``1e-5`` a float), and a
string key keeps its text as written (``checkpoint.directory=0123`` is ``"0123"``): see
``memopt.config._yaml``. ``to_yaml()`` writes a file ``from_yaml`` reads back to an equal
``Config``.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from memopt.config._fields import did_you_mean, plain, section_from_dict
from memopt.config._yaml import load_document, load_value
from memopt.config.sections import (
    ActivationsConfig,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ShardingConfig,
    TrainConfig,
)

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optimizer": OptimizerConfig,
    "sharding": ShardingConfig,
    "activations": ActivationsConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass(frozen=True)
class Config:
    """Everything ``memopt.setup`` and ``memopt run`` need; see docs/config.md."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"Config.{name} must be a {cls.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")
        opt, sh = self.optimizer, self.sharding
        if opt.in_backward and (sh.stage or sh.offload != "none" or sh.master_dtype != "auto"):
            raise ValueError("optimizer.in_backward runs without sharding/offload/master "
                             "weights; set sharding.stage: 0, sharding.offload: none and "
                             "sharding.master_dtype: auto, or in_backward: false")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None,
                  overrides: Sequence[str] = ()) -> Config:
        """Build from a nested mapping (what YAML gives), after applying ``overrides``."""
        data = _deep_copy(dict(data or {}))
        if not isinstance(data, dict):
            raise ValueError(f"a memopt config is a mapping of sections, got {data!r}")
        if isinstance(overrides, str):
            raise TypeError(f"overrides is a list of 'key=value' strings, got the string "
                            f"{overrides!r}; pass [{overrides!r}]")
        for name, value in data.items():
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"config section {name!r} must be a mapping of keys, got "
                                 f"{value!r} (an empty section is {{}} or nothing)")
        for item in overrides:
            apply_override(data, item)
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}"
                             f"{did_you_mean(unknown, SECTIONS)}; the sections are: "
                             f"{', '.join(SECTIONS)}")
        built = {name: section_from_dict(sc, data.get(name) or {}, name)
                 for name, sc in SECTIONS.items()}
        return cls(**built)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
        """Load a YAML file (see the module docstring)."""
        with open(path) as f:
            try:
                data = load_document(f, is_text_key)  # YAML 1.2 numbers, strings as written
            except yaml.YAMLError as e:
                raise ValueError(f"{os.fspath(path)}: not valid YAML: {e}") from None
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(f"{os.fspath(path)}: a memopt config is a mapping of sections")
        return cls.from_dict(data, overrides)

    @classmethod
    def from_deepspeed(cls, cfg: Mapping[str, Any] | str | os.PathLike[str],
                       base: Config | None = None) -> Config:
        """``base`` (default ``Config()``) with a DeepSpeed JSON config's relevant blocks."""
        from memopt.config.deepspeed import config_from_deepspeed

        return config_from_deepspeed(cfg, base or cls())

    def replace(self, overrides: Sequence[str]) -> Config:
        """A copy with dotted ``key=value`` overrides applied."""
        return Config.from_dict(self.to_dict(), overrides)

    # -- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = plain(self)
        return out

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The config as YAML text (also written to ``path`` when given)."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


#: Mappings whose keys are module names (``model.layers.0``): an override
#: ``activations.policies.model.layers.0=recompute`` sets the key ``model.layers.0``.
DOTTED_KEY_MAPPINGS = frozenset({("activations", "policies")})


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in nested ``data`` (the value parsed as YAML)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value (e.g. optimizer.lr=3e-4)")
    parts = key.split(".")
    if len(parts) < 2:
        raise ValueError(f"override {item!r}: name a section and a key, e.g. train.steps=50; "
                         f"the sections are: {', '.join(SECTIONS)}")
    if tuple(parts[:2]) in DOTTED_KEY_MAPPINGS and len(parts) > 3:
        parts = [*parts[:2], ".".join(parts[2:])]  # a module name: dots belong to the key
    try:
        value = load_value(text, is_text_key(*parts)) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section or mapping")
        node = child
    node[parts[-1]] = value


def is_text_key(*path: Any) -> bool:
    """Whether ``section.key`` is a string field (``str`` or ``str | None``), whose YAML value
    is kept as written (memopt.config._yaml)."""
    if len(path) != 2 or path[0] not in SECTIONS:
        return False
    hints = typing.get_type_hints(SECTIONS[path[0]])
    return hints.get(str(path[1])) in (str, str | None)


def field_docs() -> dict[str, list[dataclasses.Field[Any]]]:
    """Section name -> its dataclass fields (for the reference generator)."""
    return {name: list(dataclasses.fields(cls)) for name, cls in SECTIONS.items()}
