"""One-to-one mapping of a core config dataclass onto ROS 2 parameters.

``ConfigParameters(node, cfg, prefix)`` declares one ROS parameter per dataclass field (same name
behind an optional prefix, same type, description, range, choices, read-only flag), builds the
initial config from the declared values (parameter files and ``--ros-args -p`` overrides) and keeps
it current: a ``ros2 param set`` is validated by the config's own ``__post_init__`` (the rejection
reason names the field) and, when accepted, applied through ``on_change`` on the next cycle.
This follows demo_nodes_py: validate in the on-set callback, apply in the post-set callback.
"""
from __future__ import annotations

import dataclasses
import threading
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.exceptions import ParameterException
from rclpy.node import Node
from rclpy.parameter import Parameter

from effvla_ros.core.params import ConfigBase

C = TypeVar("C", bound=ConfigBase)

_SCALAR = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}
_ARRAY = {
    bool: ParameterType.PARAMETER_BOOL_ARRAY,
    int: ParameterType.PARAMETER_INTEGER_ARRAY,
    float: ParameterType.PARAMETER_DOUBLE_ARRAY,
    str: ParameterType.PARAMETER_STRING_ARRAY,
}


def _ros_type(tp: Any) -> tuple[int, type, bool]:
    """(ParameterType, python element type, is_list) for a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return _ARRAY[elem], elem, True
    return _SCALAR[tp], tp, False


def _descriptor(name: str, meta: dict[str, Any], ptype: int, elem: type) -> ParameterDescriptor:
    desc = ParameterDescriptor(name=name, type=ptype, description=meta.get("description", ""))
    desc.read_only = bool(meta.get("read_only", False))
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None:
        desc.additional_constraints = "one of: " + ", ".join(str(c) for c in choices)
    if lo is not None and hi is not None and elem in (int, float) and ptype in (
        ParameterType.PARAMETER_INTEGER,
        ParameterType.PARAMETER_DOUBLE,
    ):
        if elem is int:
            desc.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=int(meta.get("step") or 1))]
        else:
            desc.floating_point_range = [
                FloatingPointRange(from_value=float(lo), to_value=float(hi), step=float(meta.get("step") or 0.0))
            ]
    elif lo is not None or hi is not None:
        bound = f"min {lo}" if hi is None else (f"max {hi}" if lo is None else f"[{lo}, {hi}]")
        desc.additional_constraints = (desc.additional_constraints + "; " if desc.additional_constraints else "") + bound
    return desc


class ConfigParameters(Generic[C]):
    """Declares ``cfg``'s fields as parameters of ``node`` and keeps ``self.config`` current."""

    def __init__(
        self,
        node: Node,
        cfg: C,
        *,
        prefix: str = "",
        on_change: Callable[[C, set[str]], None] | None = None,
    ) -> None:
        self._node = node
        self._prefix = prefix
        self._on_change = on_change
        self._lock = threading.Lock()
        self._fields: dict[str, tuple[int, type, bool]] = {}
        hints = typing.get_type_hints(type(cfg))
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cfg):
            if not f.metadata:
                continue
            ptype, elem, is_list = _ros_type(hints[f.name])
            self._fields[f.name] = (ptype, elem, is_list)
            pname = prefix + f.name
            default = getattr(cfg, f.name)
            # An empty list cannot carry its element type (rclpy would declare a byte array): declare
            # the type alone, then (without an override) set an empty list of that type.
            initial: Any = (list(default) if default else Parameter.Type(ptype)) if is_list else default
            overrides = getattr(node, "_parameter_overrides", {})
            ov = overrides.get(pname)
            if elem is float and ov is not None and ov.type_ in (Parameter.Type.INTEGER, Parameter.Type.INTEGER_ARRAY):
                # `-p rate:=0` or `rate: 0` in YAML for a float parameter: accept it as 0.0
                vals = [float(x) for x in ov.value] if is_list else float(ov.value)
                overrides[pname] = Parameter(pname, Parameter.Type.DOUBLE_ARRAY if is_list else Parameter.Type.DOUBLE,
                                             vals)
            try:
                node.declare_parameter(pname, initial, _descriptor(pname, dict(f.metadata), ptype, elem))
            except ParameterException as e:  # an override from a file / the command line is invalid
                raise ValueError(f"invalid parameter {pname}: {e}") from None
            p = node.get_parameter_or(pname, Parameter(pname, Parameter.Type.NOT_SET, None))
            if is_list and p.type_ == Parameter.Type.NOT_SET:  # no override: an empty, typed list
                p = Parameter(pname, Parameter.Type(ptype), [])
                if f.metadata.get("read_only"):  # set_parameters refuses read-only ones: initialize directly
                    node._parameters[pname] = p
                else:
                    node.set_parameters([p])
            values[f.name] = self._from_ros(f.name, p.value)
        try:
            self.config: C = cfg.replace(**values)
        except ValueError as e:  # bad parameter file / command line: refuse to start, name the field
            raise ValueError(f"invalid parameter {prefix}{e}") from None
        node.add_on_set_parameters_callback(self._validate)
        if hasattr(node, "add_post_set_parameters_callback"):
            node.add_post_set_parameters_callback(self._apply)
            self._apply_in_validate = False
        else:  # Humble: no post-set callback; apply after successful validation
            self._apply_in_validate = True

    # -- conversion --------------------------------------------------------------------------
    def _from_ros(self, name: str, value: Any) -> Any:
        _, elem, is_list = self._fields[name]
        if is_list:
            return [elem(v) for v in (value or [])]
        if elem is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def _mine(self, params: list[Parameter]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in params:
            if p.name.startswith(self._prefix) and p.name[len(self._prefix):] in self._fields:
                out[p.name[len(self._prefix):]] = p
        return out

    # -- callbacks ---------------------------------------------------------------------------
    def _validate(self, params: list[Parameter]) -> SetParametersResult:
        mine = self._mine(params)
        if not mine:
            return SetParametersResult(successful=True)
        changes: dict[str, Any] = {}
        for name, p in mine.items():
            ptype, elem, _ = self._fields[name]
            if p.type_ == Parameter.Type.INTEGER and ptype == ParameterType.PARAMETER_DOUBLE:
                changes[name] = float(p.value)
            elif int(p.type_) != ptype:
                return SetParametersResult(
                    successful=False,
                    reason=f"{self._prefix}{name}: expected {Parameter.Type(ptype).name.lower()}, got {p.type_.name.lower()}",
                )
            else:
                changes[name] = self._from_ros(name, p.value)
        try:
            new = self.config.replace(**changes)
        except ValueError as e:
            return SetParametersResult(successful=False, reason=f"{self._prefix}{e}")
        if self._apply_in_validate:
            self._commit(new, set(changes))
        return SetParametersResult(successful=True)

    def _apply(self, params: list[Parameter]) -> None:
        mine = self._mine(params)
        if not mine:
            return
        changes = {name: self._from_ros(name, p.value) for name, p in mine.items()}
        self._commit(self.config.replace(**changes), set(changes))

    def _commit(self, new: C, changed: set[str]) -> None:
        with self._lock:
            self.config = new
        if self._on_change is not None:
            self._on_change(new, changed)
