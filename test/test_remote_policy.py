"""Remote policy without a ROS graph: chunks computed elsewhere through the control core, the chunk message
both ways, the fit check, and the link emulator's model.

The clock policy (core_fakes) makes each action the time it is scheduled for, so a command says which
chunk and slot it came from.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from core_fakes import ClockPolicy, clock_card

from diffusion_controller.core.control_config import ConfigError, ControlConfig
from diffusion_controller.core.control_state import ControlState
from diffusion_controller.core.controller import ControlCore
from diffusion_controller.core.external import (
    ChunkFitError,
    chunk_times,
    fit_chunk,
    model_id_text,
    parse_model_id,
)
from diffusion_controller.ros.params_file import load_params_file
from diffusion_controller.sim.link_emulator import LinkConfig, LinkModel

ROOT = Path(__file__).resolve().parents[1]
P = 0.02
WIDE = {"max_step_per_tick": 1000.0}


class RemoteRig:
    """An external-mode core fed clock observations every tick; `chunk(t_obs)` is what a policy node
    would compute from the observations stamped t_obs."""

    def __init__(self, **config) -> None:
        self.card = clock_card()
        self.policy = ClockPolicy(self.card)  # computes chunks "on the other computer"
        self.core = ControlCore(self.card, ControlConfig(**(WIDE | config)), external=True)
        self.k = 0
        self.results = []

    def chunk(self, t_obs: float) -> np.ndarray:
        obs = np.zeros((self.card.history, self.card.obs_dim))
        obs[-1, self.card.feature_slice("clock")] = t_obs
        return self.policy.predict(obs)

    def now(self) -> float:
        return self.k * P

    def step(self, offers=()):
        now = self.now()
        for name in ("clock", "joint_position"):
            value = [now] if name == "clock" else [0.1, 0.2, 0.3]
            assert self.core.observe(name, now, value, now=now) is None
        for t_obs, received in offers:
            self.core.offer_chunk(self.chunk(t_obs), t_obs, received)
        res = self.core.tick(now)
        self.results.append(res)
        self.k += 1
        return res


def test_external_chunks_drive_the_core_like_local_ones():
    rig = RemoteRig()
    assert rig.step().state is ControlState.WAITING
    assert "first chunk" in rig.core.stats().reason
    for _ in range(20):  # a chunk of the previous tick's observations arrives every tick
        t = rig.now()
        res = rig.step([(t - P, t - 0.001)])
    assert res.state is ControlState.RUNNING
    # the action executed is the one scheduled for this tick (t_obs + (first_offset + i) * period)
    assert res.action_time == pytest.approx(rig.now() - P, abs=1e-9)
    assert np.allclose(res.command, res.action_time)
    st = rig.core.stats()
    assert st.chunks_received == 20 and st.requests == 0


def test_reordered_and_duplicated_chunks_are_dropped():
    rig = RemoteRig()
    for _ in range(5):
        rig.step()
    t = rig.now()
    rig.step([(t - P, t)])
    before = rig.core.stats().chunks_dropped
    t = rig.now()
    res = rig.step([(t - P, t), (t - 2 * P, t), (t - P, t)])  # newer, then overtaken, then duplicate
    assert res.state is ControlState.RUNNING
    assert rig.core.stats().chunks_dropped == before + 2
    assert "out of order" in rig.core._miss_cause or rig.core._last_drop == ""


def test_chunk_stamped_ahead_of_the_clock_is_refused():
    rig = RemoteRig()
    for _ in range(3):
        rig.step()
    t = rig.now()
    res = rig.step([(t + 5.0, t)])
    assert res.state is ControlState.WAITING
    assert rig.core.stats().chunks_dropped == 1


def test_chunk_timeout_goes_safe_within_one_tick_and_recovers_on_a_fresh_chunk():
    rig = RemoteRig(chunk_timeout_s=0.1, max_consecutive_misses=1000)
    for _ in range(10):
        t = rig.now()
        rig.step([(t - P, t)])
    last_received = rig.now() - P
    safe_at = None
    for _ in range(20):  # the link goes silent; the running chunk still has actions left
        res = rig.step()
        if res.state is ControlState.SAFE:
            safe_at = rig.now() - P
            break
        assert res.state is ControlState.RUNNING
    assert safe_at is not None
    assert 0.1 - 1e-9 < safe_at - last_received <= 0.1 + P + 1e-9
    assert "no chunk from the policy" in res.reason
    # a chunk of observations from before the timeout does not bring it back
    t = rig.now()
    assert rig.step([(last_received - P, t)]).state is ControlState.SAFE
    # a fresh one does, at once
    t = rig.now()
    assert rig.step([(t - P, t)]).state is ControlState.RUNNING


def test_local_mode_ignores_chunk_timeout_and_refuses_offers():
    card = clock_card()
    core = ControlCore(card, ControlConfig(**WIDE), ClockPolicy(card))
    with pytest.raises(RuntimeError):
        core.offer_chunk(np.zeros((card.horizon, 2)), 0.0, 0.0)
    core.close()
    with pytest.raises(ValueError):
        ControlCore(card, ControlConfig(), ClockPolicy(card), external=True)
    with pytest.raises(ConfigError, match="chunk_timeout_s"):
        ControlConfig(chunk_timeout_s=0.0)


def test_non_finite_external_chunk_is_refused():
    rig = RemoteRig()
    rig.step()
    t = rig.now()
    bad = rig.chunk(t - P)
    bad[0, 0] = math.nan
    rig.core.offer_chunk(bad, t - P, t)
    assert rig.step().state is ControlState.WAITING
    assert "non-finite" in rig.core.stats().reason or rig.core.stats().chunks_dropped == 1


# -- fit check and model identity -------------------------------------------------------------------------


def test_fit_chunk_reorders_joints_and_checks_the_schedule():
    card = clock_card()
    times = chunk_times(card)
    assert times[0] == pytest.approx(card.first_offset * card.control_period_s)
    a = np.arange(card.horizon * 2, dtype=float).reshape(card.horizon, 2)
    out = fit_chunk(card, ["j2", "j1"], times, a)
    assert np.array_equal(out, a[:, ::-1])
    with pytest.raises(ChunkFitError, match="missing \\['j2'\\]"):
        fit_chunk(card, ["j1", "x"], times, a)
    with pytest.raises(ChunkFitError, match="horizon"):
        fit_chunk(card, ["j1", "j2"], times[:-1], a[:-1])
    with pytest.raises(ChunkFitError, match="period"):
        fit_chunk(card, ["j1", "j2"], times * 2, a)
    with pytest.raises(ChunkFitError, match="period"):
        fit_chunk(card, ["j1", "j2"], times + card.control_period_s, a)  # another first_offset
    with pytest.raises(ChunkFitError, match="positions"):
        fit_chunk(card, ["j1", "j2"], times, a[:, :1])


def test_model_id_round_trip():
    text = model_id_text("ant_locomotion", "1.2.0", 2)
    assert text == "model=ant_locomotion;version=1.2.0;K=2"
    assert parse_model_id(text) == ("ant_locomotion", "1.2.0", 2)
    assert parse_model_id("base_link") is None


# -- the chunk message both ways (rclpy message classes, no graph) ----------------------------------------


def test_chunk_message_round_trip():
    from diffusion_controller.ros import chunks as ch

    card = clock_card()
    a = np.random.default_rng(0).normal(size=(card.horizon, 2))
    t_obs = 12345.678901234
    msg = ch.chunk_msg(
        card.action_joints, a, t_obs, card.control_period_s, card.first_offset, "model=x;version=1;K=2"
    )
    assert msg.header.frame_id == "model=x;version=1;K=2"
    assert msg.points[0].time_from_start.nanosec == round(card.first_offset * card.control_period_s * 1e9)
    actions, stamp = ch.read_chunk(msg, card)
    assert np.allclose(actions, a) and stamp == pytest.approx(t_obs, abs=1e-9)
    assert ch.model_of(msg) == "model=x;version=1;K=2"
    # joint order on the wire need not be the card's
    msg.joint_names = ["j2", "j1"]
    actions, _ = ch.read_chunk(msg, card)
    assert np.allclose(actions, a[:, ::-1])
    msg.points[3].positions = [1.0]
    with pytest.raises(ChunkFitError):
        ch.read_chunk(msg, card)
    zero = ch.chunk_msg(card.action_joints, a, 0.0, card.control_period_s, card.first_offset, "")
    with pytest.raises(ChunkFitError, match="stamp"):
        ch.read_chunk(zero, card)


def test_a_chunk_travels_in_the_field_of_its_action_kind():
    """An effort model's chunk is in JointTrajectoryPoint.effort (what `ros2 topic echo` shows under its
    units); a chunk that carries its actions in another field does not fit."""
    from diffusion_controller.core.card import ModelCard
    from diffusion_controller.ros import chunks as ch

    card = ModelCard.from_yaml(ROOT / "models" / "ant_effort.yaml")
    assert card.action_kind == "effort"
    a = np.random.default_rng(1).normal(size=(card.horizon, card.action_dim))
    args = (card.action_joints, a, 10.0, card.control_period_s, card.first_offset, "m")
    msg = ch.chunk_msg(*args, kind="effort")
    assert list(msg.points[0].effort) == a[0].tolist() and not msg.points[0].positions
    assert np.allclose(ch.read_chunk(msg, card)[0], a)
    with pytest.raises(ChunkFitError, match="carry no effort"):
        ch.read_chunk(ch.chunk_msg(*args), card)  # positions: a position model's chunk


def test_executed_message_round_trip():
    from diffusion_controller.ros import chunks as ch

    msg = ch.executed_msg(("a", "b"), np.array([1.0, 2.0]), 7.25)
    stamp, cmd = ch.read_executed(msg, ("b", "a"))
    assert stamp == pytest.approx(7.25) and np.array_equal(cmd, [2.0, 1.0])
    with pytest.raises(ValueError):
        ch.read_executed(msg, ("a", "c"))
    msg.position = [1.0, math.nan]
    with pytest.raises(ValueError):
        ch.read_executed(msg, ("a", "b"))


# -- link emulator ----------------------------------------------------------------------------------------


def test_link_model_is_seeded_and_does_what_it_is_told():
    cfg = LinkConfig(delay_s=0.1, jitter_s=0.02, loss=0.2, duplicate=0.1, reorder=0.1, reorder_s=0.05, seed=3)
    sends = np.arange(5000) * 0.01

    def run(config):
        m = LinkModel(config)
        return m, [m.deliveries(t) for t in sends]

    m, out = run(cfg)
    assert out == run(cfg)[1]  # same seed, same fate
    assert out != run(LinkConfig(**{**cfg.__dict__, "seed": 4}))[1]
    lost = sum(1 for d in out if not d)
    assert lost == m.lost and 0.17 < lost / len(sends) < 0.23
    assert 0.07 < m.duplicated / len(sends) < 0.13
    delays = np.array([d[0] - t for t, d in zip(sends, out, strict=True) if d])
    assert delays.min() >= 0.08 - 1e-12 and delays.max() <= 0.12 + 0.05 + 1e-12
    arrivals = [d[0] for d in out if d]
    assert any(b < a for a, b in itertools.pairwise(arrivals))  # some overtaken
    perfect = LinkModel(LinkConfig(delay_s=0.05))
    assert np.allclose([perfect.deliveries(t) for t in (0.0, 0.01)], [[0.05], [0.06]])
    with pytest.raises(ValueError):
        LinkConfig(loss=1.5)
    with pytest.raises(ValueError):
        LinkConfig(delay_s=0.01, jitter_s=0.02)


def test_remote_mode_refuses_what_a_policy_node_cannot_honour():
    from pathlib import Path

    from diffusion_controller.core.card import ModelCard
    from diffusion_controller.ros import config as cf
    from diffusion_controller.ros.binding import control_config, validate_against_card

    root = Path(__file__).resolve().parents[1]
    params = load_params_file(str(root / "config" / "ant.yaml"))
    card = ModelCard.from_onnx(root / "models" / "ant_locomotion.onnx")
    remote = params | {"policy.source": "remote"}
    validate_against_card(cf.NodeConfig.from_params(remote), card)
    control = control_config(
        cf.NodeConfig.from_params(remote),
        validate_against_card(cf.NodeConfig.from_params(remote), card),
        card,
    )
    assert control.chunk_timeout_s == 0.2
    local = cf.NodeConfig.from_params(params)
    assert control_config(local, validate_against_card(local, card), card).chunk_timeout_s is None
    for change, fragment in (
        ({"blend": "inpaint"}, "blend: inpaint"),
        ({"execute_steps": 2}, "execute_steps"),
        ({"compensate_delay": False}, "compensate_delay"),
    ):
        with pytest.raises(cf.ConfigError, match=fragment):
            validate_against_card(cf.NodeConfig.from_params(remote | change), card)
