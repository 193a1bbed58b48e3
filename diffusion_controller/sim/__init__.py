"""MuJoCo stand-in for Gazebo + ros_gz_bridge + ros2_control, with the expert and dataset generator."""
