"""The model card's parser: a YAML-loaded dict checked field by field into a card's values.

Every problem is collected (field path + what was expected) and raised together as one CardError, so a
card is fixed in one round; the messages are what a user reads when a model is refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diffusion_controller.core.card_schema import (
    ACTION_KINDS,
    ACTION_UNITS,
    FEATURE_SIZES,
    FORMAT,
    GRAPH_INPUTS,
    GRAPH_KINDS,
    GRAPH_OPS,
    GRAPH_OUTPUTS,
    JOINT_FEATURE_KINDS,
    NAME_RE,
    NETWORK_PRECISIONS,
    SAMPLER_KINDS,
    TWIST_AXES,
    ZERO_SAFE_KINDS,
    CardError,
    Feature,
    GraphSpec,
    Layout,
)
from diffusion_controller.core.ddim import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, DDIMConfig

_MISSING = object()


def layout_from_dict(d: Any, source: str | None = None) -> Layout:
    """Validate the layout fields of a card dict; CardError lists every problem."""
    p = CardParser(source)
    if not isinstance(d, dict):
        raise CardError(f"expected a mapping, got {type(d).__name__}", source)
    d = dict(d)
    # Fields a dataset does not need get placeholders; the card of the trained model states them.
    d["action"] = {"horizon": 1, "first_offset": 0, "kind": ACTION_KINDS[0], "units": "rad",
                   **(d.get("action") or {})}  # fmt: skip
    period = p.number(d, "control_period_s", "", positive=True)
    _, joints, lower, upper, *_ = p.action(d)
    history, features = p.observation(d, len(joints) if joints else None)
    if p.errors:
        raise CardError(p.errors, source)
    return Layout(float(period), int(history), tuple(features or ()), tuple(joints or ()), lower, upper)


class CardParser:
    """Collects every error (field path + expectation) instead of stopping at the first."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.errors: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    # -- typed getters: return a usable fallback after recording an error ------------------------------
    def section(self, d: dict, key: str, path: str, allowed: tuple[str, ...]) -> dict:
        v = d.get(key, _MISSING)
        p = f"{path}.{key}" if path else key
        if v is _MISSING:
            self.err(p, "missing (expected a mapping)")
            return {}
        if not isinstance(v, dict):
            self.err(p, f"expected a mapping, got {type(v).__name__}")
            return {}
        self.unknown(v, p, allowed)
        return v

    def unknown(self, d: dict, path: str, allowed: tuple[str, ...]) -> None:
        for k in d:
            if k not in allowed:
                self.err(
                    f"{path}.{k}" if path else str(k), f"unknown field (expected one of {list(allowed)})"
                )

    def get(self, d: dict, key: str, path: str, default: Any = _MISSING) -> Any:
        v = d.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                self.err(f"{path}.{key}" if path else key, "missing")
            return default
        return v

    def integer(self, d: dict, key: str, path: str, lo: int, default: Any = _MISSING) -> int:
        v = self.get(d, key, path, default)
        p = f"{path}.{key}" if path else key
        if v is _MISSING:
            return lo
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(p, f"expected an integer >= {lo}, got {v!r}")
            return lo
        if v < lo:
            self.err(p, f"expected an integer >= {lo}, got {v}")
            return lo
        return v

    def number(
        self, d: dict, key: str, path: str, *, positive: bool = False, default: Any = _MISSING
    ) -> float:
        v = self.get(d, key, path, default)
        p = f"{path}.{key}" if path else key
        if v is _MISSING:
            return 1.0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.err(p, f"expected a finite number, got {v!r}")
            return 1.0
        if positive and v <= 0:
            self.err(p, f"expected a number > 0, got {v}")
            return 1.0
        return float(v)

    def boolean(self, d: dict, key: str, path: str, default: Any = _MISSING) -> bool:
        v = self.get(d, key, path, default)
        if v is _MISSING:
            return False
        if not isinstance(v, bool):
            self.err(f"{path}.{key}", f"expected true or false, got {v!r}")
            return False
        return v

    def string(
        self, d: dict, key: str, path: str, *, choices: tuple[str, ...] | None = None, default: Any = _MISSING
    ) -> str:
        v = self.get(d, key, path, default)
        p = f"{path}.{key}" if path else key
        if v is _MISSING:
            return ""
        if not isinstance(v, str):
            self.err(p, f"expected a string, got {v!r}")
            return ""
        if choices is not None and v not in choices:
            self.err(p, f"expected one of {list(choices)}, got {v!r}")
        return v

    def names(self, v: Any, path: str) -> tuple[str, ...] | None:
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            self.err(path, f"expected a non-empty list of names, got {v!r}")
            return None
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            self.err(path, f"expected unique names, {dup} repeated")
        return tuple(v)

    def vector(self, d: dict, key: str, path: str, n: int | None, what: str) -> np.ndarray | None:
        v = self.get(d, key, path)
        p = f"{path}.{key}"
        if v is _MISSING:
            return None
        if not isinstance(v, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        ):
            self.err(p, f"expected a list of numbers, got {type(v).__name__}")
            return None
        a = np.array(v, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            self.err(p, "expected finite numbers (found nan or inf)")
            return None
        if n is not None and a.size != n:
            self.err(p, f"expected {n} values ({what}), got {a.size}")
            return None
        a.setflags(write=False)
        return a

    # -- the card -------------------------------------------------------------------------------------
    def parse(self, d: Any, require_graph: bool) -> dict[str, Any]:
        """The ModelCard fields of a parsed card (ModelCard.from_dict builds the card from them)."""
        if not isinstance(d, dict):
            raise CardError(f"expected a mapping at the top level, got {type(d).__name__}", self.source)
        top = (
            "format",
            "name",
            "version",
            "description",
            "control_period_s",
            "observation",
            "action",
            "normalization",
            "diffusion",
            "sampler",
            "graph",
            "network",
            "training",
        )
        self.unknown(d, "", top)
        fmt = self.get(d, "format", "")
        if fmt is not _MISSING and fmt != FORMAT:
            self.err("format", f"expected {FORMAT!r}, got {fmt!r}")
        name = self.string(d, "name", "")
        if name and not NAME_RE.match(name):
            self.err("name", f"expected [a-z0-9_]+, got {name!r}")
        version = self.get(d, "version", "", "0.0.0")
        version = str(version) if isinstance(version, (str, int, float)) else self._bad("version", version)
        description = self.string(d, "description", "", default="")
        period = self.number(d, "control_period_s", "", positive=True)

        _, action_joints, lower, upper, horizon, first_offset, a_kind, units = self.action(d)
        n_act = len(action_joints) if action_joints else None
        history, features = self.observation(d, n_act)
        obs_dim = sum(f.size for f in features) if features is not None else None
        obs_mean, obs_std, act_min, act_max = self.normalization(d, obs_dim, n_act)
        diffusion = self.diffusion(d)
        s_kind, steps, eta, inpainting = self.sampler(d, diffusion)
        graph = self.graph(d, require_graph)
        network = self.free(d, "network")
        self.network_precision(network)
        training = self.free(d, "training")
        if self.errors:
            raise CardError(self.errors, self.source)
        return dict(
            name=name,
            version=version,
            description=description,
            control_period_s=period,
            history=history,
            features=features,
            action_joints=action_joints,
            action_lower=lower,
            action_upper=upper,
            horizon=horizon,
            first_offset=first_offset,
            action_kind=a_kind,
            action_units=units,
            obs_mean=obs_mean,
            obs_std=obs_std,
            action_min=act_min,
            action_max=act_max,
            diffusion=diffusion,
            sampler_kind=s_kind,
            steps=steps,
            eta=eta,
            graph=graph,
            sampler_inpainting=inpainting,
            network=network,
            training=training,
        )

    def _bad(self, path: str, v: Any) -> str:
        self.err(path, f"expected a string, got {v!r}")
        return ""

    def free(self, d: dict, key: str) -> dict:
        v = d.get(key, {})
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.err(key, f"expected a mapping, got {type(v).__name__}")
            return {}
        return v

    def network_precision(self, network: dict) -> None:
        """network.precision: fp32 (absent: the same) or fp16 (an fp16 graph, training/fp16.py)."""
        v = network.get("precision", "fp32")
        if v not in NETWORK_PRECISIONS:
            self.err("network.precision", f"expected one of {list(NETWORK_PRECISIONS)}, got {v!r}")
        elif v == "fp16" and network.get("weights", "fp32") != "fp32":
            why = f"fp16 with weights {network.get('weights')!r}: expected fp32 weights"
            self.err("network.precision", why)

    def action(self, d: dict):
        p = "action"
        a = self.section(
            d, "action", "", ("joints", "kind", "units", "lower", "upper", "horizon", "first_offset")
        )
        joints = (
            self.names(a.get("joints"), f"{p}.joints")
            if "joints" in a
            else self.err(f"{p}.joints", "missing")
        )
        n = len(joints) if joints else None
        lower = self.vector(a, "lower", p, n, "one per action.joints")
        upper = self.vector(a, "upper", p, n, "one per action.joints")
        if lower is not None and upper is not None and lower.shape == upper.shape:
            for i in np.flatnonzero(~(lower < upper)):
                self.err(f"{p}.lower[{i}]", f"expected < action.upper[{i}] ({upper[i]}), got {lower[i]}")
        horizon = self.integer(a, "horizon", p, 1)
        first_offset = self.integer(a, "first_offset", p, 0)
        kind = self.string(a, "kind", p, choices=ACTION_KINDS)
        units = self.string(a, "units", p)
        if "units" in a and not units:
            self.err(f"{p}.units", "expected a non-empty string")
        self.kind_limits(kind, units, joints, lower, upper)
        return a, joints, lower, upper, horizon, first_offset, kind, units

    def kind_limits(self, kind: Any, units: Any, joints: Any, lower: Any, upper: Any) -> None:
        """Units and limits that make sense for the action kind (safety drives zero-safe kinds to 0)."""
        p = "action"
        if kind not in ACTION_UNITS:
            return
        if units and units not in ACTION_UNITS[kind]:
            allowed = list(ACTION_UNITS[kind])
            self.err(f"{p}.units", f"expected one of {allowed} for kind {kind!r}, got {units!r}")
        if kind == "base_velocity" and joints:
            for i, j in enumerate(joints):
                if j not in TWIST_AXES:
                    self.err(f"{p}.joints[{i}]", f"expected a Twist field {list(TWIST_AXES)} for kind "
                             f"'base_velocity', got {j!r}")  # fmt: skip
        if kind in ZERO_SAFE_KINDS and lower is not None and upper is not None and lower.shape == upper.shape:
            for i in np.flatnonzero(~((lower <= 0.0) & (upper >= 0.0))):
                self.err(f"{p}.lower[{i}]", f"an action of kind {kind!r} must allow 0 (its safe command): "
                         f"[{lower[i]}, {upper[i]}] does not")  # fmt: skip

    def observation(self, d: dict, n_act: int | None):
        p = "observation"
        o = self.section(d, "observation", "", ("history", "features"))
        history = self.integer(o, "history", p, 1)
        fl = self.get(o, "features", p)
        if fl is _MISSING:
            return history, None
        if not isinstance(fl, list) or not fl:
            self.err(f"{p}.features", "expected a non-empty list of features")
            return history, None
        feats: list[Feature] = []
        ok = True
        for i, fd in enumerate(fl):
            fp = f"{p}.features[{i}]"
            if not isinstance(fd, dict):
                self.err(fp, f"expected a mapping {{name, kind, size[, joints | frequency_hz]}}, got {fd!r}")
                ok = False
                continue
            self.unknown(fd, fp, ("name", "kind", "size", "joints", "frequency_hz"))
            n0 = len(self.errors)
            fname = self.string(fd, "name", fp)
            kind = self.string(fd, "kind", fp, choices=tuple(FEATURE_SIZES))
            size = self.integer(fd, "size", fp, 1)
            joints = None
            if kind in JOINT_FEATURE_KINDS:
                if "joints" not in fd:
                    self.err(f"{fp}.joints", f"missing (a {kind} feature names its joints)")
                else:
                    joints = self.names(fd["joints"], f"{fp}.joints")
                    if joints is not None and len(joints) != size:
                        self.err(f"{fp}.size", f"expected {len(joints)} (= len(joints)), got {size}")
            elif "joints" in fd:
                self.err(f"{fp}.joints", f"expected no joints for kind {kind!r}")
            frequency = None
            if kind == "gait_clock":
                frequency = self.number(fd, "frequency_hz", fp, positive=True)
            elif "frequency_hz" in fd:
                self.err(f"{fp}.frequency_hz", f"expected no frequency_hz for kind {kind!r}")
            fixed = FEATURE_SIZES.get(kind)
            if fixed is not None and size != fixed:
                self.err(f"{fp}.size", f"expected {fixed} for kind {kind!r}, got {size}")
            if kind == "previous_action" and n_act is not None and size != n_act:
                self.err(
                    f"{fp}.size", f"expected {n_act} (= len(action.joints)) for previous_action, got {size}"
                )
            if len(self.errors) > n0:
                ok = False
            feats.append(Feature(fname, kind, size, joints, frequency))
        names = [f.name for f in feats]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            self.err(f"{p}.features", f"expected unique feature names, {dup} repeated")
        if sum(f.kind == "velocity_command" for f in feats) > 1:
            self.err(f"{p}.features", "expected at most one velocity_command feature")
        if sum(f.kind == "previous_action" for f in feats) > 1:
            self.err(f"{p}.features", "expected at most one previous_action feature")
        return history, (tuple(feats) if ok else None)

    def normalization(self, d: dict, obs_dim: int | None, n_act: int | None):
        p = "normalization"
        n = self.section(d, "normalization", "", ("observation", "action"))
        o = self.section(n, "observation", p, ("mean", "std"))
        a = self.section(n, "action", p, ("min", "max"))
        mean = self.vector(o, "mean", f"{p}.observation", obs_dim, "observation row size")
        std = self.vector(o, "std", f"{p}.observation", obs_dim, "observation row size")
        if std is not None:
            for i in np.flatnonzero(~(std > 0)):
                self.err(f"{p}.observation.std[{i}]", f"expected > 0, got {std[i]}")
        amin = self.vector(a, "min", f"{p}.action", n_act, "one per action.joints")
        amax = self.vector(a, "max", f"{p}.action", n_act, "one per action.joints")
        if amin is not None and amax is not None and amin.shape == amax.shape:
            for i in np.flatnonzero(~(amin < amax)):
                self.err(
                    f"{p}.action.min[{i}]",
                    f"expected < normalization.action.max[{i}] ({amax[i]}), got {amin[i]}",
                )
        return mean, std, amin, amax

    def diffusion(self, d: dict) -> DDIMConfig:
        p = "diffusion"
        keys = (
            "train_timesteps",
            "beta_schedule",
            "beta_start",
            "beta_end",
            "prediction_type",
            "clip_sample",
            "clip_sample_range",
            "set_alpha_to_one",
            "steps_offset",
            "timestep_spacing",
        )
        s = self.section(d, "diffusion", "", keys)
        t = self.integer(s, "train_timesteps", p, 1)
        sched = self.string(s, "beta_schedule", p, choices=BETA_SCHEDULES)
        b0 = self.number(s, "beta_start", p, positive=True, default=0.0001)
        b1 = self.number(s, "beta_end", p, positive=True, default=0.02)
        if sched in ("linear", "scaled_linear") and not (b0 < b1 < 1):
            self.err(f"{p}.beta_end", f"expected beta_start ({b0}) < beta_end < 1, got {b1}")
        pred = self.string(s, "prediction_type", p, choices=PREDICTION_TYPES)
        clip = self.boolean(s, "clip_sample", p, default=True)
        clip_range = self.number(s, "clip_sample_range", p, positive=True, default=1.0)
        one = self.boolean(s, "set_alpha_to_one", p, default=True)
        offset = self.integer(s, "steps_offset", p, 0, default=0)
        if offset >= t:
            self.err(f"{p}.steps_offset", f"expected < train_timesteps ({t}), got {offset}")
        # A card without the field predates it: its model was made (and tuned) with "leading".
        spacing = self.string(s, "timestep_spacing", p, choices=TIMESTEP_SPACINGS, default="leading")
        if spacing not in TIMESTEP_SPACINGS:
            spacing = "leading"
        return DDIMConfig(
            t, sched or "linear", b0, b1, pred or "epsilon", clip, clip_range, one, offset, spacing
        )

    def sampler(self, d: dict, dif: DDIMConfig):
        p = "sampler"
        s = self.section(d, "sampler", "", ("kind", "steps", "eta", "inpainting"))
        kind = self.string(s, "kind", p, choices=SAMPLER_KINDS)
        steps = self.integer(s, "steps", p, 1)
        eta = self.number(s, "eta", p, default=0.0)
        if eta < 0:
            self.err(f"{p}.eta", f"expected >= 0, got {eta}")
        try:
            dif.check_steps(steps)
            steers = dif.prefix_steers(steps)
        except ValueError as e:
            self.err(f"{p}.{e}".split(":")[0], str(e).split(": ", 1)[1])
            steers = True  # no timesteps to judge by: only the step count is reported
        # A distilled one-step sampler never saw a prefix in training, and a DDIM run whose steps all see
        # the prefix buried in noise (K=1 at t=T-1) ignores it: by default neither can be steered.
        inpainting = self.boolean(s, "inpainting", p, default=kind != "distilled" and steers)
        if inpainting and not steers:
            self.err(
                f"{p}.inpainting",
                f"{steps} step(s) at timesteps {dif.timesteps(steps).tolist()} never see the prefix above "
                "the noise, so it cannot steer the chunk; set inpainting: false",
            )
        if kind == "distilled":
            if steps != 1:
                self.err(f"{p}.steps", f"a distilled sampler runs in exactly 1 step, got {steps}")
            if dif.prediction_type != "sample":
                self.err(
                    "diffusion.prediction_type",
                    f"a distilled sampler predicts the sample, got {dif.prediction_type!r}",
                )
            if eta != 0:
                self.err(f"{p}.eta", f"a distilled sampler is deterministic (eta 0), got {eta}")
        return kind, steps, eta, inpainting

    def graph(self, d: dict, required: bool) -> GraphSpec | None:
        if "graph" not in d:
            if required:
                self.err("graph", "missing (expected {kind, inputs, outputs})")
            return None
        p = "graph"
        g = self.section(d, "graph", "", ("kind", "inputs", "outputs", "ops", "batch"))
        kind = self.string(g, "kind", p, choices=GRAPH_KINDS)
        ops = self.string(g, "ops", p, choices=GRAPH_OPS, default="standard")
        batch = self.integer(g, "batch", p, 1, default=1)
        if batch > 1 and kind == "denoiser":
            self.err(f"{p}.batch", f"a denoiser graph takes one history (batch 1), got {batch}")
        if kind not in GRAPH_KINDS:
            return None
        maps = []
        for key, roles in (("inputs", GRAPH_INPUTS[kind]), ("outputs", GRAPH_OUTPUTS[kind])):
            m = self.section(g, key, p, roles)
            for r in roles:
                if r not in m:
                    self.err(f"{p}.{key}.{r}", f"missing (tensor name of {r} in a {kind} graph)")
                elif not isinstance(m[r], str) or not m[r]:
                    self.err(f"{p}.{key}.{r}", f"expected a tensor name, got {m[r]!r}")
            maps.append({r: m[r] for r in roles if isinstance(m.get(r), str)})
        return GraphSpec(kind, maps[0], maps[1], ops, batch)
