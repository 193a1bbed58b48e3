"""The closed loop through ROS: the controller node drives the simulated ant, an operator scores it.

Two processes talk over DDS exactly as on a robot: `sim_node` (MuJoCo, /clock, sensors with injected
observation delay, ros2_control command topics) and `controller_node` (a model, use_sim_time); with
`Setting.remote` the policy runs in a `policy_node` (optionally behind `link_emulator`). The `Operator`
(this process's ROS node) publishes the scripted velocity commands of `episode.command_sequence` on
/cmd_vel, watches the ground truth for falls and velocity tracking, and reads the controller's
/diagnostics and timing topic for latency, missed steps and stale actions. `run_setting` runs one
configuration for some episodes and returns its row. Used by the demo (`sim/demo.py`) and by
bench/closed_loop.py's evaluation and sweeps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from diffusion_controller.core.card_source import card_of_model, sidecar_path
from diffusion_controller.core.chunk import is_stale
from diffusion_controller.core.features import projected_gravity
from diffusion_controller.ros.config import NodeConfig
from diffusion_controller.ros.outputs import SLOT, TICK
from diffusion_controller.ros.params_file import load_params_file
from diffusion_controller.share import share_dir
from diffusion_controller.sim.ant import EFFORT_TIMESTEP_S
from diffusion_controller.sim.episode import NOISE, command_sequence, merge_errors, vel_error
from diffusion_controller.sim.evaluate import Rollout, tracking_errors

#: Where models/ and config/ are: the source checkout, or the share directory of a colcon install.
ROOT = share_dir()
MODEL = ROOT / "models" / "ant_locomotion.onnx"
DENOISER = ROOT / "models" / "ant_locomotion_denoiser.onnx"
CONFIG = ROOT / "config" / "ant.yaml"
EFFORT_CONFIG = ROOT / "config" / "ant_effort.yaml"  # the default for a model whose card says effort
PERIOD = 0.02


def node_config(path: Path) -> NodeConfig:
    """What a controller started with this params file runs (the parameters' own defaults where it is
    silent), so the demo and the benchmarks run what users of the file run."""
    return NodeConfig.from_params(load_params_file(str(path)))


CONFIG_BLEND = node_config(CONFIG).blend
FALL_HEIGHT, FALL_GRAVITY_Z = 0.22, -0.5  # the sim's own fall criterion (sim/ant.py AntConfig)


@dataclasses.dataclass
class Setting:
    """One closed-loop configuration (a row of a sweep)."""

    steps: int = 0  # 0 = the fused model's own K; else the denoiser model with this K
    obs_delay_s: float = 0.04
    compensate_delay: bool = True
    real_time_factor: float = 1.0  # the sim's pace; < 1 gives every process more wall time per tick
    blend: str = CONFIG_BLEND
    spacing: str = ""  # denoiser rows: DDIM timestep spacing ("" = the denoiser card's)
    remote: bool = False  # the policy in a policy_node process, chunks over DDS (and the link below)
    link_delay_s: float = 0.0  # link_emulator between them when any of these is set
    link_jitter_s: float = 0.0
    link_loss: float = 0.0

    @property
    def link(self) -> bool:
        return self.remote and (self.link_delay_s > 0 or self.link_jitter_s > 0 or self.link_loss > 0)

    def label(self) -> str:
        k = self.steps or "card"
        comp = "on" if self.compensate_delay else "off"
        spacing = f" {self.spacing}" if self.spacing else ""
        where = f" rtf={self.real_time_factor:g}" if self.real_time_factor != 1.0 else ""
        if self.remote:
            where += " remote"
            if self.link:
                where += (f" link={self.link_delay_s * 1000:.0f}+-{self.link_jitter_s * 1000:.0f}ms "
                          f"loss={self.link_loss * 100:.0f}%")  # fmt: skip
        return f"K={k}{spacing} delay={self.obs_delay_s * 1000:.0f}ms comp={comp} blend={self.blend}{where}"


def respaced(denoiser: Path, spacing: str, directory: Path) -> Path:
    """A copy of a denoiser model whose card samples with `spacing` (the network is the same)."""
    import shutil


    card = card_of_model(denoiser)
    if not spacing or card.diffusion.timestep_spacing == spacing:
        return denoiser
    out = directory / f"{denoiser.stem}_{spacing}.onnx"
    shutil.copyfile(denoiser, out)
    card = card.replace(diffusion=dataclasses.replace(card.diffusion, timestep_spacing=spacing))
    card.to_onnx(out)
    card.to_yaml(sidecar_path(out))
    return out


def model_of(setting: Setting, model: Path, denoiser: Path, directory: Path) -> Path:
    """The .onnx a setting runs: the fused model, or the denoiser (respaced if asked) for a K row."""
    return model if setting.steps == 0 else respaced(denoiser, setting.spacing, directory)


class Processes:
    """sim_node + controller_node as child processes in their own DDS domain; stopped with SIGINT."""

    def __init__(
        self,
        setting: Setting,
        seed: int,
        log_dir: Path,
        model: Path,
        controller_threads: int = 1,
        config: Path = CONFIG,
        effort: bool = False,
        cpus: tuple[str, str] = ("", ""),
    ) -> None:
        """`model`: the .onnx the controller runs (model_of(setting, ...)); `config` its params file;
        `effort`: the sim's motors take torques (drive effort, 400 Hz physics, every sensor at the 200 Hz
        control rate as in the model's training rows, /clock at every physics step); `cpus`: CPU lists of
        the sim with the node's real-time threads, and of the node's model threads ("" = any)."""
        self.env = dict(os.environ)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        py = sys.executable
        sim_args = [
            "-p",
            f"real_time_factor:={setting.real_time_factor}",
            "-p",
            f"obs_delay_s:={setting.obs_delay_s}",
            "-p",
            f"seed:={seed}",
            "-p",
            "fall_reset:=false",
            "-p",
            "joint_states_rate_hz:=100.0",
        ] + [a for k, v in NOISE.items() for a in ("-p", f"noise.{k}:={v}")]
        if effort:
            sim_args += ["-p", "drive:=effort", "-p", f"physics_timestep:={EFFORT_TIMESTEP_S}",
                         "-p", "joint_states_rate_hz:=200.0", "-p", "imu_rate_hz:=200.0",
                         "-p", "odom_rate_hz:=200.0", "-p", "clock_rate_hz:=400.0"]  # fmt: skip
        if cpus[0]:
            sim_args += ["-p", f"cpu_affinity:='{cpus[0]}'"]  # quoted: a bare 1 is an integer to ROS
        ctl_args = [
            "--params-file",
            str(config),
            "-p",
            f"model_path:={model}",
            "-p",
            "use_sim_time:=true",
            "-p",
            f"compensate_delay:={str(setting.compensate_delay).lower()}",
            "-p",
            f"blend:={setting.blend}",
            "-p",
            f"steps:={setting.steps}",
            "-p",
            f"threads:={controller_threads}",
            "-p",
            f"seed:={seed}",
            "-p",
            "outputs.trajectory.enabled:=false",
        ] + [a for name, v in zip(("cpu_affinity", "model_cpu_affinity"), cpus, strict=True) if v
             for a in ("-p", f"{name}:='{v}'")]  # fmt: skip
        self._start("sim", [py, "-m", "diffusion_controller.sim.sim_node", "--ros-args", *sim_args], log_dir)
        if setting.remote:
            # Same parameters for the policy node (model, K, seed, observation sources); the controller
            # loads no model. With a link, the policy publishes on chunk_tx and link_emulator relays.
            chunk_topic = "policy/chunk_tx" if setting.link else "policy/chunk"
            pairs = list(zip(ctl_args[::2], ctl_args[1::2], strict=True))
            pol_args = [a for pair in pairs if not pair[1].startswith("outputs.") for a in pair]
            self._start(
                "policy",
                [py, "-m", "diffusion_controller.ros.policy_node", "--ros-args", *pol_args,
                 "-p", f"policy.chunk_topic:={chunk_topic}"],
                log_dir,
            )  # fmt: skip
            if setting.link:
                link = ["--in", "/policy/chunk_tx", "--out", "/policy/chunk", "--delay",
                        str(setting.link_delay_s), "--jitter", str(setting.link_jitter_s), "--loss",
                        str(setting.link_loss), "--seed", str(seed)]  # fmt: skip
                self._start("link", [py, "-m", "diffusion_controller.sim.link_emulator", *link], log_dir)
            ctl_args += ["-p", "policy.source:=remote"]
        self._start(
            "controller",
            [py, "-m", "diffusion_controller.ros.controller_node", "--ros-args", *ctl_args],
            log_dir,
        )

    def _start(self, name: str, cmd: list[str], log_dir: Path) -> None:
        log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
        self.procs.append(
            (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT))
        )

    def alive(self) -> list[str]:
        return [n for n, p in self.procs if p.poll() is not None]

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for name, p in self.procs:
            try:
                codes[name] = p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = None
        return codes


class Operator:
    """The bench's own ROS node: sends /cmd_vel, records ground truth, diagnostics and command timing."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import Twist
        from nav_msgs.msg import Odometry
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter
        from std_msgs.msg import Float64MultiArray
        from std_srvs.srv import Trigger

        self.rclpy = rclpy
        self.Twist, self.Trigger = Twist, Trigger
        self.node = rclpy.create_node(
            "closed_loop_operator", parameter_overrides=[Parameter("use_sim_time", value=True)]
        )
        self.cmd_pub = self.node.create_publisher(Twist, "/cmd_vel", 10)
        self.reset_cli = self.node.create_client(Trigger, "/sim_node/reset")
        self.lock = threading.Lock()
        self.truth: list[tuple[float, float, float, float, bool]] = []  # t, vx, vy, wz, fallen
        self.timing: list[tuple[float, ...]] = []
        self.timing_wall: list[float] = []  # time.time() each timing row arrived (machine-stall attribution)
        self.diag: dict[str, str] = {}
        self.node.create_subscription(Odometry, "/sim_node/ground_truth", self._on_truth, 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.node.create_subscription(
            Float64MultiArray, "/diffusion_controller/debug/command_timing", self._on_timing, 100
        )
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _on_truth(self, msg) -> None:
        q = msg.pose.pose.orientation
        g = projected_gravity(np.array([q.x, q.y, q.z, q.w]))
        fallen = msg.pose.pose.position.z < FALL_HEIGHT or g[2] > FALL_GRAVITY_Z
        t = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        v, w = msg.twist.twist.linear, msg.twist.twist.angular
        with self.lock:
            self.truth.append((t, v.x, v.y, w.z, fallen))

    def _on_diag(self, msg) -> None:
        with self.lock:
            for st in msg.status:
                if "diffusion_controller" in st.name and not st.name.endswith(": model"):
                    for kv in st.values:
                        self.diag[kv.key] = kv.value

    def _on_timing(self, msg) -> None:
        with self.lock:
            self.timing.append(tuple(msg.data))
            self.timing_wall.append(time.time())

    def send(self, cmd: tuple[float, float, float]) -> None:
        m = self.Twist()
        m.linear.x, m.linear.y, m.angular.z = cmd
        self.cmd_pub.publish(m)

    def wait_until(self, pred, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.05)
        return False

    def reset_sim(self) -> None:
        if not self.reset_cli.wait_for_service(timeout_sec=10.0):
            raise RuntimeError("sim_node ~/reset service did not appear")
        fut = self.reset_cli.call_async(self.Trigger.Request())
        self.wait_until(fut.done, 5.0)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


def diag_number(diag: dict[str, str], *names: str) -> float:
    for n in names:
        if n in diag:
            try:
                return float(diag[n])
            except ValueError:
                return math.nan
    return math.nan


def row_slots(rows: np.ndarray) -> np.ndarray:
    """The grid slot of each ~/debug/command_timing row (its SLOT column, the timer's expected call time)
    where the node has it, else the row's tick time (rclpy before Jazzy): what tick_gaps counts skips
    from."""
    rows = np.atleast_2d(np.asarray(rows, dtype=float))
    if rows.shape[1] <= SLOT:
        return rows[:, TICK]
    return np.where(np.isfinite(rows[:, SLOT]), rows[:, SLOT], rows[:, TICK])


def tick_gaps(
    ticks: np.ndarray, period: float, walls: np.ndarray | None = None
) -> list[tuple[float, float, int]]:
    """The gaps of more than one period between consecutive `ticks` (seconds on the node's clock), as
    (wall time of the tick before, of the tick after, slots skipped); `walls` default to the ticks."""
    ticks = np.asarray(ticks, dtype=float)
    walls = ticks if walls is None else np.asarray(walls, dtype=float)
    skipped = np.round(np.diff(ticks) / period).astype(int) - 1
    return [(float(walls[i]), float(walls[i + 1]), int(skipped[i])) for i in np.flatnonzero(skipped > 0)]


def run_episode(op: Operator, ep: int, seconds: float, control_period: float = PERIOD) -> dict:
    """Reset the robot, stand 1 s, play the sequence (sim time), return its tracking metrics."""
    op.send((0.0, 0.0, 0.0))
    op.reset_sim()
    t_settle = op.now() + 1.0
    op.wait_until(lambda: op.now() >= t_settle, 10.0)
    with op.lock:
        op.truth.clear()
        n_timing = len(op.timing)
    seq = command_sequence(ep, seconds)
    t0 = op.now()
    bounds = np.cumsum([d for d, _ in seq])
    fell = False
    while True:
        t = op.now() - t0
        if t >= bounds[-1]:
            break
        i = int(np.searchsorted(bounds, t, side="right"))
        op.send(seq[min(i, len(seq) - 1)][1])
        with op.lock:
            fell = any(x[4] for x in op.truth[-5:]) if op.truth else False
        if fell:
            break
        time.sleep(0.02)
    with op.lock:
        truth = np.array(op.truth) if op.truth else np.zeros((0, 5))
        timing = np.array(op.timing[n_timing:]) if len(op.timing) > n_timing else np.zeros((0, 7))
    # align: command at each ground-truth sample from the schedule (both in sim time)
    rel = truth[:, 0] - t0
    keep = (rel >= 0) & (rel < bounds[-1])
    truth, rel = truth[keep], rel[keep]
    idx = np.minimum(np.searchsorted(bounds, rel, side="right"), len(seq) - 1)
    commands = np.array([seq[i][1] for i in idx]) if len(idx) else np.zeros((0, 3))
    r = Rollout(
        obs=np.zeros((len(rel), 0)),
        action=np.zeros((len(rel), 0)),
        command=commands,
        true_velocity=truth[:, 1:4] if len(truth) else np.zeros((0, 3)),
        time=rel,
        fell=fell,
    )
    stale = 0
    if len(timing):
        t_exec, t_action = timing[:, 1], timing[:, 2]
        running = np.isfinite(t_action)
        stale = int(np.sum(running & is_stale(t_action, t_exec, control_period)))
    return {
        "fell": fell or bool(len(truth) and truth[:, 4].any()),
        "errors": tracking_errors(r, period=PERIOD),
        "stale": stale,
        "ticks": len(timing),
        "trace": {"t": rel, "command": commands, "velocity": r.true_velocity},
    }


def run_setting(
    setting: Setting,
    episodes: int,
    seconds: float,
    seed: int,
    log_dir: Path,
    model: Path = MODEL,
    denoiser: Path = DENOISER,
    verbose: bool = True,
    config: Path = CONFIG,
    cpus: tuple[str, str] = ("", ""),
) -> dict:
    import rclpy

    model = model_of(setting, model, denoiser, log_dir)  # once: a respaced denoiser is written here
    card = card_of_model(model)
    effort = card.action_kind == "effort"
    procs = Processes(setting, seed, log_dir, model, config=config, effort=effort, cpus=cpus)
    rclpy.init()
    op = Operator()
    try:
        ready = op.wait_until(
            lambda: diag_number(op.diag, "state_code") == 1.0
            or "RUNNING" in op.diag.values()
            or len(op.timing) > 20,
            60.0,
        )
        if not ready or procs.alive():
            raise RuntimeError(f"nodes did not come up (exited: {procs.alive()}); see logs in {log_dir}")
        results = []
        for ep in range(episodes):
            r = run_episode(op, ep, seconds, float(card.control_period_s))
            results.append(r)
            if verbose:
                print(
                    f"  episode {ep + 1}/{episodes}: fell={r['fell']} vel_err={vel_error(r['errors']):.3f} "
                    f"stale={r['stale']}",
                    flush=True,
                )
        time.sleep(1.5)  # one more diagnostics period
        with op.lock:
            diag = dict(op.diag)
            ticks = row_slots(np.array(op.timing)) if op.timing else np.zeros(0)
            gaps = tick_gaps(ticks, float(card.control_period_s), np.array(op.timing_wall))
    finally:
        op.close()
        rclpy.shutdown()
        codes = procs.stop()
    merged = merge_errors([r["errors"] for r in results])
    if results:
        setting_plot = log_dir / f"velocity_{len(list(log_dir.glob('velocity_*.png')))}.png"
        plot(setting_plot, results[0]["trace"], f"policy, {setting.label()}, episode 1")
    return {
        **dataclasses.asdict(setting),
        "setting": setting.label(),
        "steps": setting.steps or card.steps,  # the K that ran
        "spacing": card.diffusion.timestep_spacing,
        "sampler": card.sampler_kind,
        "model": card.name,
        "episodes": episodes,
        "falls": sum(r["fell"] for r in results),
        "policy_vel_err": vel_error(merged),
        "per_skill": merged,
        "stale_actions_published": sum(r["stale"] for r in results),
        "missed_steps": diag_number(diag, "missed_steps"),
        "missed_ticks": diag_number(diag, "missed_ticks"),
        "tick_gaps": gaps,  # from the timing rows: (wall before, wall after, slots skipped)
        "inference_ms_p50": diag_number(diag, "inference_p50_ms"),  # request -> usable at a tick
        "inference_ms_p99": diag_number(diag, "inference_p99_ms"),
        "compute_ms_p50": diag_number(diag, "compute_p50_ms"),  # the model alone
        "compute_ms_p99": diag_number(diag, "compute_p99_ms"),
        "provider": diag.get("provider", "?"),
        "chunks_received": diag_number(diag, "chunks_received"),
        "chunks_dropped": diag_number(diag, "chunks_dropped"),
        "chunks_refused": diag_number(diag, "chunks_refused"),
        "safe_entries": diag_number(diag, "safe_entries"),
        "exit_codes": codes,
    }


def plot(path: Path, trace: dict, title: str) -> None:
    """Commanded vs achieved forward velocity and yaw rate over one episode (gait-cycle averaged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, cmd, vel = trace["t"], trace["command"], trace["velocity"]
    w = max(1, round((2.0 / 3.0) / PERIOD))  # one 1.5 Hz gait cycle, as tracking_errors averages
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for ax, j, name, unit in ((axes[0], 0, "forward velocity", "m/s"), (axes[1], 2, "yaw rate", "rad/s")):
        ax.plot(t, cmd[:, j], "k--", lw=1.5, label="commanded")
        ax.plot(t, vel[:, j], color="tab:blue", alpha=0.25, lw=0.8, label="achieved (raw)")
        if len(t) > w:
            smooth = np.convolve(vel[:, j], np.ones(w) / w, mode="same")
            ax.plot(t, smooth, color="tab:blue", lw=1.8, label="achieved (gait-cycle mean)")
        ax.set_ylabel(f"{name} ({unit})")
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("time (s, sim)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

