"""The node's configuration against one model card: what fits, what does not, and what gets wired up.

`validate_against_card` runs every check below and names every violation at once, so a user fixes a
params file in one pass: which source fills which card feature (exactly one each, of a message type that
can), the output joints, the default pose, what a remote policy cannot honour, the outputs for the card's
action kind, and what the core itself checks against a card. It resolves the wiring (`Binding`), and
`control_config` hands the core its configuration, one `ControlConfig` field at a time.

Plain Python (no rclpy), like ros/config.py: the dataset converter and the demonstrator bind a card too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusion_controller.core.control_config import ConfigError as CoreConfigError
from diffusion_controller.core.control_config import ControlConfig
from diffusion_controller.core.observation import COMPUTED_KINDS
from diffusion_controller.ros.config import (
    COMPUTED_AS,
    KINDS_BY_TYPE,
    NEVER_S,
    NODE_PARAMS,
    ConfigError,
    NodeConfig,
)
from diffusion_controller.ros.outputs import check_outputs

#: ControlConfig fields no parameter sets: the core's own defaults apply (every required feature gets its
#: source's timeout in obs_timeouts_s, so obs_timeout_s is never consulted; the latency window is internal).
CORE_ONLY_FIELDS = ("obs_timeout_s", "latency_window")
#: ControlConfig field -> the parameter it comes from (how a refusal of the core is reported).
PARAM_OF_CONTROL = {s.control: s.name for s in NODE_PARAMS if s.control}


@dataclass(frozen=True)
class Binding:
    """A configuration resolved against one model card: what the node wires up for that model."""

    output_joints: tuple[str, ...]  # published order (robot names)
    output_index: tuple[int, ...]  # output_joints[i] carries card action index output_index[i]
    rename: Mapping[str, str]  # card joint name -> robot joint name (JointState lookup)
    feature_source: Mapping[str, str]  # card feature name -> source name (previous_action absent)
    default_pose: tuple[float, ...]  # in card action order
    period_s: float  # tick period


def feature_owners(cfg: NodeConfig, card: Any, errors: list[str]) -> dict[str, list[str]]:
    """Card feature name -> the sources that fill it; appends a problem for every feature a source names
    that the card lacks, the node computes itself, or its message type cannot fill."""
    features = {f.name: f for f in card.features}
    owner: dict[str, list[str]] = {}
    for src in cfg.sources:
        allowed = KINDS_BY_TYPE.get(src.type, frozenset())
        for name in src.features:
            feat = features.get(name)
            if feat is None:
                errors.append(
                    f"observations.{src.name}.features: '{name}' is not a feature of model card "
                    f"'{card.name}' (card features: {', '.join(features)})"
                )
                continue
            if feat.kind in COMPUTED_KINDS:
                errors.append(
                    f"observations.{src.name}.features: '{name}' is the node's {COMPUTED_AS[feat.kind]}; "
                    "no source may fill it"
                )
                continue
            if src.type and feat.kind not in allowed:
                errors.append(
                    f"observations.{src.name}: a {src.type} cannot fill '{name}' (kind {feat.kind}); "
                    f"it fills kinds {', '.join(sorted(allowed))}"
                )
            owner.setdefault(name, []).append(src.name)
    return owner


def check_every_feature_filled_once(card: Any, owner: Mapping[str, list[str]], errors: list[str]) -> None:
    """Every card feature the node does not compute is filled by exactly one source; previous_action is as
    long as the action."""
    for feat in card.features:
        name = feat.name
        if feat.kind == "previous_action" and feat.size != card.action_dim:
            errors.append(
                f"card feature '{name}': previous_action size {feat.size} != action_dim {card.action_dim}"
            )
        if feat.kind in COMPUTED_KINDS:
            continue
        srcs = owner.get(name, [])
        if not srcs:
            errors.append(
                f"card feature '{name}' (kind {feat.kind}, size {feat.size}) is filled by no observation "
                "source; add it to the features of one source"
            )
        elif len(srcs) > 1:
            errors.append(
                f"card feature '{name}' is filled by several sources ({', '.join(srcs)}); "
                "exactly one must fill it"
            )


def resolve_joints(
    cfg: NodeConfig, card: Any, errors: list[str]
) -> tuple[tuple[str, ...], tuple[int, ...], dict[str, str]]:
    """(published joints, the card action index each carries, card name -> robot name) from `joints` and
    `model_joints`; the index is empty when they do not list each card action joint once."""
    card_joints = tuple(card.action_joints)
    model_joints = cfg.model_joints or cfg.joints or card_joints
    output_joints = tuple(cfg.joints or card_joints)
    rename = dict(zip(model_joints, output_joints, strict=False)) if cfg.joints else {}
    if sorted(model_joints) != sorted(card_joints):
        missing = [j for j in card_joints if j not in model_joints]
        extra = [j for j in model_joints if j not in card_joints]
        which = "model_joints" if cfg.model_joints else "joints"
        errors.append(
            f"{which}: must list each card action joint once (card: {', '.join(card_joints)}); "
            f"missing {missing}, unknown {extra}"
        )
        return output_joints, (), rename
    return output_joints, tuple(card_joints.index(j) for j in model_joints), rename


def resolve_default_pose(
    cfg: NodeConfig, card: Any, output_joints: tuple[str, ...], output_index: tuple[int, ...],
    errors: list[str],
) -> tuple[float, ...]:  # fmt: skip
    """`default_pose` in card action order, inside the card's limits; empty means their middle."""
    n_joints = len(card.action_joints)
    lower = [float(x) for x in card.action_lower]
    upper = [float(x) for x in card.action_upper]
    if not cfg.default_pose:
        return tuple((lo + hi) / 2.0 for lo, hi in zip(lower, upper, strict=True))
    if len(cfg.default_pose) != n_joints:
        errors.append(f"default_pose: {len(cfg.default_pose)} values for {n_joints} joints")
        return ()
    if not output_index:
        return ()
    pose = [0.0] * n_joints
    for i, k in enumerate(output_index):
        pose[k] = cfg.default_pose[i]
    bad = [output_joints[i] for i, k in enumerate(output_index) if not lower[k] <= pose[k] <= upper[k]]
    if bad:
        errors.append(f"default_pose: outside the card's action limits for joints {bad}")
    return tuple(pose)


def remote_refusals(cfg: NodeConfig) -> list[str]:
    """What a policy node computing on its own cannot honour (policy.source remote)."""
    if cfg.policy_source != "remote":
        return []
    errors = []
    if cfg.blend == "inpaint":
        errors.append(
            "blend: inpaint sends the running chunk with each request; a remote policy gets "
            "no request (use ensemble, crossfade or none with policy.source remote)"
        )
    if cfg.execute_steps != 1:
        errors.append(
            "execute_steps: a remote policy sends a chunk whenever the observations advance; "
            "with policy.source remote it must be 1"
        )
    if not cfg.compensate_delay:
        errors.append(
            "compensate_delay: a remote chunk is always stamped with its observations' time; "
            "with policy.source remote it must be true"
        )
    return errors


def validate_against_card(cfg: NodeConfig, card: Any) -> Binding:
    """Check that `cfg` fits `card` (a core.card.ModelCard) and resolve the wiring; raise ConfigError
    naming every mismatch."""
    errors: list[str] = []
    owner = feature_owners(cfg, card, errors)
    check_every_feature_filled_once(card, owner, errors)
    output_joints, output_index, rename = resolve_joints(cfg, card, errors)
    default_pose = resolve_default_pose(cfg, card, output_joints, output_index, errors)
    errors += remote_refusals(cfg)
    errors += check_outputs(cfg, card)
    if cfg.crossfade_steps > card.horizon:
        errors.append(f"crossfade_steps: {cfg.crossfade_steps} exceeds the card's horizon {card.horizon}")
    period = 1.0 / cfg.rate_hz if cfg.rate_hz > 0 else float(card.control_period_s)
    binding = Binding(
        output_joints=output_joints,
        output_index=output_index,
        rename=rename,
        feature_source={n: s[0] for n, s in owner.items()},
        default_pose=default_pose,
        period_s=period,
    )
    if not errors:
        try:  # what the core checks against a card itself (execute_steps <= horizon, inpainting)
            control_config(cfg, binding, card)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError(f"configuration does not fit model '{card.name}':\n  " + "\n  ".join(errors))
    return binding


def watchdog_timeouts(
    cfg: NodeConfig, binding: Binding, card: Any
) -> tuple[dict[str, float], float | None]:
    """Per-source timeouts as per-feature watchdog timeouts (0 = never stale), and a velocity command
    source's timeout as the core's command timeout (0 = hold the last command: None)."""
    kinds = {f.name: f.kind for f in card.features}
    timeout_of = {s.name: s.timeout_s for s in cfg.sources}
    timeouts: dict[str, float] = {}
    command_timeout: float | None = None
    for feature, source in binding.feature_source.items():
        timeout = timeout_of[source]
        if kinds.get(feature) == "velocity_command":
            command_timeout = timeout if timeout > 0 else None
        else:
            timeouts[feature] = timeout if timeout > 0 else NEVER_S
    return timeouts, command_timeout


def control_config(cfg: NodeConfig, binding: Binding, card: Any) -> ControlConfig:
    """The core's configuration, one field per line: each parameter named `control=` in the table becomes
    the field of that name, the per-source timeouts the watchdog's (CORE_ONLY_FIELDS keep the core's
    defaults). The core checks it against `card`; a refusal is raised as a ConfigError naming the
    parameter."""
    timeouts, command_timeout = watchdog_timeouts(cfg, binding, card)
    try:
        control = ControlConfig(
            exec_latency_s=cfg.exec_latency_s,
            execute_steps=cfg.execute_steps,
            blend=cfg.blend,
            crossfade_steps=cfg.crossfade_steps,
            ensemble_chunks=cfg.ensemble_chunks,
            max_consecutive_misses=cfg.max_consecutive_misses,
            compensate_delay=cfg.compensate_delay,
            obs_timeouts_s=timeouts,
            command_timeout_s=command_timeout,
            future_tolerance_s=cfg.max_future_s,
            safe_mode=cfg.safe_mode,
            default_pose=binding.default_pose if cfg.safe_mode == "default_pose" else None,
            max_step_per_tick=cfg.max_step_per_tick,
            damping_gain=cfg.damping_gain,
            seed=None if cfg.seed < 0 else cfg.seed,
            chunk_timeout_s=cfg.chunk_timeout_s if cfg.policy_source == "remote" else None,
        )
        control.check_card(card)
    except CoreConfigError as exc:
        name = PARAM_OF_CONTROL.get(exc.field, f"ControlConfig.{exc.field}")
        raise ConfigError(f"{name}: {exc.reason}") from exc
    return control
