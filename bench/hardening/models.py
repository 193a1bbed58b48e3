"""The scenario models, made at run time: tiny random policies and files derived from them.

A NaN model, a tunable one whose inference time follows the velocity command, and files that are no model
at all (a directory, zeros, a truncated copy, cards that do not fit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusion_controller.core.card import ModelCard


def _edit_output(
    src: Path, dst: Path, name: str, extra_nodes: Callable[[str, str], list], inits: list
) -> Path:
    """Copy `src` with its `actions` output rerouted through `extra_nodes(raw, out)` and the card renamed.

    The card is otherwise unchanged, so the node accepts the file as the same layout: only running it shows
    what the graph does."""
    import onnx

    model = onnx.load(str(src))
    out = ModelCard.from_onnx(src).graph.outputs["actions"]
    raw = out + "_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
    model.graph.node.extend(extra_nodes(raw, out))
    model.graph.initializer.extend(inits)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    card = ModelCard.from_onnx(src).replace(name=name)
    card.to_onnx(dst)
    card.to_yaml(dst.with_suffix(".yaml"))
    return dst


def nan_model(src: Path, dst: Path) -> Path:
    """The same policy with every output multiplied by NaN: a valid file and card, a useless model."""
    from onnx import helper, numpy_helper

    nan = numpy_helper.from_array(np.array(math.nan, dtype=np.float32), "nan_scale")
    return _edit_output(
        src, dst, "tiny_nan", lambda raw, out: [helper.make_node("Mul", [raw, "nan_scale"], [out])], [nan]
    )


#: Matrix products per unit of the velocity command's yaw rate in a tunable model (see `tunable_model`).
TUNABLE_PER_UNIT = 1000.0


def tunable_model(src: Path, dst: Path, name: str, size: int = 256) -> Path:
    """The same policy plus a loop of (size x size) matrix products, as many as TUNABLE_PER_UNIT times the
    yaw rate of the newest velocity command in the input, adding exactly 0 to the output.

    A test makes inference slow (or too slow) while the node runs by publishing a /cmd_vel with
    angular.z > 0, and fast again with 0: the node sees one model whose compute time changes, as when a
    GPU throttles or another program takes the CPU. Nothing folds at load time: the count is an input."""
    from onnx import TensorProto, helper, numpy_helper

    card = ModelCard.from_onnx(src)
    wz = card.feature_slice(card.feature_of_kind("velocity_command").name).start + 2
    obs = card.graph.inputs["obs_history"]
    inits = [
        numpy_helper.from_array(np.eye(size, dtype=np.float32), "tn_eye"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "tn_zero"),
        numpy_helper.from_array(np.array(TUNABLE_PER_UNIT, dtype=np.float32), "tn_scale"),
        numpy_helper.from_array(np.array([card.history - 1, wz], dtype=np.int64), "tn_start"),
        numpy_helper.from_array(np.array([card.history, wz + 1], dtype=np.int64), "tn_end"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "tn_axes"),
        numpy_helper.from_array(np.array(True), "tn_true"),
    ]
    square = [size, size]
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_in", "tn_eye"], ["x_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "tn_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, square),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, square),
        ],
    )

    def nodes(raw: str, out: str) -> list:
        return [
            helper.make_node("Slice", [obs, "tn_start", "tn_end", "tn_axes"], ["tn_wz3"]),
            helper.make_node("ReduceMax", ["tn_wz3"], ["tn_wz"], keepdims=0),
            helper.make_node("Mul", ["tn_wz", "tn_scale"], ["tn_nf"]),
            helper.make_node("Relu", ["tn_nf"], ["tn_nr"]),
            helper.make_node("Cast", ["tn_nr"], ["tn_n"], to=TensorProto.INT64),
            helper.make_node("Mul", ["tn_wz", "tn_zero"], ["tn_z"]),
            helper.make_node("Add", ["tn_eye", "tn_z"], ["tn_x0"]),  # depends on the input: not folded
            helper.make_node("Loop", ["tn_n", "tn_true", "tn_x0"], ["tn_x"], body=body),
            helper.make_node("ReduceMean", ["tn_x"], ["tn_m"], keepdims=0),
            helper.make_node("Mul", ["tn_m", "tn_zero"], ["tn_d"]),
            helper.make_node("Add", [raw, "tn_d"], [out]),
        ]

    return _edit_output(src, dst, name, nodes, inits)


def predict_time(path: Path, yaw_rate: float = 0.0, n: int = 5) -> float:
    """Fastest predict() time of a model here with a velocity command of `yaw_rate` (one ORT thread, like
    the node): the uncontended speed; on a loaded machine it is only slower."""
    from diffusion_controller.core.runtime import Policy

    policy = Policy.load(path, provider="cpu", threads=1, warmup=1, log=lambda m: None)
    card = policy.card
    obs = np.array(np.broadcast_to(card.obs_mean, (card.history, card.obs_dim)))
    obs[:, card.feature_slice(card.feature_of_kind("velocity_command").name).start + 2] = yaw_rate
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        policy.predict(obs, seed=i)
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


class Models:
    """The scenario models, made on first use in `root`: tiny policies and files derived from them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._paths: dict[str, Path] = {}
        self.figures: dict[str, float] = {}
        self._per_unit_s: dict[str, float] = {}

    def __getitem__(self, key: str) -> Path:
        if key not in self._paths:
            self._paths[key] = getattr(self, "_make_" + key)()
        return self._paths[key]

    def yaw_rate_for(self, seconds: float, key: str) -> float:
        """The /cmd_vel angular.z that makes tunable model `key`'s predict take about `seconds` here at best.

        Measured as the fastest of many short runs: other programs only ever make a run slower, and a
        slower estimate would make the scenario's inference too fast."""
        if key not in self._per_unit_s:
            fast = predict_time(self[key], 0.0, n=9)
            slow = predict_time(self[key], 0.02, n=25)  # 20 products a run
            self._per_unit_s[key] = max((slow - fast) / 0.02, 1e-6)
            self.figures[f"{key}_ms_per_unit_yaw"] = 1000.0 * self._per_unit_s[key]
        return seconds / self._per_unit_s[key]

    def _make_a(self) -> Path:
        from tiny_models import make_tiny_model

        return make_tiny_model(self.root / "a", name="tiny_a")

    def _make_a16(self) -> Path:
        """Horizon 16 (320 ms of actions): room for inference several periods long."""
        from tiny_models import make_tiny_model

        return make_tiny_model(self.root / "a16", name="tiny_a16", horizon=16, seed=3)

    def _make_tunable8(self) -> Path:
        return tunable_model(self["a"], self.root / "tunable8" / "tiny_tunable8.onnx", "tiny_tunable8")

    def _make_tunable16(self) -> Path:
        return tunable_model(self["a16"], self.root / "tunable16" / "tiny_tunable16.onnx", "tiny_tunable16")

    def _make_directory(self) -> Path:
        path = self.root / "directory.onnx"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _sparse(self, name: str, mib: int) -> Path:
        """A file of `mib` MiB of zeros that takes no disk space (nothing in it is a model)."""
        path = self.root / name
        with open(path, "wb") as f:
            f.truncate(mib * 1024 * 1024)
        return path

    def _make_too_large(self) -> Path:
        return self._sparse("too_large.onnx", 768)  # the node's max_model_mb is 512

    def _make_zeros(self) -> Path:
        return self._sparse("zeros.onnx", 256)

    def _make_truncated(self) -> Path:
        data = self["a"].read_bytes()
        path = self.root / "truncated" / "tiny_truncated.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[: len(data) // 2])  # a copy interrupted half way
        return path

    def _recarded(self, folder: str, name: str, **card_changes) -> Path:
        """A copy of the base model whose card has `card_changes` (and the name `name`)."""
        path = self.root / folder / f"{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self["a"].read_bytes())
        ModelCard.from_onnx(path).replace(name=name, **card_changes).to_onnx(path)
        return path

    def _make_period(self) -> Path:
        """A valid ONNX whose card says 100 Hz: it does not fit the running 50 Hz configuration."""
        return self._recarded("period", "tiny_100hz", control_period_s=0.01)

    def _make_graph_mismatch(self) -> Path:
        """A card that fits the configuration but not its own graph (history 6 vs the graph's 4)."""
        return self._recarded("graph_mismatch", "tiny_history6", history=6)

    def _make_reordered(self) -> Path:
        """The same model with its action joints listed in another order: the published joint order would
        change under a joint_trajectory_controller that is already running."""
        card = ModelCard.from_onnx(self["a"])
        order = list(reversed(range(card.action_dim)))
        return self._recarded(
            "reordered", "tiny_reordered",
            action_joints=tuple(card.action_joints[i] for i in order),
            action_lower=card.action_lower[order], action_upper=card.action_upper[order],
            action_min=card.action_min[order], action_max=card.action_max[order],
        )  # fmt: skip

    def _make_nan(self) -> Path:
        return nan_model(self["a"], self.root / "nan" / "tiny_nan.onnx")
