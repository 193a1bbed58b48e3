"""Expert gait controller for the ant: stand, walk (forward/backward/sideways) and turn by command.

A phase-based trot (diagonal pairs hip_1/hip_3 and hip_2/hip_4) whose stride comes from the velocity
command through the leg geometry and a slip gain (the feet slip, so the geometric mapping alone
under-delivers). Feedback on the measured body velocity (proportional and integral) exists but is off by
default, so the labels are a function of what the policy observes: see ExpertConfig.kp. Its only inputs
are the observation row of the model card (what the diffusion policy will see; the gait phase is the
row's gait clock) and its own internal state (gait activation, velocity filter, integrator). Output:
joint position targets at 50 Hz.

Geometry: leg i points along the body-frame angle theta_i = 45, 135, 225, 315 deg; a positive hip
angle turns the leg counter-clockwise, moving the foot along t_i = (-sin theta_i, cos theta_i). In
stance the foot must move against the body, ``-(v + w x r_foot)``; a diagonal pair can only push
along its own tangent, so translation needs twice the projection: the hip rate is
``-(2 t_i . v + wz * R_FOOT) / L_LEG``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffusion_controller.core.features import gait_phase
from diffusion_controller.sim.ant import (
    CONTROL_PERIOD_S,
    EFFORT_PERIOD_S,
    GAIT_FREQUENCY_HZ,
    JOINTS,
    OBS,
    STANDING_POSE,
    pd_torque,
)

LEG_ANGLES = np.deg2rad([45.0, 135.0, 225.0, 315.0])
TANGENTS = np.stack([-np.sin(LEG_ANGLES), np.cos(LEG_ANGLES)], axis=1)  # (4, 2)
R_FOOT = 0.87  # m, body centre to foot, horizontal, at the standing pose
L_LEG = 0.59  # m, hip joint to foot, horizontal
PHASE_OFFSET = np.array([0.0, 0.5, 0.0, 0.5])  # trot: legs 1+3, then 2+4
HIP = np.array([JOINTS.index(f"hip_{i}") for i in range(1, 5)])
ANKLE = np.array([JOINTS.index(f"ankle_{i}") for i in range(1, 5)])
ANKLE_SIGN = np.sign(STANDING_POSE[ANKLE])  # +1 where a larger angle pushes the foot down
HIP_LIMIT = 0.5  # rad, inside the +-30 deg joint range


@dataclasses.dataclass
class ExpertConfig:
    # Tuned on the ant (sim/evaluate.py): faster gaits or bigger lifts slip more and track worse.
    duty: float = 0.65  # stance fraction of the cycle (both pairs briefly on the ground)
    ankle_lift: float = 0.25  # rad, swing foot lift (ankle toward its upper-body side)
    # Feedforward gain on [vx, vy, wz]: the feet slip about a third of a translational stride.
    slip_gain: np.ndarray = dataclasses.field(default_factory=lambda: np.array([1.5, 1.5, 1.0]))
    # No velocity feedback by default. Feedback reads a 0.25 s filter of the measured velocity, state the
    # policy's 160 ms of noisy, within-stride-oscillating velocity history cannot reconstruct. Under DART
    # the perturbed robot walks slower, the feedback lengthens the labelled stride, and the policy, unable
    # to tell perturbed from clean, learns the average: it over-strode (over-speed 0.06-0.09 vs the
    # expert's 0.05 at 0.3 m/s). The expert barely needs it: on the closed-loop sequences it tracks at
    # 0.052 with kp 0, 0.049 with 0.15, 0.050 with 0.3; in-process, the policies trained on each tracked
    # at 0.057, 0.064 and 0.071. With ki = 1 the expert tracked at 0.098 (the integral carried over from
    # one command to the next) and wound up under DART to 0.3-0.45 m/s at a 0.3 m/s command.
    kp: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.0, 0.0, 0.0]))
    ki: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.0, 0.0, 0.0]))
    integral_limit: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.5, 0.5, 1.0]))
    filter_tau_s: float = 0.25  # low-pass on measured velocity (one gait half-cycle)
    activation_rate: float = 4.0  # 1/s, how fast the gait fades in/out around standing
    stand_threshold: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.03, 0.03, 0.05]))


class Expert:
    """Stateful gait controller; call ``act(obs)`` once per control period."""

    def __init__(self, cfg: ExpertConfig | None = None, period: float = CONTROL_PERIOD_S):
        self.cfg = cfg or ExpertConfig()
        self.period = period
        self.reset()

    def reset(self) -> None:
        self.activation = 0.0
        self.v_filtered = np.zeros(3)
        self.integral = np.zeros(3)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Joint position targets (JOINTS order) for the next period, from one card observation row."""
        c = self.cfg
        dt = self.period
        cmd = np.asarray(obs[OBS["velocity_command"]], dtype=float)
        measured = np.array(
            [
                obs[OBS["base_linear_velocity"]][0],
                obs[OBS["base_linear_velocity"]][1],
                obs[OBS["base_angular_velocity"]][2],
            ]
        )
        alpha = dt / (c.filter_tau_s + dt)
        self.v_filtered += alpha * (measured - self.v_filtered)

        moving = bool(np.any(np.abs(cmd) > c.stand_threshold))
        target_act = 1.0 if moving else 0.0
        step = c.activation_rate * dt
        self.activation += np.clip(target_act - self.activation, -step, step)

        if moving and self.activation > 0.5:
            err = cmd - self.v_filtered
            self.integral = np.clip(self.integral + c.ki * err * dt, -c.integral_limit, c.integral_limit)
            desired = cmd + c.kp * err + self.integral
        else:
            self.integral *= 0.95  # forget the slip estimate slowly while standing
            desired = cmd.copy()
        desired = desired * c.slip_gain

        # The targets are for the end of this period: the clock of the row plus one period.
        phase = (gait_phase(obs[OBS["gait_clock"]]) + GAIT_FREQUENCY_HZ * dt) % 1.0
        return self._pose(desired, self.activation, phase)

    def _pose(self, v: np.ndarray, activation: float, phase: float) -> np.ndarray:
        c = self.cfg
        stance_time = c.duty / GAIT_FREQUENCY_HZ
        # A stance pair can only push the body along its own tangent, so with pairs alternating each
        # must push twice the projection for the cycle average to be v; rotation needs no such factor.
        hip_rate = -(2.0 * (TANGENTS @ v[:2]) + v[2] * R_FOOT) / L_LEG  # (4,)
        amp = np.clip(-hip_rate * stance_time / 2.0, -HIP_LIMIT, HIP_LIMIT) * activation
        q = STANDING_POSE.copy()
        leg_phase = (phase + PHASE_OFFSET) % 1.0
        for leg in range(4):
            p = leg_phase[leg]
            if p < c.duty:  # stance: sweep hip from +amp to -amp
                s = p / c.duty
                hip = amp[leg] * (1.0 - 2.0 * s)
                lift = 0.0
            else:  # swing: return smoothly, foot raised
                s = (p - c.duty) / (1.0 - c.duty)
                hip = -amp[leg] * np.cos(np.pi * s)
                lift = np.sin(np.pi * s) * c.ankle_lift * activation
            q[HIP[leg]] = hip
            q[ANKLE[leg]] = STANDING_POSE[ANKLE[leg]] - ANKLE_SIGN[leg] * lift
        return q


@dataclasses.dataclass
class EffortExpertConfig:
    # Softer than the position servo (kp 400, kd 24 inside the physics): this PD closes through the
    # sensors, and with 40 ms of sensor delay kp 400 made the ant fall in every trial (docs/RESULTS.md).
    kp: float = 120.0  # N m / rad
    kd: float = 10.0  # N m s / rad
    # The sensor delay the expert knows of: it extrapolates the joint positions over it (q + d qd),
    # as the node's delay compensation stamps a chunk at its observation's time.
    lookahead_s: float = 0.0


class EffortExpert:
    """The gait of Expert as joint torques: its position targets through a PD law computed at the
    effort rate (200 Hz) from the observation row's joint state; the torque is held until the next call.
    """

    def __init__(self, cfg: EffortExpertConfig | None = None, period: float = EFFORT_PERIOD_S):
        self.cfg = cfg or EffortExpertConfig()
        self.gait = Expert(period=period)
        self.period = period

    def reset(self) -> None:
        self.gait.reset()

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Joint torques (N m, JOINTS order) for the next period, from one card observation row."""
        c = self.cfg
        target = self.gait.act(obs)
        q = np.asarray(obs[OBS["joint_position"]], dtype=float)
        qd = np.asarray(obs[OBS["joint_velocity"]], dtype=float)
        return pd_torque(target, q + c.lookahead_s * qd, qd, c.kp, c.kd)
