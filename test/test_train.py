"""Training: a short run on a synthetic dataset in generate_dataset's format, resumed and exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffusion_controller.core.runtime import Policy  # noqa: E402
from diffusion_controller.training.export import main as export_main  # noqa: E402
from diffusion_controller.training.train import TrainConfig, WindowDataset, train  # noqa: E402

JOINTS = ["hip_1", "ankle_1", "hip_2", "ankle_2"]


def synthetic_dataset(path: Path, episodes: int = 6, steps: int = 60, seed: int = 0) -> Path:
    """A sine 'gait' whose amplitude follows the command; layout like the ant's, 4 joints."""
    rng = np.random.default_rng(seed)
    layout = [
        {"name": "projected_gravity", "kind": "projected_gravity", "size": 3},
        {"name": "velocity_command", "kind": "velocity_command", "size": 3},
        {"name": "joint_position", "kind": "joint_position", "size": 4, "joints": JOINTS},
        {"name": "previous_action", "kind": "previous_action", "size": 4},
    ]
    obs, act, ends = [], [], []
    for _ in range(episodes):
        cmd = np.array([rng.uniform(-0.5, 0.5), 0.0, 0.0])
        phase = np.arange(steps) * 0.02 * 2 * np.pi * 2.0
        a = 0.3 * cmd[0] * np.sin(phase[:, None] + np.arange(4)[None, :] * np.pi / 2)
        prev = np.vstack([np.zeros((1, 4)), a[:-1]])
        rows = np.hstack([np.tile([0, 0, -1.0], (steps, 1)), np.tile(cmd, (steps, 1)), prev, prev])
        obs.append(rows)
        act.append(a)
        ends.append(steps * (len(ends) + 1))
    np.savez(
        path, obs=np.vstack(obs).astype(np.float32), action=np.vstack(act).astype(np.float32),
        episode_ends=np.array(ends, dtype=np.int64), layout=json.dumps(layout), period=0.02,
        action_joints=np.array(JOINTS), action_lower=-np.ones(4), action_upper=np.ones(4),
    )
    return path


def tiny_config(data: Path, out: Path, iterations: int) -> TrainConfig:
    return TrainConfig(
        data=str(data), out=str(out), name="synthetic", iterations=iterations, batch_size=32, warmup=5,
        history=3, horizon=4, layers=1, heads=2, width=32, train_timesteps=20, sampler_steps=2,
        save_every=10, threads=1,
    )


def test_windows_are_clamped_to_their_episode() -> None:
    cfg = tiny_config(Path("unused"), Path("unused"), 1)
    ends = np.array([5, 9])
    w = WindowDataset(np.zeros((9, 1)), np.zeros((9, 1)), ends, cfg)
    # first row of episode 2 (index 5) repeats itself as history; never reaches into episode 1
    assert w.obs_idx[5].tolist() == [5, 5, 5]
    assert w.obs_idx[7].tolist() == [5, 6, 7]
    # delayed inputs: the chunk starts one step after the newest observation, padded with the last action
    assert w.act_idx[2].tolist() == [3, 4, 4, 4]
    assert w.act_idx[5].tolist() == [6, 7, 8, 8]


def test_training_is_reproducible_resumable_and_exports(tmp_path: Path) -> None:
    data = synthetic_dataset(tmp_path / "d.npz")
    straight = train(tiny_config(data, tmp_path / "a", 20), progress=False)
    # the same run interrupted after 10 iterations and resumed ends in the same weights
    assert train(tiny_config(data, tmp_path / "b", 20), progress=False, stop_after=10) is None
    resumed = train(tiny_config(data, tmp_path / "b", 20), progress=False)
    sa = torch.load(straight, weights_only=True)["state_dict"]
    sb = torch.load(resumed, weights_only=True)["state_dict"]
    for key in sa:
        assert torch.allclose(sa[key], sb[key], atol=1e-6), key
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["iterations"] == 20 and np.isfinite(metrics["final_train_loss"])

    onnx_path = tmp_path / "synthetic.onnx"
    export_main([str(straight), str(onnx_path), "--graph", "fused"])
    policy = Policy.load(onnx_path, provider="cpu", warmup=1)
    assert policy.card.action_joints == tuple(JOINTS)
    assert policy.card.first_offset == 1
    chunk = policy.predict(np.zeros((3, policy.card.obs_dim)), seed=0)
    assert chunk.shape == (4, 4) and np.all(np.isfinite(chunk))


def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    data = synthetic_dataset(tmp_path / "d.npz", episodes=2, steps=20)
    train(tiny_config(data, tmp_path / "r", 10), progress=False)
    with pytest.raises(SystemExit, match="other settings"):
        train(tiny_config(data, tmp_path / "r", 30), progress=False)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d.pop("action_lower"), "action_lower"),
        (lambda d: d.pop("episode_ends"), "episode_ends"),
        (lambda d: d.update(obs=d["obs"][:, :-1]), "the layout needs"),
        (lambda d: d.update(action=np.full_like(d["action"], np.nan)), "NaN"),
        (lambda d: d.update(layout=json.dumps([{"name": "x", "kind": "bogus", "size": 1}])), "bogus"),
        (lambda d: d.update(obs_delay_s=0.03), "whole number of control periods"),  # period 0.02
    ],
)
def test_a_dataset_that_cannot_train_is_refused_before_any_step(tmp_path: Path, change, fragment) -> None:
    src = synthetic_dataset(tmp_path / "d.npz", episodes=2, steps=20)
    with np.load(src) as z:
        d = {k: z[k] for k in z.files}
    change(d)
    np.savez(tmp_path / "bad.npz", **d)
    with pytest.raises(ValueError, match=fragment):
        train(tiny_config(tmp_path / "bad.npz", tmp_path / "run", 10), progress=False)
    assert not (tmp_path / "run" / "state.pt").exists()


def test_robot_specific_settings_reach_the_card(tmp_path: Path) -> None:
    """Another robot: its own description, units, noise schedule and prediction type, and a delay of two
    periods (first_offset), all written into the card the node will check."""
    from dataclasses import replace

    data = synthetic_dataset(tmp_path / "d.npz", episodes=2, steps=20)
    cfg = replace(tiny_config(data, tmp_path / "run", 10), description="a 4-joint arm", action_units="m",
                  beta_schedule="linear", prediction_type="epsilon", first_offset=2, history=2)
    ckpt = train(cfg, progress=False)
    card = torch.load(ckpt, weights_only=False)["card"]
    assert card["description"] == "a 4-joint arm" and card["action"]["units"] == "m"
    assert card["diffusion"]["beta_schedule"] == "linear"
    assert card["diffusion"]["prediction_type"] == "epsilon"
    assert card["action"]["first_offset"] == 2 and card["observation"]["history"] == 2
    onnx_path = tmp_path / "arm.onnx"
    export_main([str(ckpt), str(onnx_path), "--graph", "fused"])
    policy = Policy.load(onnx_path, provider="cpu", warmup=1)
    assert policy.card.diffusion.prediction_type == "epsilon" and policy.card.action_units == "m"


def test_without_a_description_the_card_names_its_data_not_the_ant(tmp_path: Path) -> None:
    """train_policy on another robot's data must not write the demo ant's description into its card."""
    data = synthetic_dataset(tmp_path / "arm_demos.npz", episodes=2, steps=20)
    ckpt = train(tiny_config(data, tmp_path / "run", 10), progress=False)
    description = torch.load(ckpt, weights_only=False)["card"]["description"]
    assert "arm_demos.npz" in description and "40 rows, 2 episodes" in description
    assert "ant" not in description.lower().replace("arm_demos", "")


def test_rows_of_delayed_sensors_put_the_delay_into_first_offset(tmp_path: Path) -> None:
    """A dataset whose rows hold 40 ms old sensors (sim/dataset.py --obs-delay 0.04): the card's first
    action is 2 periods (the delay) + first_offset after the sensors' stamp, which is what the node's
    delay compensation schedules; the windows themselves are unchanged (same loss as without the key)."""
    src = synthetic_dataset(tmp_path / "d.npz", episodes=2, steps=20)
    with np.load(src) as z:
        d = {k: z[k] for k in z.files}
    np.savez(tmp_path / "delayed.npz", **d, obs_delay_s=np.array(0.04))
    plain = train(tiny_config(src, tmp_path / "plain", 10), progress=False)
    delayed = train(tiny_config(tmp_path / "delayed.npz", tmp_path / "delayed", 10), progress=False)
    card, card0 = (torch.load(c, weights_only=False)["card"] for c in (delayed, plain))
    assert card0["action"]["first_offset"] == 1 and card["action"]["first_offset"] == 3
    assert card["training"]["obs_delay_s"] == pytest.approx(0.04) and card0["training"]["obs_delay_s"] == 0
    assert card["training"]["final_train_loss"] == card0["training"]["final_train_loss"]
