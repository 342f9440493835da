"""Typed, self-validating configuration dataclasses for the ROS-free core.

Every tunable of the core lives in a ``@dataclass`` deriving from :class:`ConfigBase`. Fields are
declared with :func:`param`, which records the description, the valid range or choices and whether
the value may change while running. The node layer (``effvla_ros.nodes.param_bridge``) turns each
field into a ROS parameter one-to-one (same name, type, range, description, read-only flag), so a
``ros2 param set`` is validated by exactly the same code as a Python caller.

``ConfigBase.__post_init__`` checks every field against its metadata and raises ``ValueError``
naming the field; subclasses add cross-field checks in ``validate()``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any, TypeVar

T = TypeVar("T", bound="ConfigBase")

_MISSING: Any = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    *,
    description: str,
    min: float | None = None,  # noqa: A002 - mirrors ROS descriptor vocabulary
    max: float | None = None,  # noqa: A002
    step: float | None = None,
    choices: Sequence[Any] | None = None,
    read_only: bool = False,
    default_factory: Any = _MISSING,
) -> Any:
    """A dataclass field with validation metadata.

    ``min``/``max`` are inclusive bounds (for lists: bounds of each element); ``choices`` the allowed
    values; ``read_only`` fields cannot change after start (they need a restart: model, device, ...).
    Lists must use ``default_factory``.
    """
    meta = {
        "description": description,
        "min": min,
        "max": max,
        "step": step,
        "choices": tuple(choices) if choices is not None else None,
        "read_only": read_only,
    }
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use default_factory for mutable defaults")
    return field(default=default, metadata=meta)


def _check_scalar(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    if isinstance(value, bool):
        pass
    elif isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: must be finite, got {value!r}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise ValueError(f"{name}: {value!r} is below the minimum {lo!r}")
        if hi is not None and value > hi:
            raise ValueError(f"{name}: {value!r} is above the maximum {hi!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {list(choices)!r}")


@dataclasses.dataclass
class ConfigBase:
    """Base of every core config: range/choice checks from field metadata, then ``validate()``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not f.metadata:
                continue
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    _check_scalar(f"{f.name}[{i}]", v, f.metadata)
            else:
                _check_scalar(f.name, value, f.metadata)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ``ValueError('<field>: <reason>')``."""

    # -- helpers used by nodes, the CLI and tests -------------------------------------------
    @classmethod
    def field_meta(cls) -> dict[str, dict[str, Any]]:
        return {f.name: dict(f.metadata) for f in dataclasses.fields(cls) if f.metadata}

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with ``changes`` applied (raises ``ValueError`` naming the field)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown parameter of {type(self).__name__}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any], *, strict: bool = True) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if strict and unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown parameter of {cls.__name__}")
        return cls(**{k: v for k, v in values.items() if k in names})
