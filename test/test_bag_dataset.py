"""dataset_from_bag on bags written here (both storage formats): rows built by the node's own code from
header stamps, labels on the control grid, episodes split at pauses, and bags that cannot work refused
with the missing topic or joint named."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from geometry_msgs.msg import Twist
from nav_msgs.msg import Odometry
from rclpy.serialization import serialize_message
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray

from diffusion_controller.core.card_source import read_layout
from diffusion_controller.ros import config as cf
from diffusion_controller.ros.conversions import sec_to_time
from diffusion_controller.ros.params_file import load_params_file
from diffusion_controller.training import bag_dataset as bd

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = read_layout(ROOT / "models" / "ant_locomotion.yaml")
JOINTS = LAYOUT.action_joints
P = LAYOUT.control_period_s
DELAY = 0.01  # sensor messages are recorded this long after their header stamp
T0 = 100.0


def config() -> cf.NodeConfig:
    return cf.NodeConfig.from_params(load_params_file(str(ROOT / "config" / "ant.yaml")))


def position(t: float) -> np.ndarray:
    """Joint positions as a function of the measurement time, inside the ant's joint ranges."""
    mid = (LAYOUT.action_lower + LAYOUT.action_upper) / 2
    return mid + 0.1 * np.sin(3.0 * t + np.arange(len(JOINTS)))


def command(k: int) -> np.ndarray:
    return (LAYOUT.action_lower + LAYOUT.action_upper) / 2 + 0.01 * k


def write_bag(path: Path, seconds: float = 2.0, storage: str = "sqlite3", drop: tuple[str, ...] = (),
              joints: tuple[str, ...] = JOINTS, pause: tuple[float, float] | None = None) -> Path:
    """Sensors at 200/100/50 Hz stamped DELAY before they are recorded, a /cmd_vel, and commands at the
    control rate; nothing is recorded inside `pause` (start, end) seconds after T0."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    events: list[tuple[float, str, str, bytes]] = []

    def at(rate: float) -> np.ndarray:
        return T0 + np.arange(0.0, seconds, 1.0 / rate)

    for t in at(200.0):
        msg = JointState(name=list(joints), position=position(t)[: len(joints)].tolist(),
                         velocity=[0.0] * len(joints))
        msg.header.stamp = sec_to_time(t)
        events.append((t + DELAY, "/joint_states", "sensor_msgs/msg/JointState", serialize_message(msg)))
    for t in at(100.0):
        msg = Imu()
        msg.header.stamp, msg.orientation.w = sec_to_time(t), 1.0
        imu = ("/imu_sensor_broadcaster/imu", "sensor_msgs/msg/Imu")
        events.append((t + DELAY, *imu, serialize_message(msg)))
    for t in at(50.0):
        msg = Odometry(child_frame_id="base_link")
        msg.header.stamp = sec_to_time(t)
        msg.pose.pose.orientation.w = 1.0
        msg.twist.twist.linear.x = 0.3
        events.append((t + DELAY, "/odom", "nav_msgs/msg/Odometry", serialize_message(msg)))
    for t in at(2.0):
        msg = Twist()
        msg.linear.x = 0.3
        events.append((t, "/cmd_vel", "geometry_msgs/msg/Twist", serialize_message(msg)))
    for k, t in enumerate(at(1.0 / P)):
        msg = Float64MultiArray(data=command(k).tolist())
        events.append((t + 0.002, "/forward_position_controller/commands", "std_msgs/msg/Float64MultiArray",
                       serialize_message(msg)))
    events = [e for e in events if e[1] not in drop]
    if pause is not None:
        events = [e for e in events if not T0 + pause[0] <= e[0] < T0 + pause[1]]
    events.sort(key=lambda e: e[0])
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for t, topic, msgtype, raw in events:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(conns[topic], round(t * 1e9), raw)
    return path


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_rows_are_what_the_node_computes_and_labels_sit_on_the_control_grid(tmp_path, storage):
    bag = write_bag(tmp_path / "demo", storage=storage)
    data = bd.dataset_from_bags([bag], config(), LAYOUT)
    n = len(data.obs)
    assert data.obs.shape == (n, LAYOUT.obs_dim) and data.action.shape == (n, len(JOINTS))
    assert list(data.episode_ends) == [n] and n > 80  # 2 s at 50 Hz, less the rows before all sensors
    jp = slice(12, 20)  # joint_position columns of the ant layout
    pa = slice(28, 36)  # previous_action
    # The grid starts at the first command (recorded at T0 + 0.002); the labels are the commands.
    first = round((data.action[0, 0] - command(0)[0]) / 0.01)
    for k in range(n):
        t_k = T0 + 0.002 + (first + k) * P
        np.testing.assert_allclose(data.action[k], command(first + k), atol=1e-6)
        # Joint positions of the newest joint state measured (stamped) by t_k, whenever it was recorded.
        newest = math.floor((t_k - T0) * 200.0 + 1e-9) / 200.0 + T0
        np.testing.assert_allclose(data.obs[k, jp], position(newest), atol=1e-5)
        if k:
            np.testing.assert_allclose(data.obs[k, pa], command(first + k - 1), atol=1e-6)
    vc = slice(9, 12)
    np.testing.assert_allclose(data.obs[:, vc], np.tile([0.3, 0.0, 0.0], (n, 1)), atol=1e-6)
    reports = {r["topic"]: r for r in data.reports}
    assert reports["/joint_states"]["delay_p50_ms"] == pytest.approx(1000 * DELAY, abs=0.5)
    assert reports["/joint_states"]["rate_hz"] == pytest.approx(200.0, rel=0.02)
    assert reports["/forward_position_controller/commands"]["rate_hz"] == pytest.approx(50.0, rel=0.02)


def test_a_pause_in_the_commands_splits_the_episode(tmp_path):
    bag = write_bag(tmp_path / "demo", seconds=3.0, pause=(1.0, 2.0))
    data = bd.dataset_from_bags([bag], config(), LAYOUT)
    # Two stretches of 1 s at 50 Hz; nothing from the pause is made up.
    assert len(data.episode_ends) == 2
    first, total = data.episode_ends
    assert 45 <= first <= 50 and 45 <= total - first <= 50


def test_a_bag_without_a_needed_topic_or_joint_is_refused_by_name(tmp_path):
    no_imu = write_bag(tmp_path / "no_imu", drop=("/imu_sensor_broadcaster/imu",))
    with pytest.raises(bd.BagError, match="/imu_sensor_broadcaster/imu"):
        bd.dataset_from_bags([no_imu], config(), LAYOUT)
    seven = write_bag(tmp_path / "seven", joints=JOINTS[:7])
    with pytest.raises(bd.BagError, match=r"/joint_states.*ankle_4"):
        bd.dataset_from_bags([seven], config(), LAYOUT)


def test_the_cli_writes_a_dataset_train_policy_reads(tmp_path, capsys):
    from diffusion_controller.training.train import load_dataset

    bag = write_bag(tmp_path / "demo", storage="mcap")
    out = tmp_path / "d.npz"
    rc = bd.main([str(bag), "--config", str(ROOT / "config" / "ant.yaml"),
                  "--layout", str(ROOT / "models" / "ant_locomotion.yaml"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "/joint_states" in printed and "delay p50 10.0 ms" in printed
    d = load_dataset(str(out))
    assert d["obs"].shape[1] == LAYOUT.obs_dim and len(d["action_joints"]) == 8
    assert bd.main([str(bag), "--config", str(ROOT / "config" / "ant.yaml"), "--layout",
                    str(ROOT / "models" / "ant_locomotion.yaml"), "--out", str(out),
                    "--labels", "/no/such/topic"]) == 2
    # A model file as the layout: its card by the one rule (card_of_model); a file that is no model is a
    # clear error, not a traceback.
    assert bd.main([str(bag), "--config", str(ROOT / "config" / "ant.yaml"), "--layout",
                    str(ROOT / "models" / "ant_locomotion.onnx"), "--out", str(out)]) == 0
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    capsys.readouterr()
    assert bd.main([str(bag), "--config", str(ROOT / "config" / "ant.yaml"), "--layout", str(junk),
                    "--out", str(out)]) == 2
    assert "not a valid ONNX file" in capsys.readouterr().err


def test_topics_resolve_like_the_node_resolves_them():
    assert bd.resolve("joint_states", "/robot1") == "/robot1/joint_states"
    assert bd.resolve("/odom", "/robot1") == "/odom"
    assert bd.resolve("~/commands", "robot1") == "/robot1/diffusion_controller/commands"
    assert bd.resolve("cmd_vel") == "/cmd_vel"


#: Converts a bag in a Python where ROS is not installed: importing rclpy, a rosidl package or any
#: message/service package fails; the node's params file is read there too (as `dataset_from_bag --config`).
WITHOUT_ROS = """
import json, sys

class NoROS:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top == "rclpy" or top.startswith("rosidl") or top.endswith(("_msgs", "_srvs", "_interfaces")):
            raise ImportError(f"{name}: ROS is not installed here")
        return None

sys.meta_path.insert(0, NoROS())
from diffusion_controller.core.card_source import read_layout
from diffusion_controller.ros.config import NodeConfig
from diffusion_controller.ros.params_file import load_params_file
from diffusion_controller.training import bag_dataset

bag, config, layout, out = sys.argv[1:]
cfg, layout = NodeConfig.from_params(load_params_file(config)), read_layout(layout)
data = bag_dataset.dataset_from_bags([bag], cfg, layout)
bag_dataset.write_dataset(out, data, layout, {})
print(json.dumps(data.reports))
"""


def test_bags_become_a_dataset_without_ros(tmp_path):
    """The training package reads bags with rosbags alone: a machine that trains needs no ROS message
    packages (what the bag reader shares with the node lives in the ROS-free core)."""
    bag = write_bag(tmp_path / "demo", storage="mcap")
    out = tmp_path / "d.npz"
    params = str(ROOT / "config" / "ant.yaml")
    layout = str(ROOT / "models" / "ant_locomotion.yaml")
    run = subprocess.run([sys.executable, "-c", WITHOUT_ROS, str(bag), params, layout, str(out)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    reports = {r["topic"]: r for r in json.loads(run.stdout)}
    assert reports["/joint_states"]["delay_p50_ms"] == pytest.approx(1000 * DELAY, abs=0.5)
    assert len(np.load(out)["obs"]) > 80
