"""The demonstration loop through ROS, end to end and short: sim_node driven by the expert as a node
(sensor topics in, commands out), recorded to bags, converted by dataset_from_bag, trained, exported,
and the node drives the simulated ant with the result. A few seconds of data and a few training steps:
this checks the path, not the quality (bench/closed_loop.py measures that on a full run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusion_controller.sim import closed_loop, demonstrate
from diffusion_controller.training import bag_dataset, export, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ros
def test_bags_recorded_through_ros_train_a_model_the_node_runs(tmp_path: Path) -> None:
    bags = demonstrate.record(tmp_path / "bags", episodes=2, seconds=3.0, seed=3, action_noise=0.15,
                              config=str(ROOT / "config" / "ant.yaml"),
                              sim_params=str(ROOT / "config" / "sim.yaml"), rtf=1.0)  # fmt: skip
    assert len(bags) == 2 and all((b / "metadata.yaml").exists() for b in bags)
    data = tmp_path / "demos.npz"
    rc = bag_dataset.main([*map(str, bags), "--config", str(ROOT / "config" / "ant.yaml"),
                           "--layout", str(ROOT / "models" / "ant_locomotion.yaml"), "--out", str(data),
                           "--labels", "/expert_demonstrator/labels"])  # fmt: skip
    assert rc == 0
    d = train.load_dataset(str(data))
    assert len(d["episode_ends"]) == 2 and len(d["obs"]) > 0.8 * 2 * 3.0 / 0.02
    meta = json.loads(str(d["meta"]))
    joint_report = next(r for r in meta["topics"] if r["topic"] == "/joint_states")
    # Nearly every message is used (a reliable retransmission may arrive after a newer one); the delay
    # is the transport's, not the recorder's.
    assert sum(joint_report["refused"].values()) <= 0.01 * joint_report["messages"], joint_report
    assert joint_report["delay_p95_ms"] < 20.0, joint_report
    # The labels are the expert's own targets, inside the joint ranges; previous_action is the command
    # the robot received before the row, which carried the DART noise (not the label).
    assert np.all(d["action"] >= d["action_lower"] - 1e-6) and np.all(d["action"] <= d["action_upper"] + 1e-6)
    ckpt = train.train(train.TrainConfig(
        data=str(data), out=str(tmp_path / "run"), name="from_bags", description="ant, from bags",
        iterations=20, batch_size=16, warmup=2, layers=1, heads=2, width=32, history=8, horizon=16,
        sampler_steps=2, save_every=10, threads=1,
    ), progress=False)  # fmt: skip
    model = tmp_path / "from_bags.onnx"
    export.main([str(ckpt), str(model), "--graph", "fused"])
    (tmp_path / "drive").mkdir()
    row = closed_loop.run_setting(closed_loop.Setting(obs_delay_s=0.0), episodes=1, seconds=3.0, seed=1,
                                  log_dir=tmp_path / "drive", model=model, verbose=False)  # fmt: skip
    assert row["exit_codes"] == {"sim": 0, "controller": 0}, row
    assert row["stale_actions_published"] == 0, row
