"""The demo ant as a URDF for Gazebo (gz-sim Harmonic) with gz_ros2_control, generated from the MJCF.

Why generated: the policy was trained on gymnasium's ant.xml in MuJoCo, so the Gazebo model must be that
robot, not a hand-copied approximation that drifts. The geometry, masses, inertias, joint axes, ranges
and damping come from MuJoCo's compiled model; the sensor noise from config/sim.yaml (what training
used); the initial joint positions from the standing pose. Written to ``urdf/ant.urdf.xacro`` (a test
checks the file matches this generator)::

    python -m diffusion_controller.sim.urdf urdf/ant.urdf.xacro

What the URDF carries, so that Gazebo exposes what config/ant.yaml reads and writes:

- links named after the MJCF bodies, the torso as ``base_link`` (the IMU's and odometry's frame);
  capsules become a cylinder and two spheres (URDF has no capsule);
- a ``<ros2_control>`` system ``gz_ros2_control/GazeboSimSystem``: per joint a position command
  interface (limits as in the MJCF) and position/velocity/effort states; the IMU ``imu_sensor``;
- a Gazebo IMU sensor ``imu_sensor`` on base_link (the world needs the ``gz-sim-imu-system`` system,
  see worlds/ant_world.sdf);
- the ``gz_ros2_control-system`` plugin, whose controllers file is the xacro argument ``controllers``;
- ``gz-sim-odometry-publisher-system`` in 3 dimensions with ``robot_base_frame`` base_link (its default,
  ``<model>/base_footprint``, is a frame the node's odom source rejects) and ``odom_frame`` odom.

Not carried over (URDF/SDF have no counterpart): MuJoCo's joint armature (1 kg m^2 per joint, large next
to the 0.04-0.07 kg legs) and its PD servo. gz_ros2_control's position interface drives each joint by a
velocity command instead, so the gait in Gazebo differs from the one the policy was trained on.
"""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import mujoco
import numpy as np
import yaml

from diffusion_controller.sim.ant import JOINTS, STANDING_POSE, TORQUE_LIMIT, ant_xml_path

ROOT = Path(__file__).resolve().parents[2]
BASE_LINK = "base_link"
IMU_SENSOR = "imu_sensor"
IMU_STATES = tuple(
    f"{q}.{a}" for q, axes in (("orientation", "xyzw"), ("angular_velocity", "xyz"),
                               ("linear_acceleration", "xyz")) for a in axes
)  # fmt: skip
#: URDF needs a joint velocity limit; MuJoCo has none. High enough never to bind on the expert's gait.
VELOCITY_LIMIT = 20.0
CONTROLLERS_DEFAULT = "$(find diffusion_controller)/config/ant_gz_controllers.yaml"


def _num(x: float) -> str:
    """Stable text for a number (6 significant digits; round-off below 1e-12 and -0 written as 0)."""
    text = f"{float(x) if abs(float(x)) > 1e-12 else 0.0:.6g}"
    return "0" if text == "-0" else text


def _vec(v) -> str:
    return " ".join(_num(x) for x in v)


def _rpy(quat_wxyz) -> tuple[float, float, float]:
    """URDF roll-pitch-yaw (R = Rz(yaw) Ry(pitch) Rx(roll)) of a MuJoCo quaternion (w, x, y, z)."""
    w, x, y, z = (float(q) for q in quat_wxyz)
    roll = math.atan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = math.asin(max(-1.0, min(1.0, 2 * (w * y - z * x))))
    yaw = math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return roll, pitch, yaw


def _origin(parent: ET.Element, xyz, quat_wxyz=(1.0, 0.0, 0.0, 0.0)) -> None:
    ET.SubElement(parent, "origin", xyz=_vec(xyz), rpy=_vec(_rpy(quat_wxyz)))


def _rotate(quat_wxyz, v) -> np.ndarray:
    out = np.zeros(3)
    mujoco.mju_rotVecQuat(out, np.asarray(v, dtype=float), np.asarray(quat_wxyz, dtype=float))
    return out


def _sim_noise() -> dict[str, float]:
    doc = yaml.safe_load((ROOT / "config" / "sim.yaml").read_text())
    return dict(doc["/**/sim_node"]["ros__parameters"]["noise"])


def _shapes(m: mujoco.MjModel, body: int) -> list[tuple[str, dict[str, str], np.ndarray, np.ndarray]]:
    """(URDF geometry, its attributes, pos, quat) of a body's geoms; a capsule is a cylinder + 2 spheres."""
    out = []
    for g in np.flatnonzero(m.geom_bodyid == body):
        pos, quat, size = m.geom_pos[g], m.geom_quat[g], m.geom_size[g]
        if m.geom_type[g] == mujoco.mjtGeom.mjGEOM_SPHERE:
            out.append(("sphere", {"radius": _num(size[0])}, pos, quat))
        elif m.geom_type[g] == mujoco.mjtGeom.mjGEOM_CAPSULE:
            radius, half = size[0], size[1]
            out.append(("cylinder", {"radius": _num(radius), "length": _num(2 * half)}, pos, quat))
            for sign in (-1.0, 1.0):
                end = pos + _rotate(quat, (0.0, 0.0, sign * half))
                out.append(("sphere", {"radius": _num(radius)}, end, np.array([1.0, 0.0, 0.0, 0.0])))
        else:
            raise ValueError(f"geom {m.geom(g).name}: type {m.geom_type[g]} has no URDF form here")
    return out


def _link_names(m: mujoco.MjModel) -> dict[int, str]:
    """Body id -> link name: the torso is base_link, unnamed bodies take their joint's name."""
    names = {}
    for b in range(1, m.nbody):
        if m.body_parentid[b] == 0:
            names[b] = BASE_LINK
        elif m.body(b).name:
            names[b] = m.body(b).name
        else:
            names[b] = f"{m.joint(m.body_jntadr[b]).name}_link"
    return names


def ant_urdf() -> str:
    """The ant's URDF (xacro for the controllers path) as text."""
    m = mujoco.MjModel.from_xml_path(ant_xml_path())
    names = _link_names(m)
    noise = _sim_noise()
    robot = ET.Element("robot", {"name": "ant", "xmlns:xacro": "http://www.ros.org/wiki/xacro"})
    ET.SubElement(robot, "xacro:arg", name="controllers", default=CONTROLLERS_DEFAULT)

    for b, name in names.items():
        link = ET.SubElement(robot, "link", name=name)
        inertial = ET.SubElement(link, "inertial")
        _origin(inertial, m.body_ipos[b], m.body_iquat[b])
        ET.SubElement(inertial, "mass", value=_num(m.body_mass[b]))
        ixx, iyy, izz = m.body_inertia[b]
        ET.SubElement(inertial, "inertia", ixx=_num(ixx), iyy=_num(iyy), izz=_num(izz),
                      ixy="0", ixz="0", iyz="0")  # fmt: skip
        for kind in ("visual", "collision"):
            for shape, attrs, pos, quat in _shapes(m, b):
                element = ET.SubElement(link, kind)
                _origin(element, pos, quat)
                ET.SubElement(ET.SubElement(element, "geometry"), shape, attrs)

        parent = m.body_parentid[b]
        if parent == 0:
            continue  # the floating base
        if m.body_jntnum[b] == 0:
            joint = ET.SubElement(robot, "joint", name=f"{name}_fixed", type="fixed")
        else:
            j = m.body_jntadr[b]
            if m.body_jntnum[b] != 1 or m.jnt_type[j] != mujoco.mjtJoint.mjJNT_HINGE or np.any(m.jnt_pos[j]):
                raise ValueError(f"body {name}: only one hinge at the body origin has a URDF form here")
            joint = ET.SubElement(robot, "joint", name=m.joint(j).name, type="revolute")
            ET.SubElement(joint, "axis", xyz=_vec(m.jnt_axis[j]))
            lower, upper = m.jnt_range[j]
            ET.SubElement(joint, "limit", lower=_num(lower), upper=_num(upper), effort=_num(TORQUE_LIMIT),
                          velocity=_num(VELOCITY_LIMIT))  # fmt: skip
            ET.SubElement(joint, "dynamics", damping=_num(m.dof_damping[m.jnt_dofadr[j]]), friction="0")
        ET.SubElement(joint, "parent", link=names[parent])
        ET.SubElement(joint, "child", link=name)
        _origin(joint, m.body_pos[b], m.body_quat[b])

    control = ET.SubElement(robot, "ros2_control", name="GazeboSimSystem", type="system")
    ET.SubElement(ET.SubElement(control, "hardware"), "plugin").text = "gz_ros2_control/GazeboSimSystem"
    for joint_name, initial in zip(JOINTS, STANDING_POSE, strict=True):
        j = m.joint(joint_name).id
        joint = ET.SubElement(control, "joint", name=joint_name)
        command = ET.SubElement(joint, "command_interface", name="position")
        ET.SubElement(command, "param", name="min").text = _num(m.jnt_range[j][0])
        ET.SubElement(command, "param", name="max").text = _num(m.jnt_range[j][1])
        state = ET.SubElement(joint, "state_interface", name="position")
        ET.SubElement(state, "param", name="initial_value").text = _num(initial)
        ET.SubElement(joint, "state_interface", name="velocity")
        ET.SubElement(joint, "state_interface", name="effort")
    sensor = ET.SubElement(control, "sensor", name=IMU_SENSOR)
    for interface in IMU_STATES:
        ET.SubElement(sensor, "state_interface", name=interface)

    for name in names.values():
        friction = ET.SubElement(robot, "gazebo", reference=name)
        ET.SubElement(friction, "mu1").text = _num(m.geom_friction[0][0])
        ET.SubElement(friction, "mu2").text = _num(m.geom_friction[0][0])
    imu = ET.SubElement(ET.SubElement(robot, "gazebo", reference=BASE_LINK), "sensor", name=IMU_SENSOR,
                        type="imu")  # fmt: skip
    ET.SubElement(imu, "always_on").text = "true"
    ET.SubElement(imu, "update_rate").text = "250"
    ET.SubElement(imu, "topic").text = "imu"
    imu_noise = ET.SubElement(imu, "imu")
    for quantity, std in (("angular_velocity", noise["angular_velocity"]),
                          ("linear_acceleration", noise["linear_acceleration"])):  # fmt: skip
        axes = ET.SubElement(imu_noise, quantity)
        for axis in "xyz":
            n = ET.SubElement(ET.SubElement(axes, axis), "noise", type="gaussian")
            ET.SubElement(n, "mean").text = "0"
            ET.SubElement(n, "stddev").text = _num(std)

    systems = ET.SubElement(robot, "gazebo")
    control_plugin = ET.SubElement(systems, "plugin", filename="gz_ros2_control-system",
                                   name="gz_ros2_control::GazeboSimROS2ControlPlugin")  # fmt: skip
    ET.SubElement(control_plugin, "parameters").text = "$(arg controllers)"
    odom = ET.SubElement(systems, "plugin", filename="gz-sim-odometry-publisher-system",
                         name="gz::sim::systems::OdometryPublisher")  # fmt: skip
    ET.SubElement(odom, "odom_frame").text = "odom"
    ET.SubElement(odom, "robot_base_frame").text = BASE_LINK
    ET.SubElement(odom, "dimensions").text = "3"
    ET.SubElement(odom, "odom_publish_frequency").text = "50"
    ET.SubElement(odom, "gaussian_noise").text = _num(noise["linear_velocity"])

    ET.indent(robot, space="  ")
    header = (
        '<?xml version="1.0"?>\n<!-- Generated from gymnasium\'s ant.xml by '
        "`python -m diffusion_controller.sim.urdf`: edit the generator, not this file. -->\n"
    )
    return header + ET.tostring(robot, encoding="unicode") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the URDF to the path given (default: urdf/ant.urdf.xacro of this checkout)."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else ROOT / "urdf" / "ant.urdf.xacro"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(ant_urdf())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
