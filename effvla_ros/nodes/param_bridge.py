"""One-to-one mapping of a core config dataclass onto ROS 2 parameters.

``ConfigParameters(node, cfg, prefix)`` declares one ROS parameter per dataclass field (same name
behind an optional prefix, same type, description, range, choices, read-only flag), builds the
initial config from the declared values (parameter files and ``--ros-args -p`` overrides) and keeps
it current: a ``ros2 param set`` is validated by the config's own ``__post_init__`` (the rejection
reason names the field) and, when accepted, applied through ``on_change`` on the next cycle.
This follows demo_nodes_py: validate in the on-set callback, apply in the post-set callback.
Only rclpy's public parameter API is used (declare / undeclare / set / set_descriptor).
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


def _descriptor(name: str, meta: dict[str, Any], ptype: int, elem: type, *,
                read_only: bool | None = None) -> ParameterDescriptor:
    """The parameter's descriptor from its field metadata (``read_only`` None: the field's flag)."""
    desc = ParameterDescriptor(name=name, type=ptype, description=meta.get("description", ""))
    desc.read_only = bool(meta.get("read_only", False)) if read_only is None else read_only
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


def _declare(node: Node, pname: str, default: Any, meta: dict[str, Any], ptype: int, elem: type,
             is_list: bool) -> Parameter:
    """Declare one parameter (rclpy's public API only) and return it, its override applied.

    Two cases need more than ``declare_parameter``:

    * an empty list default cannot carry its element type (rclpy would declare a byte array): the parameter is
      declared by its type alone and, without an override, set to an empty list of that type; a read-only one
      is declared writable for this and made read-only after (``set_descriptor``);
    * an integer override of a float parameter (``-p rate:=0``, ``rate: 0`` in YAML) is rejected by rclpy's
      type check: it is read back through a dynamically typed declaration, which is then undeclared, and
      the parameter is declared with the override as a float (``ignore_override``).
    """
    read_only = bool(meta.get("read_only", False))
    typed_empty = is_list and not default
    initial: Any = Parameter.Type(ptype) if typed_empty else (list(default) if is_list else default)
    try:  # declare_parameter writes the inferred type into the descriptor: each call gets a fresh one
        p = node.declare_parameter(pname, initial, _descriptor(pname, meta, ptype, elem,
                                                               read_only=read_only and not typed_empty))
    except ParameterException as e:  # an override from a file / the command line is invalid
        value = _float_of_integer_override(node, pname) if elem is float else None
        if value is None:
            raise ValueError(f"invalid parameter {pname}: {e}") from None
        try:
            p = node.declare_parameter(pname, value, _descriptor(pname, meta, ptype, elem), ignore_override=True)
        except ParameterException as e2:
            raise ValueError(f"invalid parameter {pname}: {e2}") from None
    if typed_empty and p.type_ == Parameter.Type.NOT_SET:  # no override: an empty, typed list
        p = Parameter(pname, Parameter.Type(ptype), [])
        node.set_parameters([p])
    if read_only and not node.describe_parameter(pname).read_only:
        node.set_descriptor(pname, _descriptor(pname, meta, ptype, elem))
    return p


def _float_of_integer_override(node: Node, pname: str) -> float | list[float] | None:
    """The override of ``pname`` as a float (list) when it is an integer (list), else None; read through a
    dynamically typed declaration of ``pname``, undeclared again."""
    probe = node.declare_parameter(pname, None, ParameterDescriptor(name=pname, dynamic_typing=True))
    node.undeclare_parameter(pname)
    if probe.type_ == Parameter.Type.INTEGER:
        return float(probe.value)
    if probe.type_ == Parameter.Type.INTEGER_ARRAY and len(probe.value) > 0:
        return [float(v) for v in probe.value]
    return None


class ConfigParameters(Generic[C]):
    """Declares ``cfg``'s fields as parameters of ``node`` and keeps ``self.config`` current."""

    def __init__(
        self,
        node: Node,
        cfg: C,
        *,
        prefix: str = "",
        on_change: Callable[[C, set[str]], None] | None = None,
        check: Callable[[C], None] | None = None,
    ) -> None:
        """``check(new_config)`` (optional) validates a live change beyond the config's own rules (e.g. what the
        stage backend supports); a ValueError rejects the ``ros2 param set`` with its message as the reason."""
        self._node = node
        self.check = check
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
            p = _declare(node, pname, getattr(cfg, f.name), dict(f.metadata), ptype, elem, is_list)
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
        if self.check is not None:
            try:
                self.check(new)
            except ValueError as e:
                return SetParametersResult(successful=False, reason=str(e))
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
