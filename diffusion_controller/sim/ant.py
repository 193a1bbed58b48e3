"""The demo robot: gymnasium's MuJoCo ant with ros2_control-style joint position control (no ROS).

Why this shape: the controller node talks to Gazebo + gz_ros2_control, where a position interface is a
joint PD loop running at the physics rate. Here the ant's eight motors (gear 150, ctrl +-1, i.e.
+-150 N m) are turned into exactly that PD servo inside MuJoCo, ``tau = clip(kp (q* - q) - kd qd,
+-150)``, so the loop runs in C at every physics step (fast enough for thousands of seconds of data
per minute). ``pd_torque`` is the same law in numpy, the reference the tests check MuJoCo against.

Sensors mirror the ROS messages a Gazebo setup publishes: joint positions/velocities by name, the IMU
orientation (ROS xyzw) and body angular velocity, the body-frame linear velocity and the world pose
of odometry. All frame math goes through ``diffusion_controller.core.features``, the same functions
the controller node uses, so training data and deployment preprocess identically.

Noise is Gaussian and seeded; observation delay returns the measurement taken ``obs_delay_s`` ago
(a buffer recorded at every physics step while a delay is set).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Sequence

import mujoco
import numpy as np

from diffusion_controller.core import features

JOINTS: tuple[str, ...] = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")
N_JOINTS = len(JOINTS)
CONTROL_PERIOD_S = 0.02
# Standing pose: hips straight out, ankles 1.0 rad down (the sign follows each ankle's axis).
STANDING_POSE = np.array([0.0, 1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 1.0])
TORQUE_LIMIT = 150.0  # gear 150 x ctrlrange 1 of the original motors
GAIT_FREQUENCY_HZ = 1.5  # the expert's trot (sim/expert.py); the policy sees this clock
# The effort-driven ant (AntConfig(drive="effort")): a torque loop at 200 Hz over 400 Hz physics, so each
# command is held for exactly two physics steps.
EFFORT_PERIOD_S = 0.005
EFFORT_TIMESTEP_S = 0.0025

# The observation row of the model card, in order (DESIGN.md); dataset and expert build rows with it.
OBS_LAYOUT: tuple[dict, ...] = (
    {"name": "projected_gravity", "kind": "projected_gravity", "size": 3},
    {"name": "base_angular_velocity", "kind": "base_angular_velocity", "size": 3},
    {"name": "base_linear_velocity", "kind": "base_linear_velocity", "size": 3},
    {"name": "velocity_command", "kind": "velocity_command", "size": 3},
    {"name": "joint_position", "kind": "joint_position", "size": 8, "joints": list(JOINTS)},
    {"name": "joint_velocity", "kind": "joint_velocity", "size": 8, "joints": list(JOINTS)},
    {"name": "previous_action", "kind": "previous_action", "size": 8},
    {"name": "gait_clock", "kind": "gait_clock", "size": 2, "frequency_hz": GAIT_FREQUENCY_HZ},
)
OBS_DIM = sum(f["size"] for f in OBS_LAYOUT)


def obs_slices() -> dict[str, slice]:
    """Feature name -> slice of the observation row."""
    out, i = {}, 0
    for f in OBS_LAYOUT:
        out[f["name"]] = slice(i, i + f["size"])
        i += f["size"]
    return out


OBS = obs_slices()


def layout_json() -> str:
    """The observation layout as stored with datasets."""
    return json.dumps(list(OBS_LAYOUT))


def ant_xml_path() -> str:
    """gymnasium's bundled ant.xml (the package is installed for this asset only)."""
    import gymnasium  # only needed to locate the file

    path = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets", "ant.xml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gymnasium's ant.xml not found at {path}")
    return path


def pd_torque(q_target: np.ndarray, q: np.ndarray, qd: np.ndarray, kp: float, kd: float) -> np.ndarray:
    """ros2_control-style position servo law, clipped to the motors' torque limit."""
    return np.clip(kp * (q_target - q) - kd * qd, -TORQUE_LIMIT, TORQUE_LIMIT)


@dataclasses.dataclass
class SensorNoise:
    """Standard deviations of additive Gaussian sensor noise (robot units)."""

    joint_position: float = 0.0  # rad
    joint_velocity: float = 0.0  # rad/s
    orientation: float = 0.0  # rad, small rotation about a random axis
    angular_velocity: float = 0.0  # rad/s
    linear_velocity: float = 0.0  # m/s

    @classmethod
    def realistic(cls, scale: float = 1.0) -> SensorNoise:
        """Levels of a cheap IMU, encoders and a leg-odometry velocity estimate."""
        return cls(0.002 * scale, 0.05 * scale, 0.005 * scale, 0.02 * scale, 0.03 * scale)


@dataclasses.dataclass
class AntConfig:
    timestep: float = 0.002  # s; 500 Hz physics, implicitfast integrator
    # Stiff enough to follow a 1.5 Hz gait (armature 1 -> ~20 rad/s, damping ratio ~0.6); softer gains
    # lag the gait and the feet slip, stiffer ones make the ant hop.
    kp: float = 400.0  # N m / rad
    kd: float = 24.0  # N m s / rad (the XML adds 1 N m s / rad joint damping)
    noise: SensorNoise = dataclasses.field(default_factory=SensorNoise)
    obs_delay_s: float = 0.0
    seed: int = 0
    fall_height: float = 0.22  # m, torso centre below this = fallen (standing is ~0.5)
    fall_gravity_z: float = -0.5  # projected gravity z above this (tilt > 60 deg) = fallen
    # "position": the motors are PD servos in MuJoCo (set_target); "effort": the motors are plain torque
    # motors (set_effort, N m), as behind a forward_effort_controller.
    drive: str = "position"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One sample of every sensor, taken at sim time ``t``."""

    t: float
    joint_position: np.ndarray  # (8,) JOINTS order, rad
    joint_velocity: np.ndarray  # (8,) rad/s
    orientation: np.ndarray  # (4,) base orientation, ROS xyzw (body -> world)
    angular_velocity: np.ndarray  # (3,) body frame, rad/s
    linear_velocity: np.ndarray  # (3,) body frame, m/s
    position: np.ndarray  # (3,) world, m

    @property
    def projected_gravity(self) -> np.ndarray:
        return features.projected_gravity(self.orientation)


def card_observation(
    m: Measurement, command: Sequence[float], previous_action: np.ndarray, clock_offset_s: float = 0.0
) -> np.ndarray:
    """One observation row in the card layout (OBS_LAYOUT), float64.

    The gait clock is taken at the measurement's own time (what the node does with the stamps), shifted
    by ``clock_offset_s`` so that datasets start their episodes at random gait phases.
    """
    return np.concatenate(
        [
            features.projected_gravity(m.orientation),
            m.angular_velocity,
            m.linear_velocity,
            np.asarray(command, dtype=float),
            m.joint_position,
            m.joint_velocity,
            np.asarray(previous_action, dtype=float),
            features.gait_clock(m.t + clock_offset_s, GAIT_FREQUENCY_HZ),
        ]
    )


def _build_model(cfg: AntConfig) -> mujoco.MjModel:
    """ant.xml with its motors turned into PD position servos (gear kept, force clamped to +-1)."""
    spec = mujoco.MjSpec.from_file(ant_xml_path())
    spec.option.timestep = cfg.timestep
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    if cfg.drive == "effort":  # ant.xml's own motors: torque = gear x ctrl, ctrl in [-1, 1]
        return spec.compile()
    if cfg.drive != "position":
        raise ValueError(f"AntConfig.drive must be 'position' or 'effort', got {cfg.drive!r}")
    for act in spec.actuators:
        joint = spec.joint(act.target)
        gear = float(act.gear[0])
        act.gaintype = mujoco.mjtGain.mjGAIN_FIXED
        act.biastype = mujoco.mjtBias.mjBIAS_AFFINE
        # actuator length = gear * q and torque = gear * force, hence the 1/gear and 1/gear^2.
        act.gainprm[:3] = [cfg.kp / gear, 0.0, 0.0]
        act.biasprm[:3] = [0.0, -cfg.kp / gear**2, -cfg.kd / gear**2]
        act.ctrllimited = mujoco.mjtLimited.mjLIMITED_TRUE
        act.ctrlrange = np.deg2rad(joint.range)  # the compiler converts joint ranges, not ctrlrange
        act.forcelimited = mujoco.mjtLimited.mjLIMITED_TRUE
        act.forcerange = [-TORQUE_LIMIT / gear, TORQUE_LIMIT / gear]
    return spec.compile()


class Ant:
    """The simulated robot: set position targets, advance time, read (noisy, delayed) sensors."""

    def __init__(self, cfg: AntConfig | None = None):
        self.cfg = cfg or AntConfig()
        self.model = _build_model(self.cfg)
        self.data = mujoco.MjData(self.model)
        m = self.model
        jids = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, j) for j in JOINTS]
        self._qadr = np.array([m.jnt_qposadr[j] for j in jids])
        self._dadr = np.array([m.jnt_dofadr[j] for j in jids])
        # Actuators are declared in another order in the XML; map JOINTS order -> actuator index.
        act_joint = [int(m.actuator_trnid[a, 0]) for a in range(m.nu)]
        self._act = np.array([act_joint.index(j) for j in jids])
        self.joint_lower = m.jnt_range[jids, 0].copy()
        self.joint_upper = m.jnt_range[jids, 1].copy()
        self.rng = np.random.default_rng(self.cfg.seed)
        self._buffer: collections.deque[Measurement] = collections.deque()
        self.target = STANDING_POSE.copy()
        self.reset(randomize=False)

    # ---- state -------------------------------------------------------------------------------
    @property
    def time(self) -> float:
        return float(self.data.time)

    @property
    def physics_rate(self) -> float:
        return 1.0 / self.model.opt.timestep

    def reset(
        self,
        randomize: bool = True,
        seed: int | None = None,
        pose: np.ndarray | None = None,
        keep_time: bool = False,
    ) -> None:
        """Put the ant standing at the origin; with randomize: random heading, joints and position.

        keep_time keeps the sim clock running (a ROS /clock must never jump back).
        """
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        d = self.data
        t = d.time
        mujoco.mj_resetData(self.model, d)
        if keep_time:
            d.time = t
        q = np.array(STANDING_POSE if pose is None else pose, dtype=float)
        yaw = 0.0
        if randomize:
            q = q + self.rng.uniform(-0.1, 0.1, N_JOINTS)
            yaw = self.rng.uniform(-np.pi, np.pi)
            d.qpos[0:2] = self.rng.uniform(-0.5, 0.5, 2)
        q = np.clip(q, self.joint_lower, self.joint_upper)
        d.qpos[self._qadr] = q
        d.qpos[3:7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        d.qpos[2] = 1.0
        mujoco.mj_kinematics(self.model, d)
        # Drop the torso so the lowest geom just touches the floor (no impact at start).
        d.qpos[2] -= self._lowest_point() - 0.002
        self.set_target(q)
        mujoco.mj_forward(self.model, d)
        self._buffer.clear()
        self._record()

    def _lowest_point(self) -> float:
        """Lowest z of the robot's geoms (spheres and capsules; the floor is geom 0)."""
        m, d = self.model, self.data
        low = np.inf
        for g in range(1, m.ngeom):
            half = m.geom_size[g, 1] if m.geom_type[g] == mujoco.mjtGeom.mjGEOM_CAPSULE else 0.0
            low = min(low, d.geom_xpos[g, 2] - abs(d.geom_xmat[g, 8]) * half - m.geom_size[g, 0])
        return float(low)

    def set_target(self, q_target: Sequence[float]) -> np.ndarray:
        """Joint position targets in JOINTS order, clipped to the joint ranges; returns what was applied."""
        q = np.clip(np.asarray(q_target, dtype=float), self.joint_lower, self.joint_upper)
        if not np.all(np.isfinite(q)):
            raise ValueError("non-finite joint target")
        self.target = q
        if self.cfg.drive == "position":
            self.data.ctrl[self._act] = q
        return q

    def set_effort(self, torque: Sequence[float]) -> np.ndarray:
        """Joint torques (N m, JOINTS order) of an effort-driven ant, clipped to the motors' limit; held
        until the next call. Returns what was applied."""
        if self.cfg.drive != "effort":
            raise RuntimeError("set_effort needs AntConfig(drive='effort')")
        tau = np.clip(np.asarray(torque, dtype=float), -TORQUE_LIMIT, TORQUE_LIMIT)
        if tau.shape != (N_JOINTS,) or not np.all(np.isfinite(tau)):
            raise ValueError("joint torques must be 8 finite values")
        self.data.ctrl[self._act] = tau / self.model.actuator_gear[self._act, 0]
        return tau

    def step(self, duration: float) -> None:
        """Advance the physics by ``duration`` seconds (rounded to whole physics steps)."""
        n = max(1, round(duration / self.model.opt.timestep))
        if self.cfg.obs_delay_s > 0.0:
            for _ in range(n):
                mujoco.mj_step(self.model, self.data)
                self._record()
        else:
            mujoco.mj_step(self.model, self.data, nstep=n)
            self._record()

    def joint_torque(self) -> np.ndarray:
        """Applied joint torques (JOINTS order) of the last step."""
        return self.data.actuator_force[self._act] * self.model.actuator_gear[self._act, 0]

    # ---- sensors -----------------------------------------------------------------------------
    def ground_truth(self) -> Measurement:
        """Noise-free sensors at the current time."""
        d = self.data
        quat = features.wxyz_to_xyzw(d.qpos[3:7])
        return Measurement(
            t=self.time,
            joint_position=d.qpos[self._qadr].copy(),
            joint_velocity=d.qvel[self._dadr].copy(),
            orientation=quat,
            angular_velocity=d.qvel[3:6].copy(),  # free-joint angular velocity is in the body frame
            linear_velocity=features.world_to_body(d.qvel[0:3], quat),
            position=d.qpos[0:3].copy(),
        )

    def specific_force(self) -> np.ndarray:
        """What an accelerometer at the base reads (body frame, m/s^2): +9.81 up when at rest."""
        d = self.data
        quat = features.wxyz_to_xyzw(d.qpos[3:7])
        return features.world_to_body(d.qacc[0:3] - self.model.opt.gravity, quat)

    def measure(self) -> Measurement:
        """Sensors at the current time with noise."""
        m = self.ground_truth()
        n = self.cfg.noise
        r = self.rng
        quat = m.orientation
        if n.orientation > 0.0:
            axis = r.normal(size=3)
            angle = r.normal() * n.orientation
            dq = np.concatenate([axis / np.linalg.norm(axis) * np.sin(angle / 2), [np.cos(angle / 2)]])
            quat = _quat_mul(quat, dq)
        return dataclasses.replace(
            m,
            joint_position=m.joint_position + r.normal(size=N_JOINTS) * n.joint_position,
            joint_velocity=m.joint_velocity + r.normal(size=N_JOINTS) * n.joint_velocity,
            orientation=quat,
            angular_velocity=m.angular_velocity + r.normal(size=3) * n.angular_velocity,
            linear_velocity=m.linear_velocity + r.normal(size=3) * n.linear_velocity,
        )

    def _record(self) -> None:
        self._buffer.append(self.measure())
        horizon = self.time - self.cfg.obs_delay_s - 2 * self.model.opt.timestep
        while len(self._buffer) > 1 and self._buffer[1].t <= horizon:
            self._buffer.popleft()

    def observe(self) -> Measurement:
        """What the controller sees now: the newest measurement taken at least obs_delay_s ago."""
        cutoff = self.time - self.cfg.obs_delay_s + 1e-9
        best = self._buffer[0]
        for m in self._buffer:
            if m.t <= cutoff:
                best = m
            else:
                break
        return best

    def fallen(self) -> bool:
        """Torso too low or tilted more than the configured limit (from ground truth)."""
        gt = self.ground_truth()
        return bool(
            gt.position[2] < self.cfg.fall_height or gt.projected_gravity[2] > self.cfg.fall_gravity_z
        )


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of xyzw quaternions."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )
