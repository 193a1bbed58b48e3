"""ament_python package definition; the same file pip-installs into a virtual environment."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "diffusion_controller"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "bench", "bench.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
        (f"share/{PACKAGE}/urdf", glob("urdf/*.xacro")),
        (f"share/{PACKAGE}/worlds", glob("worlds/*.sdf")),
        (f"share/{PACKAGE}/models", glob("models/*.onnx") + glob("models/*.yaml")),
    ],
    install_requires=["setuptools", "numpy", "pyyaml", "onnxruntime-gpu"],
    # colcon test runs pytest only for packages that declare it: extras_require["test"] is enough for
    # colcon-core; `tests_require` (ament_python's template) makes setuptools print "Unknown distribution
    # option" on stderr, which colcon reports as "1 package had stderr output".
    extras_require={"test": ["pytest"]},
    zip_safe=True,
    maintainer="diffusion_controller developers",
    maintainer_email="diffusion-controller@example.org",
    description=(
        "Real-time ROS 2 controller running an ONNX diffusion policy with DDIM and delay compensation."
    ),
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "controller_node = diffusion_controller.ros.controller_node:main",
            "policy_node = diffusion_controller.ros.policy_node:main",
            "link_emulator = diffusion_controller.sim.link_emulator:main",
            "sim_node = diffusion_controller.sim.sim_node:main",
            "diffusion_controller_demo = diffusion_controller.sim.demo:main",
            "export_policy = diffusion_controller.training.export:main",
            "generate_dataset = diffusion_controller.sim.dataset:main",
            "train_policy = diffusion_controller.training.train:main",
            "distill_policy = diffusion_controller.training.distill:main",
            "dataset_from_bag = diffusion_controller.training.bag_dataset:main",
            "record_demos = diffusion_controller.sim.demonstrate:main",
            "build_engine = diffusion_controller.core.build_engine:main",
        ],
    },
)
