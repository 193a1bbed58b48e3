"""diffusion_controller: a ROS 2 controller that runs an ONNX-exported diffusion policy in real time."""

__version__ = "0.1.0"
