"""Thin rclpy node adapters around ``effvla_ros.core``: convert messages, declare parameters, call the core."""
