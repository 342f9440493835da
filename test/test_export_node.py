"""The policy and token compressor nodes on the exported stages (parameters ``backend: onnxruntime`` +
``export_dir``), in process: they start on an export of their checkpoint, refuse at start an export that is missing
or made from another checkpoint (naming the parameter / the file), and reject live changes the exported backend
cannot apply."""
from __future__ import annotations

from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rclpy.parameter import Parameter  # noqa: E402

from model_fixtures import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=2)


@pytest.fixture(scope="module")
def export(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from effvla_ros.core.backends.onnx_export import export_policy
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy

    out = tmp_path_factory.mktemp("export")
    export_policy(load_policy(ckpt, runtime=RuntimeConfig()), out, exit_layers=[1], log=lambda *_: None)
    return out


def _params(ckpt: Path, **extra: object) -> list[Parameter]:
    values = {"checkpoint": str(ckpt), "cameras": ["camera1", "camera2"], "startup_check": False, **extra}
    return [Parameter(k, value=v) for k, v in values.items()]


def test_policy_node_runs_the_exported_stages(context, ckpt: Path, export: Path) -> None:
    from effvla_ros.nodes.policy import PolicyNode

    node = PolicyNode(context=context, parameter_overrides=_params(
        ckpt, backend="onnxruntime", export_dir=str(export), **{"early_exit.enabled": False}))
    try:
        be = node.runner.backend
        assert be.caps.name == "onnxruntime" and be.caps.exit_layers == (1,)
        res = node.set_parameters([Parameter("expert_reuse.enabled", value=True)])[0]
        assert not res.successful and "expert_reuse.enabled" in res.reason and "onnxruntime" in res.reason
        assert not node.expert_params.config.enabled  # nothing half-applied
        assert node.set_parameters([Parameter("rtc.max_guidance_weight", value=5.0)])[0].successful
    finally:
        node.destroy_node()


def test_token_compressor_node_encodes_on_the_exported_graph(context, ckpt: Path, export: Path) -> None:
    import torch

    from effvla_ros.nodes.token_compressor import TokenCompressorNode

    node = TokenCompressorNode(context=context, parameter_overrides=_params(
        ckpt, backend="onnxruntime", export_dir=str(export), **{"reuse.patch_level": False}))
    try:
        comp = node.compressor
        assert comp.backend.caps.name == "onnxruntime"
        px = comp.policy.preprocess_image(torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0)))
        assert (comp.backend.encode(px) - comp.policy.encode_pixels(px)).abs().max() <= 1e-4
        res = node.set_parameters([Parameter("reuse.patch_level", value=True)])[0]
        assert not res.successful and "reuse.patch_level" in res.reason
    finally:
        node.destroy_node()


def test_nodes_refuse_a_missing_or_foreign_export(context, ckpt: Path, export: Path, tmp_path: Path) -> None:
    from effvla_ros.nodes.policy import PolicyNode
    from effvla_ros.nodes.token_compressor import TokenCompressorNode

    with pytest.raises(ValueError, match="export_dir"):
        PolicyNode(context=context, parameter_overrides=_params(ckpt, backend="onnxruntime"))
    other = write_tiny_checkpoint(tmp_path / "other", seed=9)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"manifest\.json.*another checkpoint"):
        TokenCompressorNode(context=context, parameter_overrides=_params(
            other, backend="onnxruntime", export_dir=str(export), **{"reuse.patch_level": False}))
