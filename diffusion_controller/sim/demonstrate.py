"""Demonstrations through ROS, recorded to bags: ``record_demos``.

The path a user with a real robot takes, run on the simulated ant: ``sim_node`` is the robot; the
project's expert gait is the demonstrator, a node that reads the robot's sensor topics and publishes
joint targets on the forward_command_controller topic, as a teleoperator's or a classical controller's
node would, while a "joystick" publishes velocity commands on /cmd_vel; a recorder writes every topic
to an MCAP bag per episode (what ``ros2 bag record`` does, with ``rosbags``). ``dataset_from_bag`` turns
the bags into a dataset, and training goes on as for any robot.

The demonstrator sees the robot only through the messages: its observation row is built by the node's
own intake, readers and observation history (the same code the controller runs), from the sensor
topics of config/ant.yaml. With ``--action-noise`` (DART) the targets it sends carry low-pass noise, and
the clean ones go out on ``~/labels`` (recorded too; ``dataset_from_bag --labels`` picks them), so the
data shows recoveries, as ``generate_dataset`` does.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from geometry_msgs.msg import Twist
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from diffusion_controller.core import inputs
from diffusion_controller.core.card_parser import layout_from_dict
from diffusion_controller.core.card_schema import Layout
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import conversions as cv
from diffusion_controller.ros.binding import control_config, validate_against_card
from diffusion_controller.ros.intake import Intake
from diffusion_controller.ros.params_file import load_params_file
from diffusion_controller.share import share_dir
from diffusion_controller.sim.ant import CONTROL_PERIOD_S, JOINTS, OBS_LAYOUT
from diffusion_controller.sim.dataset import LowPassNoise, random_schedule
from diffusion_controller.sim.expert import Expert

ROOT = share_dir()
RELIABLE = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
LABELS = "~/labels"


def ant_layout() -> Layout:
    from diffusion_controller.sim.ant import Ant

    ant = Ant()
    return layout_from_dict({
        "control_period_s": CONTROL_PERIOD_S,
        "observation": {"history": 1, "features": list(OBS_LAYOUT)},
        "action": {"joints": list(JOINTS), "lower": ant.joint_lower.tolist(),
                   "upper": ant.joint_upper.tolist()},
    })  # fmt: skip


class Demonstrator(Node):
    """The expert gait as a ROS node: sensor topics in, joint targets out, at the control period (sim
    time), and a joystick's /cmd_vel following a random skill schedule."""

    def __init__(self, config: str, seed: int, action_noise: float) -> None:
        super().__init__("expert_demonstrator", parameter_overrides=[Parameter("use_sim_time", value=True)])
        self.cfg = cf.NodeConfig.from_params(load_params_file(config))
        self.layout = ant_layout()
        self.card = inputs.layout_card(self.layout)
        self.binding = validate_against_card(self.cfg, self.card)
        self.control = control_config(self.cfg, self.binding, self.card)
        self.rng = np.random.default_rng(seed)
        self.action_noise = action_noise
        self.pub_cmd = self.create_publisher(Float64MultiArray, self.cfg.commands_topic, RELIABLE)
        self.pub_labels = self.create_publisher(Float64MultiArray, LABELS, RELIABLE)
        self.pub_twist = self.create_publisher(Twist, "/cmd_vel", RELIABLE)
        self.intake = Intake(self, self.cfg.sources, cv.MESSAGE_CLASSES, CONTROL_PERIOD_S)
        self.running = False
        self.timer = self.create_timer(CONTROL_PERIOD_S, self._tick)

    def start_episode(self, seconds: float) -> None:
        """A fresh expert, history and schedule from now (sim time)."""
        self.expert = Expert()
        self.readers = inputs.plain_readers(self.cfg.sources, self.cfg.max_future_s, self.layout.features,
                                            self.binding.rename)
        self.history = self.control.history_for(self.card)
        self.schedule = random_schedule(self.rng, seconds)
        std = float(self.rng.uniform(0.0, self.action_noise)) if self.action_noise > 0 else 0.0
        noise_rng = np.random.default_rng(int(self.rng.integers(2**31)))
        self.perturb = LowPassNoise(noise_rng, std) if std else None
        self.t0 = self._now()
        self.running = True

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _command(self, t: float) -> list[float]:
        elapsed = t - self.t0
        for duration, cmd in self.schedule:
            if elapsed < duration:
                return cmd
            elapsed -= duration
        return [0.0, 0.0, 0.0]

    def _tick(self) -> None:
        now = self._now()
        if not self.running or now <= 0.0:
            return

        def accept(source: str, stamp: float, values: dict[str, np.ndarray]) -> None:
            for feature, value in values.items():
                self.history.push(feature, stamp, value, now)

        self.intake.drain(self.readers, now, self.history.spacing, accept, lambda source, exc: None)
        twist = Twist()
        twist.linear.x, twist.linear.y, twist.angular.z = self._command(now)
        self.pub_twist.publish(twist)
        if self.history.newest_common_stamp() is None:
            return  # not every sensor seen yet
        row = self.history.sample(now)[-1]
        target = self.expert.act(row)
        sent = self.perturb(target) if self.perturb is not None else target
        self.history.record_command(now, sent)
        out = np.empty(len(JOINTS))
        out[:] = sent[list(self.binding.output_index)]
        self.pub_cmd.publish(cv.command_msg(out))
        self.pub_labels.publish(cv.command_msg(target[list(self.binding.output_index)]))


class Recorder(Node):
    """`ros2 bag record --use-sim-time` for a list of topics: every message as CDR bytes into an MCAP bag
    per episode, stamped with its arrival time on the simulation clock. The arrival time is the
    middleware's receive stamp (wall clock), mapped to sim time by the newest /clock message and the
    simulator's real-time factor, so a busy Python executor does not shift the recording times."""

    def __init__(self, topics: dict[str, str], real_time_factor: float) -> None:
        super().__init__("demo_recorder")
        if not real_time_factor > 0:
            raise ValueError("recording needs a paced simulator (real_time_factor > 0)")
        self.rtf = real_time_factor
        self.topics = topics  # name -> type (pkg/msg/Type)
        self.writer: Any = None
        self.conns: dict[str, Any] = {}
        self.counts: dict[str, int] = dict.fromkeys(topics, 0)
        self.clock_at: tuple[int, int] | None = None  # (wall receive ns, sim ns) of the newest /clock
        self.create_subscription(Clock, "/clock", self._on_clock, RELIABLE)
        for topic, msgtype in topics.items():
            self.create_subscription(cv.MESSAGE_CLASSES[msgtype], topic,
                                     lambda raw, info, t=topic: self._on(t, raw, info), RELIABLE,
                                     raw=True)  # fmt: skip

    def open(self, path: Path) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        store = get_typestore(Stores.ROS2_KILTED)
        self.writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.conns = {t: self.writer.add_connection(t, m, typestore=store) for t, m in self.topics.items()}
        self.counts = dict.fromkeys(self.topics, 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _on_clock(self, msg: Clock, info: Any) -> None:
        self.clock_at = (int(info["received_timestamp"]), msg.clock.sec * 1_000_000_000 + msg.clock.nanosec)

    def _on(self, topic: str, raw: bytes, info: Any) -> None:
        if self.writer is not None and self.clock_at is not None:
            wall, sim = self.clock_at
            t_ns = sim + round(self.rtf * (int(info["received_timestamp"]) - wall))
            self.writer.write(self.conns[topic], t_ns, raw)
            self.counts[topic] += 1


def record(out: Path, episodes: int, seconds: float, seed: int, action_noise: float, config: str,
           sim_params: str, rtf: float) -> list[Path]:
    """Start sim_node, the demonstrator and the recorder; one bag per episode in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    sim = subprocess.Popen(
        [sys.executable, "-m", "diffusion_controller.sim.sim_node", "--ros-args", "--params-file", sim_params,
         "-p", f"real_time_factor:={rtf}", "-p", "randomize_reset:=true", "-p", f"seed:={seed}"],
    )  # fmt: skip
    rclpy.init()
    demo = Demonstrator(config, seed, action_noise)
    topics = {cf_topic: s.type for s in demo.cfg.sources for cf_topic in [demo.resolve_topic_name(s.topic)]}
    topics[demo.resolve_topic_name(demo.cfg.commands_topic)] = "std_msgs/msg/Float64MultiArray"
    topics[demo.resolve_topic_name(LABELS)] = "std_msgs/msg/Float64MultiArray"
    rec = Recorder(topics, rtf)
    executor = SingleThreadedExecutor()
    executor.add_node(demo)
    executor.add_node(rec)
    reset = demo.create_client(Trigger, "/sim_node/reset")
    bags = []
    try:
        if not reset.wait_for_service(timeout_sec=60.0):
            raise RuntimeError("sim_node did not come up")
        for k in range(episodes):
            future = reset.call_async(Trigger.Request())
            executor.spin_until_future_complete(future, timeout_sec=30.0)
            demo.running = False
            spin_for(executor, demo, 0.3)  # the reset pose settles and the sensors refill
            bag = out / f"episode_{k:04d}"
            rec.open(bag)
            demo.start_episode(seconds)
            spin_for(executor, demo, seconds)
            demo.running = False
            rec.close()
            bags.append(bag)
            print(f"[record_demos] {bag}: {dict(rec.counts)}", flush=True)
    finally:
        rec.close()
        executor.shutdown()
        demo.intake.close()
        demo.destroy_node()
        rec.destroy_node()
        rclpy.try_shutdown()
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(10.0)
        except subprocess.TimeoutExpired:
            sim.kill()
    return bags


def spin_for(executor: SingleThreadedExecutor, node: Node, sim_seconds: float) -> None:
    """Spin until `sim_seconds` of the node's (sim) clock have passed."""
    start = node.get_clock().now().nanoseconds * 1e-9
    deadline = time.monotonic() + 10.0 + 20.0 * sim_seconds
    while node.get_clock().now().nanoseconds * 1e-9 - start < sim_seconds:
        executor.spin_once(timeout_sec=0.05)
        if time.monotonic() > deadline:
            raise RuntimeError("the simulation clock stopped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the bags (one per episode)")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--episode-seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--action-noise", type=float, default=0.15, help="DART noise on the sent targets (rad)")
    ap.add_argument("--config", default=str(ROOT / "config" / "ant.yaml"), help="the node's params file")
    ap.add_argument("--sim-params", default=str(ROOT / "config" / "sim.yaml"))
    ap.add_argument("--real-time-factor", type=float, default=1.0)
    args = ap.parse_args(argv)
    bags = record(Path(args.out), args.episodes, args.episode_seconds, args.seed, args.action_noise,
                  args.config, args.sim_params, args.real_time_factor)  # fmt: skip
    print(f"[record_demos] wrote {len(bags)} bags to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
