"""Thin ROS 2 layer: translates messages, parameters and timers to and from the core."""
