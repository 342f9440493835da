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
from effvla_ros.nodes.compat import parameter_type_code

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


_WORDS = {
    ParameterType.PARAMETER_NOT_SET: "no value",
    ParameterType.PARAMETER_BOOL: "a boolean (true/false)",
    ParameterType.PARAMETER_INTEGER: "an integer",
    ParameterType.PARAMETER_DOUBLE: "a number",
    ParameterType.PARAMETER_STRING: "a string",
    ParameterType.PARAMETER_BYTE_ARRAY: "a list of bytes",
    ParameterType.PARAMETER_BOOL_ARRAY: "a list of booleans",
    ParameterType.PARAMETER_INTEGER_ARRAY: "a list of integers",
    ParameterType.PARAMETER_DOUBLE_ARRAY: "a list of numbers",
    ParameterType.PARAMETER_STRING_ARRAY: "a list of strings",
}
_ARRAY_TYPES = {ParameterType.PARAMETER_BYTE_ARRAY, *_ARRAY.values()}


def _type_words(ptype: int) -> str:
    return _WORDS.get(ptype, f"parameter type {ptype}")


def convert(pname: str, ptype: int, elem: type, is_list: bool, p: Parameter) -> Any:
    """The Python value of ``p`` for a field of ROS type ``ptype`` (element type ``elem``), converted the way
    people type values: an integer (list) for a float (list) field, and an empty list of any type for any
    list field (``ros2 param dump`` writes ``[]``, which reads back as a bool or byte array). Raises
    ValueError naming the parameter, the expected and the given type in words."""
    got = parameter_type_code(p)  # int(p.type_) fails on Jazzy/Humble (plain Enum)
    value = p.value
    if got == ptype:
        if is_list:
            return [elem(v) for v in value]
        return float(value) if elem is float else value
    if is_list and got in _ARRAY_TYPES and len(value) == 0:
        return []
    if elem is float and got == ParameterType.PARAMETER_INTEGER and not is_list:
        return float(value)
    if elem is float and got == ParameterType.PARAMETER_INTEGER_ARRAY and is_list:
        return [float(v) for v in value]
    shown = "" if got == ParameterType.PARAMETER_NOT_SET else f" {value!r}"
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        shown = f" {list(value)!r}"
    raise ValueError(f"{pname}: expected {_type_words(ptype)}, got {_type_words(got)}{shown}")


def _declare(node: Node, pname: str, default: Any, meta: dict[str, Any], ptype: int, elem: type,
             is_list: bool) -> Any:
    """Declare one parameter (rclpy's public API only) and return its value, its override applied and converted.

    Declared with dynamic typing, so that whatever a parameter file or ``-p`` gives reaches :func:`convert`
    (rclpy's own type check refuses an integer for a float, and ``[]``, with only type codes as the reason);
    the converted value is then stored with the field's type, and the descriptor ends up with that type
    (``ros2 param describe``), the field's range and its read-only flag.
    """
    desc = _descriptor(pname, meta, ptype, elem, read_only=False)
    desc.dynamic_typing = True
    initial: Any = list(default) if is_list else default
    if is_list and not initial:
        initial = None  # declared without a value; the typed empty list is stored below
    try:
        p = node.declare_parameter(pname, initial, desc)
    except ParameterException as e:  # e.g. outside the declared range
        raise ValueError(f"invalid parameter {pname}: {e}") from None
    if p.type_ == Parameter.Type.NOT_SET:
        value: Any = list(default) if is_list else default
    else:
        try:
            value = convert(pname, ptype, elem, is_list, p)
        except ValueError as e:  # a parameter file / -p of the wrong type: refuse to start, say why
            raise ValueError(f"invalid parameter {e}") from None
    if p.type_ != Parameter.Type(ptype) or (is_list and p.value is None):
        node.set_parameters([Parameter(pname, Parameter.Type(ptype), value)])
    final = _descriptor(pname, meta, ptype, elem)
    final.dynamic_typing = True  # the type check is convert()'s, with a reason in words
    final.type = ptype
    try:
        node.set_descriptor(pname, final)
    except ParameterException as e:  # the converted value outside the declared range
        raise ValueError(f"invalid parameter {pname}: {e}") from None
    return value


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
            values[f.name] = _declare(node, pname, getattr(cfg, f.name), dict(f.metadata), ptype, elem, is_list)
        try:
            self.config: C = cfg.replace(**values)
        except ValueError as e:  # bad parameter file / command line: refuse to start, name the field
            raise ValueError(f"invalid parameter {prefix}{e}") from None
        if hasattr(node, "add_pre_set_parameters_callback"):  # Iron+: store converted values with the field's type
            node.add_pre_set_parameters_callback(self._canonical)
        node.add_on_set_parameters_callback(self._validate)
        if hasattr(node, "add_post_set_parameters_callback"):
            node.add_post_set_parameters_callback(self._apply)
            self._apply_in_validate = False
        else:  # Humble: no post-set callback; apply after successful validation
            self._apply_in_validate = True

    # -- conversion --------------------------------------------------------------------------
    def _convert(self, name: str, p: Parameter) -> Any:
        ptype, elem, is_list = self._fields[name]
        return convert(self._prefix + name, ptype, elem, is_list, p)

    def _mine(self, params: list[Parameter]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in params:
            if p.name.startswith(self._prefix) and p.name[len(self._prefix):] in self._fields:
                out[p.name[len(self._prefix):]] = p
        return out

    # -- callbacks ---------------------------------------------------------------------------
    def _canonical(self, params: list[Parameter]) -> list[Parameter]:
        """Pre-set: an integer for a float field, an untyped empty list, ... become the field's type (what
        ``ros2 param get`` / ``dump`` then show); values that do not convert pass unchanged and are
        rejected with the reason in :meth:`_validate`."""
        out: list[Parameter] = []
        for p in params:
            name = p.name[len(self._prefix):] if p.name.startswith(self._prefix) else None
            if name in self._fields and p.type_ != Parameter.Type.NOT_SET:
                ptype = self._fields[name][0]
                try:
                    value = self._convert(name, p)
                except ValueError:
                    out.append(p)
                    continue
                p = Parameter(p.name, Parameter.Type(ptype), value)
            out.append(p)
        return out

    def _validate(self, params: list[Parameter]) -> SetParametersResult:
        mine = self._mine(params)
        if not mine:
            return SetParametersResult(successful=True)
        changes: dict[str, Any] = {}
        for name, p in mine.items():
            try:
                changes[name] = self._convert(name, p)
            except ValueError as e:
                self._restore_types(mine)
                return SetParametersResult(successful=False, reason=str(e))
        try:
            new = self.config.replace(**changes)
        except ValueError as e:
            self._restore_types(mine)
            return SetParametersResult(successful=False, reason=f"{self._prefix}{e}")
        if self.check is not None:
            try:
                self.check(new)
            except ValueError as e:
                self._restore_types(mine)
                return SetParametersResult(successful=False, reason=str(e))
        if self._apply_in_validate:
            self._commit(new, set(changes))
        return SetParametersResult(successful=True)

    def _restore_types(self, mine: dict[str, Any]) -> None:
        """A rejected set must leave ``ros2 param describe`` as it was: rclpy writes the type of the value
        tried into a dynamically typed parameter's descriptor before the on-set callbacks run."""
        for name in mine:
            desc = self._node.describe_parameter(self._prefix + name)
            desc.type = self._fields[name][0]

    def _apply(self, params: list[Parameter]) -> None:
        mine = self._mine(params)
        if not mine:
            return
        changes = {name: self._convert(name, p) for name, p in mine.items()}
        self._commit(self.config.replace(**changes), set(changes))

    def _commit(self, new: C, changed: set[str]) -> None:
        with self._lock:
            self.config = new
        if self._on_change is not None:
            self._on_change(new, changed)
