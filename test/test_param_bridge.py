"""effvla_ros.nodes.param_bridge in process (no spinning, no second process): declarations through rclpy's public
API only, integer overrides of float parameters, empty typed lists, read-only fields, invalid overrides.

The parameter services, seen from another process, are tested in test_foundation_ros.py.
"""
from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")

from rcl_interfaces.msg import ParameterType  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from effvla_ros.core.params import ConfigBase, param  # noqa: E402
from effvla_ros.nodes.param_bridge import ConfigParameters  # noqa: E402

BRIDGE = Path(__file__).resolve().parents[1] / "effvla_ros" / "nodes" / "param_bridge.py"


@dataclass
class Cfg(ConfigBase):
    rate: float = param(0.5, description="rate", min=0.0, max=10.0)
    gains: list[float] = param(description="gains", default_factory=list)
    names: list[str] = param(description="names", read_only=True, default_factory=list)
    scale: float = param(1.0, description="scale", read_only=True)
    cams: list[str] = param(description="cameras", read_only=True, default_factory=lambda: ["scene"])


@pytest.fixture
def make(context):
    nodes: list[Node] = []

    def make(overrides: Sequence[Parameter] = (), **kw) -> tuple[Node, ConfigParameters]:
        node = Node(f"bridge_{len(nodes)}", context=context, parameter_overrides=list(overrides))
        nodes.append(node)
        return node, ConfigParameters(node, Cfg(), **kw)

    yield make
    for n in nodes:
        n.destroy_node()


def test_defaults_are_declared_typed_and_read_only_as_the_fields(make):
    changes: list[set[str]] = []
    node, cp = make(on_change=lambda cfg, names: changes.append(names))
    assert cp.config == Cfg()
    types = {n: node.describe_parameter(n).type for n in ("rate", "gains", "names", "scale", "cams")}
    assert types == {"rate": ParameterType.PARAMETER_DOUBLE, "gains": ParameterType.PARAMETER_DOUBLE_ARRAY,
                     "names": ParameterType.PARAMETER_STRING_ARRAY, "scale": ParameterType.PARAMETER_DOUBLE,
                     "cams": ParameterType.PARAMETER_STRING_ARRAY}
    # the empty lists hold a value of their element type (not NOT_SET, not a byte array)
    assert node.get_parameter("gains").type_ == Parameter.Type.DOUBLE_ARRAY and node.get_parameter("gains").value == []
    assert node.get_parameter("names").type_ == Parameter.Type.STRING_ARRAY
    assert [node.describe_parameter(n).read_only for n in ("rate", "gains", "names", "scale", "cams")] == [
        False, False, True, True, True]
    assert not node.set_parameters([Parameter("names", Parameter.Type.STRING_ARRAY, ["x"])])[0].successful
    assert node.get_parameter("names").value == []
    assert node.set_parameters([Parameter("gains", Parameter.Type.DOUBLE_ARRAY, [1.0, 2.0])])[0].successful
    assert cp.config.gains == [1.0, 2.0] and changes == [{"gains"}]
    rng = node.describe_parameter("rate").floating_point_range[0]
    assert (rng.from_value, rng.to_value) == (0.0, 10.0)


def test_integer_overrides_of_float_parameters_become_floats(make):
    node, cp = make([Parameter("rate", value=3), Parameter("gains", value=[1, 2]), Parameter("scale", value=2),
                     Parameter("names", value=["a"])])
    assert cp.config.rate == 3.0 and isinstance(cp.config.rate, float)
    assert cp.config.gains == [1.0, 2.0] and cp.config.scale == 2.0 and cp.config.names == ["a"]
    assert node.get_parameter("rate").type_ == Parameter.Type.DOUBLE
    assert node.get_parameter("gains").type_ == Parameter.Type.DOUBLE_ARRAY
    assert node.describe_parameter("scale").read_only and node.describe_parameter("names").read_only
    assert node.describe_parameter("rate").floating_point_range  # the range survives the re-declaration


@pytest.mark.parametrize("override", [Parameter("rate", value=30), Parameter("rate", value="fast"),
                                      Parameter("rate", value=30.0)])
def test_invalid_overrides_refuse_with_the_parameter_name(make, override):
    with pytest.raises(ValueError, match="invalid parameter rate"):
        make([override])


def test_bridge_writes_no_private_attribute_of_another_object():
    """Only rclpy's public API: no ``obj._name`` other than the bridge's own (``self._...``)."""
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    tree = ast.parse(BRIDGE.read_text())
    found = {ast.unparse(n) for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and private(n.attr)
             and not (isinstance(n.value, ast.Name) and n.value.id == "self")}
    found |= {ast.unparse(n) for n in ast.walk(tree)  # getattr(node, "_x", ...), setattr, hasattr
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("getattr", "setattr",
                                                                                            "hasattr")
              and len(n.args) > 1 and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)
              and private(n.args[1].value)}
    assert sorted(found) == []


def test_live_integers_for_float_parameters_are_converted(make):
    """`ros2 param set /node rate 3`: an integer for a float parameter is taken as 3.0 and stored as a double."""
    node, cp = make()
    res = node.set_parameters([Parameter("rate", value=3)])[0]
    assert res.successful, res.reason
    assert cp.config.rate == 3.0 and isinstance(cp.config.rate, float)
    assert node.get_parameter("rate").type_ == Parameter.Type.DOUBLE and node.get_parameter("rate").value == 3.0
    assert node.set_parameters([Parameter("gains", value=[1, 2])])[0].successful
    assert node.get_parameter("gains").type_ == Parameter.Type.DOUBLE_ARRAY and cp.config.gains == [1.0, 2.0]
    # the range still applies to the converted value
    res = node.set_parameters([Parameter("rate", value=30)])[0]
    assert not res.successful and "rate" in res.reason and cp.config.rate == 3.0


@pytest.mark.parametrize("empty_type", [Parameter.Type.BOOL_ARRAY, Parameter.Type.BYTE_ARRAY,
                                        Parameter.Type.INTEGER_ARRAY, Parameter.Type.STRING_ARRAY])
def test_empty_lists_survive_dump_and_load(make, empty_type):
    """`ros2 param dump` writes an empty list as [], which `ros2 param load` sends as an empty bool array: accepted
    for any list parameter and stored with the field's type."""
    node, cp = make([Parameter("gains", value=[0.5])])
    assert cp.config.gains == [0.5]
    res = node.set_parameters([Parameter("gains", empty_type, [])])[0]
    assert res.successful, res.reason
    assert cp.config.gains == [] and node.get_parameter("gains").type_ == Parameter.Type.DOUBLE_ARRAY
    # dump -> load of every parameter as `ros2 param load` sends it: [] as a bool array, the rest as typed
    writable = [n for n in ("rate", "gains") if not node.describe_parameter(n).read_only]
    dumped = {n: node.get_parameter(n).value for n in writable}
    loaded = [Parameter(n, Parameter.Type.BOOL_ARRAY, []) if isinstance(v, (list, tuple)) and not len(v)
              else Parameter(n, value=v) for n, v in dumped.items()]
    assert all(r.successful for r in node.set_parameters(loaded))


def test_empty_list_overrides_from_a_parameter_file(make):
    """A parameter file with `gains: []` (read as an empty bool array) starts the node with an empty typed list."""
    node, cp = make([Parameter("gains", Parameter.Type.BOOL_ARRAY, []), Parameter("names", Parameter.Type.BYTE_ARRAY, [])])
    assert cp.config.gains == [] and cp.config.names == []
    assert node.get_parameter("gains").type_ == Parameter.Type.DOUBLE_ARRAY
    assert node.describe_parameter("gains").type == ParameterType.PARAMETER_DOUBLE_ARRAY
    assert node.describe_parameter("names").read_only


def test_type_errors_have_a_reason_in_words(make):
    node, cp = make()
    res = node.set_parameters([Parameter("rate", value="fast")])[0]
    assert not res.successful
    assert res.reason == "rate: expected a number, got a string 'fast'"
    res = node.set_parameters([Parameter("gains", value=["a"])])[0]
    assert not res.successful and res.reason == "gains: expected a list of numbers, got a list of strings ['a']"
    res = node.set_parameters([Parameter("rate", value=True)])[0]
    assert not res.successful and "expected a number, got a boolean" in res.reason
    # a rejected value leaves the parameter, its type (ros2 param describe) and the config as they were
    assert node.get_parameter("rate").value == 0.5 and cp.config.rate == 0.5
    assert node.describe_parameter("rate").type == ParameterType.PARAMETER_DOUBLE
    assert node.describe_parameter("gains").type == ParameterType.PARAMETER_DOUBLE_ARRAY
