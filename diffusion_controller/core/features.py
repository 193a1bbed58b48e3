"""Sensor math shared by the controller node and the dataset generator.

Training data and deployment must preprocess identically, so every observation feature that is derived
from a raw sensor value is computed here and nowhere else. Quaternions are ROS order (x, y, z, w).
"""

from __future__ import annotations

import numpy as np

GRAVITY_WORLD = np.array([0.0, 0.0, -1.0])


def quat_is_valid(q_xyzw: np.ndarray, tol: float = 0.1) -> bool:
    """True when q is finite and close to unit length (a zero or garbage quaternion is not)."""
    q = np.asarray(q_xyzw, dtype=float)
    return q.shape == (4,) and bool(np.all(np.isfinite(q))) and abs(float(np.linalg.norm(q)) - 1.0) < tol


def quat_to_matrix(q_xyzw: np.ndarray) -> np.ndarray:
    """Rotation matrix (body -> world) of a unit quaternion; the quaternion is normalized first."""
    x, y, z, w = np.asarray(q_xyzw, dtype=float) / np.linalg.norm(q_xyzw)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def projected_gravity(q_xyzw: np.ndarray) -> np.ndarray:
    """Unit gravity direction in the body frame, R^T [0, 0, -1]: how the base is tilted."""
    return quat_to_matrix(q_xyzw).T @ GRAVITY_WORLD


def world_to_body(v_world: np.ndarray, q_xyzw: np.ndarray) -> np.ndarray:
    """Express a world-frame vector in the body frame."""
    return quat_to_matrix(q_xyzw).T @ np.asarray(v_world, dtype=float)


def yaw_of(q_xyzw: np.ndarray) -> float:
    """Heading angle about world z (rad)."""
    x, y, z, w = np.asarray(q_xyzw, dtype=float) / np.linalg.norm(q_xyzw)
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def wxyz_to_xyzw(q_wxyz: np.ndarray) -> np.ndarray:
    """MuJoCo stores quaternions (w, x, y, z); ROS messages use (x, y, z, w)."""
    q = np.asarray(q_wxyz, dtype=float)
    return np.array([q[1], q[2], q[3], q[0]])


def gait_clock(t: np.ndarray | float, frequency_hz: float) -> np.ndarray:
    """[sin, cos] of the gait phase 2 pi f t at time(s) t, shape (..., 2).

    A periodic gait's phase is hidden state of the controller that produced the data; with only a few
    rows of history a policy must guess it, and for small strides it cannot (it stops stepping). A clock
    input, as in "Walk These Ways" (Margolis & Agrawal 2022), makes the phase observable. It depends on
    time only, so the node and the dataset compute it identically; the absolute offset does not matter.
    The phase is reduced modulo one period in float64 before the trigonometry, so wall-clock stamps
    (~1.7e9 s) lose no precision.
    """
    phase = np.mod(np.asarray(t, dtype=float) * float(frequency_hz), 1.0)
    return np.stack([np.sin(2 * np.pi * phase), np.cos(2 * np.pi * phase)], axis=-1)


def gait_phase(clock: np.ndarray) -> float:
    """The phase in [0, 1) of one [sin, cos] clock value (inverse of `gait_clock`)."""
    return float(np.mod(np.arctan2(clock[0], clock[1]) / (2 * np.pi), 1.0))
