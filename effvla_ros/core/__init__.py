"""ROS-free core of effvla_ros. Nothing in this package imports rclpy or ROS messages."""
