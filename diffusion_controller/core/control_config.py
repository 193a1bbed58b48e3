"""How the core schedules, blends and guards commands (`ControlConfig`), and the checks of it.

The checks that need no model run when a ControlConfig is made; those that need the model card
(`check_card`: execute_steps within the horizon, a safe mode the action kind allows, inpainting) run when
a core is built or swapped. A refusal is a `ConfigError` naming the field, so the ROS layer can report it
under the parameter's name. Its field defaults are the node's parameter defaults too (ros/config.py reads
them from here), so the core used alone (tests, the simulator, the dataset converter) and the node agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .observation import (
    JOINT_VELOCITY,
    NOT_REQUIRED_KINDS,
    VELOCITY_COMMAND,
    ObservationHistory,
    action_joint_map,
)
from .safety import SAFE_MODES, safe_mode_refusal
from .scheduler import BLEND_MODES, inpaint_refusal


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"ControlConfig.{field}: {message}")
        self.field = field
        self.reason = message  # without the field: a caller reports it under its own name for the field


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ControlConfig:
    """How the core schedules, blends and guards commands. Card-independent checks run on creation."""

    exec_latency_s: float = 0.0
    execute_steps: int = 1
    blend: str = "none"
    crossfade_steps: int = 4
    ensemble_chunks: int = 4
    max_consecutive_misses: int = 5
    compensate_delay: bool = True
    obs_timeout_s: float = 0.1
    obs_timeouts_s: Mapping[str, float] = field(default_factory=dict)
    command_timeout_s: float | None = None
    future_tolerance_s: float = 0.05
    safe_mode: str = "hold"
    default_pose: tuple[float, ...] | None = None
    max_step_per_tick: float = 0.2
    damping_gain: float = 0.0  # safe_mode damping: N m s/rad
    latency_window: int = 10
    seed: int | None = 0
    chunk_timeout_s: float | None = None  # external chunks: none accepted for this long -> SAFE

    def __post_init__(self) -> None:
        def number(name: str, *, positive: bool = False, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not _is_number(v) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                bound = "> 0" if positive else ">= 0"
                raise ConfigError(name, f"expected a finite number {bound}, got {v!r}")

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise ConfigError(name, f"expected an integer >= {lo}, got {v!r}")

        def choice(name: str, choices: tuple[str, ...]) -> None:
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"expected one of {choices}, got {getattr(self, name)!r}")

        number("exec_latency_s")
        integer("execute_steps", 1)
        choice("blend", BLEND_MODES)
        integer("crossfade_steps", 0)
        integer("ensemble_chunks", 1)
        integer("max_consecutive_misses", 1)
        if not isinstance(self.compensate_delay, bool):
            raise ConfigError("compensate_delay", f"expected true or false, got {self.compensate_delay!r}")
        number("obs_timeout_s", positive=True)
        if not isinstance(self.obs_timeouts_s, Mapping):
            got = repr(self.obs_timeouts_s)
            raise ConfigError("obs_timeouts_s", f"expected a mapping name -> seconds, got {got}")
        for name, t in self.obs_timeouts_s.items():
            if not _is_number(t) or not math.isfinite(t) or t <= 0:
                raise ConfigError("obs_timeouts_s", f"{name}: expected a finite number > 0, got {t!r}")
        object.__setattr__(self, "obs_timeouts_s", dict(self.obs_timeouts_s))
        number("command_timeout_s", positive=True, optional=True)
        number("future_tolerance_s")
        choice("safe_mode", SAFE_MODES)
        if self.default_pose is not None:
            try:
                pose = tuple(float(x) for x in self.default_pose)
            except (TypeError, ValueError):
                got = repr(self.default_pose)
                raise ConfigError("default_pose", f"expected a list of numbers, got {got}") from None
            if not all(math.isfinite(x) for x in pose):
                raise ConfigError("default_pose", "expected finite numbers")
            object.__setattr__(self, "default_pose", pose)
        elif self.safe_mode == "default_pose":
            raise ConfigError("default_pose", "required when safe_mode is 'default_pose'")
        number("max_step_per_tick", positive=True)
        number("damping_gain", positive=self.safe_mode == "damping")
        integer("latency_window", 1)
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError("seed", f"expected an integer or None, got {self.seed!r}")
        number("chunk_timeout_s", positive=True, optional=True)

    def history_for(self, card: Any) -> ObservationHistory:
        """The observation history of `card` under this configuration (a velocity command older than
        command_timeout_s reads as zero); the node's core, the dataset converter and the demonstrator
        build theirs here, so all compute the same rows."""
        expire = {}
        if self.command_timeout_s is not None:
            expire = {f.name: self.command_timeout_s for f in card.features if f.kind == VELOCITY_COMMAND}
        return ObservationHistory(card, future_tolerance_s=self.future_tolerance_s, expire_s=expire)

    def timeouts_for(self, required: Any) -> dict[str, float]:
        """The watchdog timeout of each required feature."""
        return {n: self.obs_timeouts_s.get(n, self.obs_timeout_s) for n in required}

    def check_card(self, card: Any, policy: Any = None) -> None:
        """The checks that need the model (without a policy, the card says whether it can inpaint):
        raises ConfigError naming the field."""
        horizon, n_joints = int(card.horizon), len(card.action_joints)
        why = safe_mode_refusal(getattr(card, "action_kind", "position"), self.safe_mode)
        if why:
            raise ConfigError("safe_mode", why)
        if self.safe_mode == "damping" and action_joint_map(card, JOINT_VELOCITY) is None:
            raise ConfigError("safe_mode", "'damping' needs the joint velocity of every action joint, and "
                              "the model has no joint_velocity feature with them all: use 'zero'")
        if self.execute_steps > horizon:
            got = self.execute_steps
            raise ConfigError("execute_steps", f"expected <= the model's horizon {horizon}, got {got}")
        if self.default_pose is not None and len(self.default_pose) != n_joints:
            got = len(self.default_pose)
            raise ConfigError("default_pose", f"expected {n_joints} values (one per action joint), got {got}")
        required = sorted(f.name for f in card.features if f.kind not in NOT_REQUIRED_KINDS)
        unknown = sorted(set(self.obs_timeouts_s) - set(required))
        if unknown:
            raise ConfigError("obs_timeouts_s", f"unknown features {unknown}; required ones are {required}")
        if policy is not None:
            inpainting = getattr(policy, "supports_inpainting", False)
        else:
            inpainting = getattr(card, "sampler_inpainting", True)
        if self.blend == "inpaint" and not inpainting:
            raise ConfigError("blend", inpaint_refusal(getattr(card, "sampler_kind", "?")))
