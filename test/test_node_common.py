"""effvla_ros.nodes.common's helpers for bad input: image shapes refused before torch, instruction text for logs,
NUL characters, throttled log lines, thread joins that a second Ctrl-C does not abort."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")

from sensor_msgs.msg import Image  # noqa: E402

from effvla_ros.nodes.common import (  # noqa: E402
    ImageError,
    Throttle,
    clean_instruction,
    describe_text,
    image_to_rgb,
    join_thread,
)


def _image(h: int, w: int) -> Image:
    return Image(height=h, width=w, encoding="rgb8", step=3 * w, data=np.zeros(h * w * 3, np.uint8).tobytes())


@pytest.mark.parametrize("h,w", [(1, 4000), (4000, 1), (10, 81)])
def test_strip_images_are_refused_before_torch(h: int, w: int) -> None:
    with pytest.raises(ImageError, match=rf"image {w}x{h} .*aspect ratio above 8:1"):
        image_to_rgb(_image(h, w))


def test_camera_images_pass() -> None:
    assert image_to_rgb(_image(48, 64)).shape == (48, 64, 3)
    assert image_to_rgb(_image(10, 80)).shape == (10, 80, 3)  # 8:1 exactly is still an image


def test_instruction_text_for_logs_is_shortened_with_its_length() -> None:
    assert describe_text("pick up the red cube") == "'pick up the red cube'"
    long = describe_text("x" * 100_000)
    assert long.endswith("... (100000 characters)") and len(long) < 160


def test_nul_in_an_instruction_is_reported_not_dropped_silently() -> None:
    text, problem = clean_instruction("pick up the red cube\x00 and then the blue one ")
    assert text == "pick up the red cube"
    assert problem is not None and "NUL character at position 20" in problem and "23 characters" in problem
    assert clean_instruction("  stack the cubes ") == ("stack the cubes", None)


def test_ros_strings_end_at_nul_on_the_wire() -> None:
    """Why the node-side check above rarely fires: rosidl's C string conversion cuts a std_msgs/String at its
    first NUL in the *publisher* (documented in the README); the subscriber never sees the rest."""
    import rclpy
    from std_msgs.msg import String

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = rclpy.create_node("nul_probe", context=ctx)
        got: list[str] = []
        node.create_subscription(String, "/nul_probe", lambda m: got.append(m.data), 10)
        pub = node.create_publisher(String, "/nul_probe", 10)
        from rclpy.executors import SingleThreadedExecutor

        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(node)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            pub.publish(String(data="abc\x00def"))
            ex.spin_once(timeout_sec=0.1)
        assert got and got[0] == "abc"
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=ctx)


def test_throttle_counts_what_it_held_back() -> None:
    th = Throttle(0.2)
    assert th("a", "first") == "first"
    assert th("a", "second") is None and th("a", "third") is None
    assert th("b", "other kind") == "other kind"
    time.sleep(0.25)
    assert th("a", "fourth") == "fourth (2 more since the last such message)"


def test_join_thread_has_a_timeout_and_accepts_absent_threads() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    t0 = time.monotonic()
    assert join_thread(t, 0.2) is False and 0.15 < time.monotonic() - t0 < 1.0
    stop.set()
    assert join_thread(t, 2.0) is True
    assert join_thread(None, 1.0) is True
    assert join_thread(threading.Thread(target=lambda: None), 1.0) is True  # never started
