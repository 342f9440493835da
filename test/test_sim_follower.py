"""The joint-trajectory follower core (ROS-free): interpolation, replacement, past points, stamps."""
from __future__ import annotations

import numpy as np
import pytest

from effvla_ros.sim.follower import JointTrajectoryFollower, TrajectoryError, TrajectoryPoint

J = ("a", "b")


def _f(q0=(0.0, 0.0), now=0.0) -> JointTrajectoryFollower:
    return JointTrajectoryFollower(J, q0, now=now)


def test_holds_initial_positions_without_trajectory():
    f = _f((0.3, -0.2))
    q, v = f.sample(123.0)
    np.testing.assert_allclose(q, [0.3, -0.2])
    np.testing.assert_allclose(v, [0.0, 0.0])


def test_linear_interpolation_from_current_command_and_hold_at_end():
    f = _f()
    kept = f.set_trajectory(J, [TrajectoryPoint(1.0, [1.0, -1.0]), TrajectoryPoint(2.0, [3.0, 1.0])], now=10.0)
    assert kept == 2
    np.testing.assert_allclose(f.sample(10.0)[0], [0.0, 0.0])  # starts at the current command
    np.testing.assert_allclose(f.sample(10.5)[0], [0.5, -0.5])  # linear toward the first point
    q, v = f.sample(11.5)
    np.testing.assert_allclose(q, [2.0, 0.0])
    np.testing.assert_allclose(v, [2.0, 2.0])
    q, v = f.sample(15.0)  # past the end: hold the last point
    np.testing.assert_allclose(q, [3.0, 1.0])
    np.testing.assert_allclose(v, [0.0, 0.0])
    assert f.done(12.0) and not f.done(11.9)


def test_cubic_hermite_with_velocities():
    f = _f()
    pts = [TrajectoryPoint(1.0, [1.0, 0.0], [0.0, 2.0]), TrajectoryPoint(3.0, [2.0, 0.0], [1.0, -2.0])]
    f.set_trajectory(J, pts, now=0.0)
    np.testing.assert_allclose(f.sample(1.0)[0], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(f.sample(1.0 + 1e-9)[1], [0.0, 2.0], atol=1e-6)  # velocity matches the point's
    h = 2.0  # cubic Hermite midpoint: (q0 + q1) / 2 + h (v0 - v1) / 8
    np.testing.assert_allclose(f.sample(2.0)[0], [1.5 + h * (0.0 - 1.0) / 8, 0.0 + h * (2.0 + 2.0) / 8])
    np.testing.assert_allclose(f.sample(3.0 - 1e-9)[1], [1.0, -2.0], atol=1e-6)
    # without velocities the same points interpolate linearly
    g = _f()
    g.set_trajectory(J, [TrajectoryPoint(1.0, [1.0, 0.0]), TrajectoryPoint(3.0, [2.0, 0.0])], now=0.0)
    np.testing.assert_allclose(g.sample(2.0)[0], [1.5, 0.0])


def test_zero_stamp_means_now_and_nonzero_stamp_is_absolute():
    f = _f()
    f.set_trajectory(J, [TrajectoryPoint(1.0, [1.0, 1.0])], now=5.0, start_time=0.0)
    assert f.end_time == pytest.approx(6.0)
    g = _f()
    g.set_trajectory(J, [TrajectoryPoint(1.0, [1.0, 1.0])], now=5.0, start_time=7.0)
    assert g.end_time == pytest.approx(8.0)
    np.testing.assert_allclose(g.sample(6.5)[0], [0.0, 0.0])  # before its start: still the old command
    np.testing.assert_allclose(g.sample(7.5)[0], [0.5, 0.5])


def test_new_trajectory_replaces_old_from_its_start_time():
    f = _f()
    f.set_trajectory(J, [TrajectoryPoint(4.0, [4.0, 4.0])], now=0.0)  # ramp 1 rad/s
    f.set_trajectory(J, [TrajectoryPoint(1.0, [0.0, 0.0])], now=1.0, start_time=2.0)  # from t=2 back to 0 at t=3
    np.testing.assert_allclose(f.sample(1.5)[0], [1.5, 1.5])  # old one still runs until t=2
    np.testing.assert_allclose(f.sample(2.0)[0], [2.0, 2.0])
    np.testing.assert_allclose(f.sample(2.5)[0], [1.0, 1.0])  # from the old state toward the new point
    np.testing.assert_allclose(f.sample(10.0)[0], [0.0, 0.0])  # the old goal (4) is gone
    assert f.end_time == pytest.approx(3.0)


def test_points_in_the_past_are_dropped():
    f = _f()
    pts = [TrajectoryPoint(0.5, [9.0, 9.0]), TrajectoryPoint(1.0, [9.0, 9.0]), TrajectoryPoint(3.0, [2.0, 2.0])]
    kept = f.set_trajectory(J, pts, now=11.0, start_time=10.0)  # the first two points are past
    assert kept == 1
    np.testing.assert_allclose(f.sample(11.0)[0], [0.0, 0.0])  # no jump to the stale points
    np.testing.assert_allclose(f.sample(12.0)[0], [1.0, 1.0])
    assert np.all(f.sample(11.5)[0] < 9.0)
    with pytest.raises(TrajectoryError, match="past"):
        f.set_trajectory(J, [TrajectoryPoint(1.0, [5.0, 5.0])], now=20.0, start_time=10.0)
    np.testing.assert_allclose(f.sample(13.0)[0], [2.0, 2.0])  # a rejected trajectory changes nothing


def test_partial_goal_keeps_other_joints():
    f = _f((0.1, 0.2))
    f.set_trajectory(["b"], [TrajectoryPoint(1.0, [1.2])], now=0.0)
    np.testing.assert_allclose(f.sample(2.0)[0], [0.1, 1.2])


@pytest.mark.parametrize(
    "names,points,match",
    [
        (["a", "x"], [TrajectoryPoint(1.0, [0.0, 0.0])], "unknown joint"),
        (["a", "a"], [TrajectoryPoint(1.0, [0.0, 0.0])], "duplicate"),
        (["a", "b"], [TrajectoryPoint(1.0, [0.0])], "positions"),
        (["a", "b"], [TrajectoryPoint(1.0, [0.0, 0.0]), TrajectoryPoint(1.0, [1.0, 1.0])], "increasing"),
        (["a", "b"], [TrajectoryPoint(1.0, [0.0, float("nan")])], "non-finite"),
        (["a", "b"], [TrajectoryPoint(1.0, [0.0, 0.0], [0.0, 0.0]), TrajectoryPoint(2.0, [1.0, 1.0])], "velocities"),
        (["a", "b"], [], "no points"),
    ],
)
def test_malformed_trajectories_are_rejected(names, points, match):
    f = _f()
    with pytest.raises(TrajectoryError, match=match):
        f.set_trajectory(names, points, now=0.0)
    np.testing.assert_allclose(f.sample(5.0)[0], [0.0, 0.0])
