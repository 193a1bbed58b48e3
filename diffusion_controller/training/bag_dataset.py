"""Training data from recorded ROS 2 bags: ``dataset_from_bag``.

A robot's demonstrations are ROS 2 bags (``ros2 bag record`` of the sensor topics and of the commands a
teleoperator, an RL policy or a classical controller sent). This turns them into the dataset format of
``generate_dataset`` (sim/dataset.py), with the node's own code, so what training sees is what the node
computes on the robot:

- the node's params file says which topic fills which card feature (``observations.*``) and where the
  commands went (``outputs.commands.topic``: the labels, Float64MultiArray in the config's ``joints``
  order); the layout (a card YAML, or a layout file with the card's ``control_period_s``,
  ``observation`` and ``action.joints/lower/upper``) says the features and the action joints;
- every message goes through the node's SourceReader (the same lookups by joint name, frame and stamp
  rules, NaN checks) into the node's ObservationHistory, by header stamp, as on the robot;
- rows lie on the control grid of the labels: row k at t_k, the time the k-th command was recorded (the
  demonstrator's tick), built from every sample stamped up to t_k (what delay compensation assumes:
  the node conditions on stamp time); ``action[k]`` is the command in effect at t_k, so the training
  window pairs rows ..k with actions k + first_offset.., as for the simulator's data; previous_action is
  the last command recorded before t_k, gait_clock comes from t_k;
- an episode ends at a gap in the commands (``--split-gap``), a clock going back (a simulation reset),
  a stale observation (older than the source's ``timeout_s``: the node would be in its safe state), or
  the end of a bag.

Bags in either storage format (sqlite3, MCAP) are read by the pure-Python ``rosbags`` package; messages
are deserialized by it too (no rclpy, no ROS message packages: the records have the messages' fields,
which is all core.inputs reads). Per topic it reports the rate,
the longest gap and the observation delay (recording time minus header stamp), and it refuses a bag
that lacks a needed topic or joint, naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_controller.core import inputs
from diffusion_controller.core.card_schema import Layout
from diffusion_controller.core.card_source import ModelError, read_layout
from diffusion_controller.core.observation import ObservationError
from diffusion_controller.ros import config as cf
from diffusion_controller.ros.binding import Binding, control_config, validate_against_card
from diffusion_controller.ros.params_file import load_params_file

NODE_NAME = "diffusion_controller"
#: Rows are built this long (recording time) after their grid time, so late-arriving samples stamped
#: before it are in (a robot's sensor delay is a few ms to a few tens of ms).
SETTLE_S = 0.1


class BagError(ValueError):
    """A bag that cannot make a dataset for this configuration; the message names what is missing."""


@dataclass
class TopicReport:
    """What one topic of the bag looked like: rate, gaps, delay, and what the node's checks refused."""

    topic: str
    role: str
    messages: int = 0
    first_s: float = math.inf
    last_s: float = -math.inf
    max_gap_s: float = 0.0
    delays_s: list[float] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, t: float) -> None:
        if self.messages:
            self.max_gap_s = max(self.max_gap_s, t - self.last_s)
        self.messages += 1
        self.first_s, self.last_s = min(self.first_s, t), max(self.last_s, t)

    def refuse(self, cause: str, text: str) -> None:
        self.refused[cause] += 1
        self.examples.setdefault(cause, text)

    def summary(self) -> dict[str, Any]:
        span = self.last_s - self.first_s
        d = np.array(self.delays_s) if self.delays_s else None
        return {
            "topic": self.topic,
            "role": self.role,
            "messages": self.messages,
            "rate_hz": (self.messages - 1) / span if self.messages > 1 and span > 0 else 0.0,
            "max_gap_s": self.max_gap_s,
            "delay_p50_ms": 1000.0 * float(np.percentile(d, 50)) if d is not None else None,
            "delay_p95_ms": 1000.0 * float(np.percentile(d, 95)) if d is not None else None,
            "refused": dict(self.refused),
        }


def resolve(topic: str, namespace: str = "/", node: str = NODE_NAME) -> str:
    """The absolute name a node `node` in `namespace` gives `topic` (relative, absolute or ~/)."""
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if topic.startswith("/"):
        return topic
    if topic.startswith("~/"):
        return f"{ns}/{node}/{topic[2:]}"
    return f"{ns}/{topic}"


def bag_messages(path: str | Path) -> tuple[list[str], Iterator[tuple[str, str, int, bytes]]]:
    """(topics in the bag, iterator of (topic, type, recording time ns, CDR bytes) in time order)."""
    from rosbags.rosbag2 import Reader

    reader = Reader(Path(path))
    reader.open()
    topics = sorted({c.topic for c in reader.connections})

    def gen() -> Iterator[tuple[str, str, int, bytes]]:
        try:
            for conn, t_ns, raw in reader.messages():
                yield conn.topic, conn.msgtype, t_ns, raw
        finally:
            reader.close()

    return topics, gen()


def typestore() -> Any:
    """The message definitions bag records are read with (the standard messages of every ROS 2 release
    since Humble are the same for the source and label types)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.LATEST)


def deserialize(store: Any, raw: bytes, msgtype: str) -> Any:
    """A bag record (CDR bytes) as a message with the ROS message's fields. Bytes after the message are
    ignored, as rclpy ignores them: Fast-CDR pads an empty float64[] (a JointState without efforts) with
    4 bytes that rosbags' own `deserialize_cdr` refuses."""
    if len(raw) < 4 or bytes(raw[:2]) not in (b"\x00\x00", b"\x00\x01"):
        raise ValueError("not a CDR message")
    msgdef = store.get_msgdef(msgtype)
    read = msgdef.deserialize_cdr_le if raw[1] else msgdef.deserialize_cdr_be
    msg, _ = read(memoryview(raw)[4:], 0, msgdef.cls, store)
    return msg


class _Episode:
    """The node's readers and observation history for one stretch of continuous recording."""

    def __init__(self, cfg: cf.NodeConfig, layout: Layout, binding: Binding, control: Any) -> None:
        self.readers = inputs.plain_readers(cfg.sources, cfg.max_future_s, layout.features, binding.rename)
        self.history = control.history_for(inputs.layout_card(layout))
        self.timeouts = control.timeouts_for(self.history.required)
        self.rows: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.labels: list[tuple[float, np.ndarray]] = []  # (recording time, action in card order)
        self.next_t: float | None = None  # the next grid time to build a row for
        self.label_index = 0  # labels[label_index] is the newest one recorded by next_t + period / 2


@dataclass
class _Episodes:
    """The episodes built so far: rows on the control grid as recording time settles them, cut into
    episodes at stale stretches and splits."""

    period: float
    min_rows: int
    done: list[tuple[list[np.ndarray], list[np.ndarray]]] = field(default_factory=list)  # (rows, actions)
    dropped: Counter = field(default_factory=Counter)

    def settle(self, ep: _Episode, upto: float) -> None:
        """Build the rows of every grid time settled by recording time `upto` (and covered by commands)."""
        if not ep.labels:
            return
        if ep.next_t is None:
            ep.next_t = ep.labels[0][0]  # the grid starts at the first command
        period = self.period
        while ep.next_t + SETTLE_S <= upto and ep.next_t <= ep.labels[-1][0] + 0.5 * period:
            t_k = ep.next_t
            ep.next_t = t_k + period
            newer = ep.label_index + 1
            while newer < len(ep.labels) and ep.labels[newer][0] <= t_k + 0.5 * period:
                ep.label_index, newer = newer, newer + 1
            action = ep.labels[ep.label_index][1]
            ages = ep.history.ages(t_k)
            stale = [f for f, a in ages.items() if not a <= ep.timeouts[f]]
            if stale:
                self.dropped["stale or missing observation"] += 1
                self.cut(ep)
                continue
            ep.rows.append(ep.history.sample(t_k)[-1])
            ep.actions.append(action)

    def cut(self, ep: _Episode) -> None:
        """Close the rows built so far as one episode (a stale stretch or a split ends it)."""
        if len(ep.rows) >= self.min_rows:
            self.done.append((ep.rows, ep.actions))
        ep.rows, ep.actions = [], []


@dataclass
class BagDataset:
    """The arrays of a dataset file and what the conversion saw."""

    obs: np.ndarray
    action: np.ndarray
    episode_ends: np.ndarray
    reports: list[dict[str, Any]]
    dropped_rows: Counter


def dataset_from_bags(
    bags: Sequence[str | Path],
    cfg: cf.NodeConfig,
    layout: Layout,
    label_topic: str | None = None,
    namespace: str = "/",
    split_gap_s: float = 0.5,
    min_episode_rows: int = 2,
) -> BagDataset:
    """Rows and labels from `bags` as the node configured by `cfg` computes them (module docstring)."""
    card = inputs.layout_card(layout)
    binding = validate_against_card(cfg, card)
    control = control_config(cfg, binding, card)  # the node's timeouts
    labels = resolve(label_topic or cfg.commands_topic, namespace)
    by_topic = {resolve(s.topic, namespace): s for s in cfg.sources}
    if labels in by_topic:
        raise BagError(f"the label topic {labels} is also an observation source")
    reports = {t: TopicReport(t, f"source {s.name} ({s.type})") for t, s in by_topic.items()}
    reports[labels] = TopicReport(labels, "labels (std_msgs/msg/Float64MultiArray)")
    store = typestore()
    out_index = list(binding.output_index)
    episodes = _Episodes(layout.control_period_s, min_episode_rows)

    for bag in bags:
        topics, messages = bag_messages(bag)
        missing = [t for t in [*by_topic, labels] if t not in topics]
        if missing:
            raise BagError(f"{bag}: no messages on {missing} (the bag has {topics}); "
                           "record them, or set the topics (and --namespace) to match the bag")
        ep = _Episode(cfg, layout, binding, control)
        last_t = -math.inf
        for topic, msgtype, t_ns, raw in messages:
            if topic not in reports:
                continue
            t = 1e-9 * t_ns
            if t < last_t or (topic == labels and ep.labels and t - ep.labels[-1][0] > split_gap_s):
                episodes.settle(ep, math.inf)  # a clock going back (sim reset) or a pause in the commands
                episodes.cut(ep)
                ep = _Episode(cfg, layout, binding, control)
            last_t = t
            report = reports[topic]
            report.add(t)
            if topic == labels:
                msg = deserialize(store, raw, inputs.FLOAT64_ARRAY)
                _take_label(ep, msg, t, out_index, len(layout.action_joints), report)
            else:
                _take_observation(ep, by_topic[topic], store, msgtype, raw, t, report)
            episodes.settle(ep, t)
        episodes.settle(ep, math.inf)
        episodes.cut(ep)

    _refuse_unusable(reports, labels)
    if not episodes.done:
        raise BagError(f"no usable rows: {dict(episodes.dropped)}; topic reports: "
                       + json.dumps([r.summary() for r in reports.values()]))
    obs = np.concatenate([np.stack(rows) for rows, _ in episodes.done]).astype(np.float32)
    action = np.concatenate([np.stack(actions) for _, actions in episodes.done]).astype(np.float32)
    ends = np.cumsum([len(rows) for rows, _ in episodes.done]).astype(np.int64)
    return BagDataset(obs, action, ends, [r.summary() for r in reports.values()], episodes.dropped)


def _take_label(ep: _Episode, msg: Any, t: float, out_index: list[int], n_act: int,
                report: TopicReport) -> None:  # fmt: skip
    """A recorded command (output joint order) as the label in effect from `t`, in card order."""
    data = _label(msg, n_act, report)
    if data is not None:
        action = np.empty(n_act)
        action[out_index] = data
        ep.labels.append((t, action))
        ep.history.record_command(t, action)


def _take_observation(ep: _Episode, src: inputs.SourceConfig, store: Any, msgtype: str, raw: bytes, t: float,
                      report: TopicReport) -> None:  # fmt: skip
    """A recorded sensor message through the node's reader into the history, or refused in `report`."""
    try:
        msg = deserialize(store, raw, src.type)
        stamp, values = ep.readers[src.name].read(msg, now=t, received=t)
    except inputs.InputError as exc:
        report.refuse(exc.cause, str(exc))
        return
    except Exception as exc:  # a message of another type under this topic name
        report.refuse("malformed", f"{msgtype} does not deserialize as {src.type}: {exc}")
        return
    if src.stamp == "header" and src.type in inputs.HAS_HEADER and stamp != t:
        report.delays_s.append(t - stamp)
    for feature, value in values.items():
        try:
            ep.history.push(feature, stamp, value, now=t)
        except ObservationError as exc:
            report.refuse("rejected", exc.reason)


def _label(msg: Any, n_act: int, report: TopicReport) -> np.ndarray | None:
    data = np.asarray(msg.data, dtype=float)
    if data.shape != (n_act,):
        report.refuse("size", f"{data.size} command values, expected {n_act} (one per output joint)")
        return None
    if not np.all(np.isfinite(data)):
        report.refuse("non_finite", "a command contains NaN/Inf")
        return None
    return data


def _refuse_unusable(reports: dict[str, TopicReport], labels: str) -> None:
    """A topic whose every message the node's checks refused cannot fill its features: say why."""
    for topic, r in reports.items():
        if r.messages and sum(r.refused.values()) == r.messages:
            cause, _ = r.refused.most_common(1)[0]
            raise BagError(f"every message on {topic} was refused ({r.role}): {r.examples[cause]}")


def write_dataset(path: str | Path, data: BagDataset, layout: Layout, meta: dict[str, Any]) -> None:
    """The file format of sim/dataset.py (what train_policy reads)."""
    arrays: dict[str, Any] = {
        "obs": data.obs,
        "action": data.action,
        "episode_ends": data.episode_ends,
        "layout": np.array(json.dumps([f.to_dict() for f in layout.features])),
        "period": np.array(layout.control_period_s),
        "action_joints": np.array(layout.action_joints),
        "action_lower": np.asarray(layout.action_lower, dtype=float),
        "action_upper": np.asarray(layout.action_upper, dtype=float),
        "meta": np.array(json.dumps(meta)),
    }
    offset = 0
    for f in layout.features:
        if f.kind == "velocity_command":
            arrays["command"] = data.obs[:, offset : offset + f.size]
        offset += f.size
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bags", nargs="+", help="bag directories (sqlite3 or MCAP), one or more episodes each")
    ap.add_argument("--config", required=True, help="the node's params file (observations.*, outputs.*)")
    ap.add_argument("--layout", required=True, help="card YAML / .onnx, or a layout file (see docstring)")
    ap.add_argument("--out", required=True, help="dataset file (.npz) for train_policy")
    ap.add_argument("--labels", default=None, help="command topic to learn (default: outputs.commands.topic)")
    ap.add_argument("--namespace", default="/", help="namespace the node ran in (resolves relative topics)")
    ap.add_argument("--split-gap", type=float, default=0.5, help="a pause in the commands longer than this "
                    "(s) starts a new episode")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        cfg = cf.NodeConfig.from_params(load_params_file(args.config))
        layout = read_layout(args.layout)
        data = dataset_from_bags(args.bags, cfg, layout, args.labels, args.namespace, args.split_gap)
    except (BagError, cf.ConfigError, ModelError, ValueError, OSError) as exc:
        print(f"dataset_from_bag: {exc}", file=sys.stderr)
        return 2
    meta = {"bags": [str(b) for b in args.bags], "config": args.config, "layout": args.layout,
            "labels": args.labels, "namespace": args.namespace, "topics": data.reports,
            "dropped_rows": dict(data.dropped_rows)}  # fmt: skip
    write_dataset(args.out, data, layout, meta)
    n = len(data.obs)
    print(f"wrote {args.out}: {n} rows ({n * layout.control_period_s:.0f} s), {len(data.episode_ends)} "
          f"episodes; dropped rows: {dict(data.dropped_rows) or 'none'}")  # fmt: skip
    for r in data.reports:
        delay = ""
        if r["delay_p50_ms"] is not None:
            delay = f", delay p50 {r['delay_p50_ms']:.1f} ms p95 {r['delay_p95_ms']:.1f} ms"
        refused = f", refused {r['refused']}" if r["refused"] else ""
        print(f"  {r['topic']:45s} {r['messages']:7d} msgs {r['rate_hz']:7.1f} Hz, longest gap "
              f"{1000 * r['max_gap_s']:.0f} ms{delay}{refused}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
