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
