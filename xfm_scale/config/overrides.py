"""Dotted keys (``optim.lr``, ``vision.drop_path_rate``, ``zero_optimization.stage``): the one
walker and the one type coercion behind ``--set``, sweeps, ``model.overrides`` and
``deepspeed.overrides``.

YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string; a value is therefore coerced by the type
of the field it lands in, and a value that is not of that type is a :class:`ConfigError` naming
the key, not a ``TypeError`` deep inside a rank.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from xfm_scale.config.errors import ConfigError


def set_dotted(tree: dict, dotted: str, value: Any, merge: bool = False) -> None:
    """Set ``a.b.c`` in a nested dict. With ``merge`` (DeepSpeed overrides) a dict value is merged
    key by key into a dict already there, so ``{zero_optimization: {stage: 2}}`` changes the stage
    and keeps the section's other keys, as ``zero_optimization.stage: 2`` does."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    if merge and isinstance(value, dict) and isinstance(tree.get(leaf), dict):
        for key, inner in value.items():
            set_dotted(tree[leaf], key, inner, merge=True)
    else:
        tree[leaf] = value


def get_dotted(tree: Any, dotted: str, default: Any = None) -> Any:
    """``a.b.c`` of a nested dict, or ``default`` where a part is missing."""
    node = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return default if node is None else node


def coerce(key: str, value: Any, annotation: str) -> Any:
    """``value`` as the type ``annotation`` names (a dataclass field's annotation, as a string):
    numbers from YAML strings (``"1e-4"``), ints to floats, lists to float tuples; a value of
    another type raises a ConfigError naming ``key``."""
    base = annotation.split("|")[0].strip()
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}=null: a value is required ({base})")
    if base in ("float", "int"):
        return _number(key, value, base)
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not true or false")
        return value
    if base.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not a list")
        return tuple(_number(key, v, "float") for v in value)
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} is not a string")
    return value


def _number(key: str, value: Any, kind: str) -> float | int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} is not a number")
    if kind == "float":
        return float(value)
    if float(value) != int(value):
        raise ConfigError(f"{key}={value!r} is not a whole number")
    return int(value)


def set_field(root: Any, dotted: str, value: Any, what: str = "config key") -> None:
    """Set the dataclass field ``dotted`` under ``root`` to ``value`` coerced to the field's type."""
    *parents, leaf = dotted.split(".")
    obj = root
    for part in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise ConfigError(f"unknown {what} {dotted!r}")
        obj = getattr(obj, part)
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if leaf not in fields:
        raise ConfigError(f"unknown {what} {dotted!r}" + (f"; known keys there: {', '.join(sorted(fields))}"
                                                         if fields else ""))
    setattr(obj, leaf, coerce(dotted, value, str(fields[leaf].type)))
