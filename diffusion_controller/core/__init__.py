"""ROS-free core: model card, DDIM, runtime, observations, chunk scheduling and safety (numpy only)."""
