"""The policy node's latency-budget mode, in process: the table checked on set (missing, unreadable, or holding a
setting the backend cannot run: rejected with the parameter named, nothing half-applied), and each inference's
choice applied to the runner and to the compressor (images input), tracking a slowdown."""
from __future__ import annotations

from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.parameter import Parameter  # noqa: E402

from effvla_ros.core.budget import BudgetEntry, BudgetTable  # noqa: E402

from model_fixtures import write_tiny_checkpoint  # noqa: E402

TABLE = BudgetTable([
    BudgetEntry("baseline", {}, latency_ms=400.0, deviation=0.0),
    BudgetEntry("keep0.5+steps5", {"pruning.method": "task", "pruning.keep_ratio": 0.5, "inference.num_steps": 5},
                latency_ms=200.0, deviation=0.05),
    BudgetEntry("keep0.25+steps3+reuse", {"pruning.method": "task", "pruning.keep_ratio": 0.25, "inference.num_steps": 3,
                                          "expert_reuse.enabled": True}, latency_ms=100.0, deviation=0.2),
])
# the encoder's temporal reuse as a budget setting (the compressor's reuse.* parameters)
TABLE_REUSE = BudgetTable([
    BudgetEntry("baseline", {}, latency_ms=400.0, deviation=0.0),
    BudgetEntry("patch_reuse", {"reuse.enabled": True, "reuse.keyframe_interval": 4}, latency_ms=200.0, deviation=0.05),
    BudgetEntry("patch_reuse+keep0.5", {"reuse.enabled": True, "reuse.keyframe_interval": 4, "pruning.method": "task",
                                        "pruning.keep_ratio": 0.5}, latency_ms=100.0, deviation=0.1),
])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=2)


def _node(context, ckpt: Path, **extra: object):  # type: ignore[no-untyped-def]
    from effvla_ros.nodes.policy import PolicyNode

    values = {"checkpoint": str(ckpt), "cameras": ["camera1", "camera2"], "startup_check": False, "warmup": False,
              "input_mode": "images", **extra}
    return PolicyNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])


def test_budget_table_is_checked_on_set(context, ckpt: Path, tmp_path: Path) -> None:
    table = TABLE.save(tmp_path / "table.yaml")
    node = _node(context, ckpt)
    try:
        assert node.budget is None
        res = node.set_parameters([Parameter("latency_budget_ms", value=250.0)])[0]
        assert not res.successful and "latency_budget_table: empty" in res.reason
        assert node.budget_params.config.latency_budget_ms == 0.0  # nothing half-applied
        (tmp_path / "bad.yaml").write_text("entries: [")
        res = node.set_parameters([Parameter("latency_budget_table", value=str(tmp_path / "bad.yaml")),
                                   Parameter("latency_budget_ms", value=250.0)])
        assert not all(r.successful for r in res) and any("is not YAML" in r.reason for r in res)
        res = node.set_parameters_atomically([Parameter("latency_budget_table", value=str(table)),
                                              Parameter("latency_budget_ms", value=250)])  # an int, as typed
        assert res.successful, res.reason
        node._apply_settings()
        assert node.budget is not None and node.budget.budget_ms == 250.0
    finally:
        node.destroy_node()


def test_a_table_the_backend_cannot_run_is_refused_at_start(context, ckpt: Path, tmp_path: Path) -> None:
    """The cudagraph backend has no expert plans: a table with an expert-reuse setting cannot apply there."""
    table = TABLE.save(tmp_path / "table.yaml")
    with pytest.raises(ValueError, match=r"latency_budget_table: setting 'keep0\.25\+steps3\+reuse'.*expert_reuse"):
        _node(context, ckpt, backend="cudagraph", latency_budget_ms=250.0, latency_budget_table=str(table))


def test_each_inference_applies_the_chosen_setting(context, ckpt: Path, tmp_path: Path) -> None:
    table = TABLE.save(tmp_path / "table.yaml")
    node = _node(context, ckpt, latency_budget_ms=250.0, latency_budget_table=str(table), num_steps=10,
                 **{"expert_reuse.threshold": 0.2})
    try:
        choice = node._budget_step()
        assert choice is not None and choice.entry.name == "keep0.5+steps5" and choice.feasible
        assert node.runner.inference.num_steps == 5 and not node.runner.expert_reuse.cfg.enabled
        assert node.compressor.pruning.method == "task" and node.compressor.pruning.keep_ratio == 0.5
        for _ in range(5):  # inference now takes twice the calibrated time: only the fastest fits 250 ms
            node.budget.observe(choice.entry.name, 2 * choice.entry.latency_ms)
        choice = node._budget_step()
        assert choice.entry.name == "keep0.25+steps3+reuse" and choice.predicted_ms == pytest.approx(200.0)
        assert node.runner.inference.num_steps == 3 and node.runner.expert_reuse.cfg.enabled
        assert node.runner.expert_reuse.cfg.threshold == 0.2  # fields the entry does not set: the node's
        assert node.compressor.pruning.keep_ratio == 0.25
        assert node.set_parameters([Parameter("latency_budget_ms", value=0.0)])[0].successful
        node._apply_settings()  # off: the node's own parameters again
        assert node.budget is None and node.runner.inference.num_steps == 10 and not node.runner.expert_reuse.cfg.enabled
    finally:
        node.destroy_node()


def test_reuse_settings_apply_to_the_compressor_in_process(context, ckpt: Path, tmp_path: Path) -> None:
    """Images input: an entry's reuse.* fields reach the node's own compressor; an entry without reuse runs without it,
    as it was calibrated (every budget group off, then the entry)."""
    table = TABLE_REUSE.save(tmp_path / "table.yaml")
    node = _node(context, ckpt, latency_budget_ms=450.0, latency_budget_table=str(table),
                 **{"reuse.enabled": True, "reuse.dilation": 0})
    try:
        assert node.compressor.reuse.enabled  # the node's own parameter before the first budgeted inference
        assert node._budget_step().entry.name == "baseline"
        assert not node.compressor.reuse.enabled and node.compressor.pruning.method == "none"
        for _ in range(5):
            node.budget.observe("baseline", 800.0)  # twice as slow: baseline 800, patch_reuse 400 ms predicted
        assert node._budget_step().entry.name == "patch_reuse"
        r = node.compressor.reuse
        assert r.enabled and r.keyframe_interval == 4 and r.dilation == 0  # dilation: the node's own
    finally:
        node.destroy_node()


def test_budget_sets_a_compressor_nodes_pruning_and_reuse(ckpt: Path, tmp_path: Path) -> None:
    """Tokens input: the chosen entry's pruning and reuse go to a real token_compressor node through its
    set_parameters service, only when they change; turning the budget off restores the compressor's own values."""
    from effvla_ros.nodes.policy import PolicyNode
    from effvla_ros.nodes.token_compressor import TokenCompressorNode

    from ros_helpers import spinner, wait_for

    table = TABLE_REUSE.save(tmp_path / "table.yaml")
    with spinner() as sp:
        comp = sp.add(TokenCompressorNode(context=sp.context, parameter_overrides=[
            Parameter("checkpoint", value=str(ckpt)), Parameter("cameras", value=["camera1", "camera2"]),
            Parameter("reuse.enabled", value=True), Parameter("reuse.keyframe_interval", value=8),
            Parameter("pruning.keep_ratio", value=0.75)]))
        values = {"checkpoint": str(ckpt), "cameras": ["camera1", "camera2"], "startup_check": False,
                  "warmup": False, "input_mode": "tokens", "latency_budget_ms": 450.0,
                  "latency_budget_table": str(table)}
        pol = sp.add(PolicyNode(context=sp.context, parameter_overrides=[Parameter(k, value=v) for k, v in values.items()]))

        def params() -> tuple[object, ...]:
            c = comp.compressor
            return c.pruning.method, c.pruning.keep_ratio, c.reuse.enabled, c.reuse.keyframe_interval

        assert params() == ("task", 0.75, True, 8)
        wait_for(lambda: CompressorReady(pol), timeout=10.0)
        assert pol._budget_step().entry.name == "baseline"
        wait_for(lambda: params() == ("none", 0.75, False, 8), timeout=10.0)  # switches only: the rest its own
        for _ in range(5):
            pol.budget.observe("baseline", 1600.0)  # 4x slower: only patch_reuse+keep0.5 fits (400 ms)
        assert pol._budget_step().entry.name == "patch_reuse+keep0.5"
        wait_for(lambda: params() == ("task", 0.5, True, 4), timeout=10.0)
        assert pol.set_parameters([Parameter("latency_budget_ms", value=0.0)])[0].successful
        pol._apply_settings()
        wait_for(lambda: params() == ("task", 0.75, True, 8), timeout=10.0)  # the compressor's own values again


def CompressorReady(pol) -> bool:  # type: ignore[no-untyped-def]  # noqa: N802
    """The policy's client to the compressor's set_parameters service sees the service (made on first use)."""
    from effvla_ros.nodes.policy import CompressorParameters

    if pol._budget_compressor is None:
        pol._budget_compressor = CompressorParameters(pol, pol.budget_params.config.latency_budget_compressor,
                                                      [f"{g}.{f}" for g, f in pol._budget_compressor_fields()])
    return bool(pol._budget_compressor._set.service_is_ready() and pol._budget_compressor._get.service_is_ready())
