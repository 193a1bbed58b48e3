"""Observation intake (ros/intake.py): messages taken from never-spun DDS queues at tick time, over a real
in-process DDS graph (a publisher node and the intake's hidden node), no controller node."""

from __future__ import annotations

import math
import time

import pytest
import rclpy
from geometry_msgs.msg import Twist
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState

from diffusion_controller.core import inputs
from diffusion_controller.core.card_schema import Feature
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import conversions as cv
from diffusion_controller.ros import intake as ik

pytestmark = pytest.mark.ros

JOINTS = ("a", "b")
FEATURES = (Feature("q", "joint_position", 2, JOINTS), Feature("cmd", "velocity_command", 3))
JS = inputs.SourceConfig("js", "/intake_test/js", cf.JOINT_STATE, ("q",), timeout_s=0.1, stamp="header")
CMD = inputs.SourceConfig("cmd", "/intake_test/cmd", cf.TWIST, ("cmd",), timeout_s=0.0, stamp="receipt")


@pytest.fixture(scope="module")
def graph():
    context = rclpy.Context()
    rclpy.init(context=context)
    owner = rclpy.create_node("intake_test_owner", context=context)
    pub_node = rclpy.create_node("intake_test_pub", context=context)
    intake = ik.Intake(owner, (JS, CMD), cv.MESSAGE_CLASSES, period_s=0.02)
    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    pubs = {"js": pub_node.create_publisher(JointState, JS.topic, qos),
            "cmd": pub_node.create_publisher(Twist, CMD.topic, qos)}  # fmt: skip
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(p.get_subscription_count() == 0 for p in pubs.values()):
        time.sleep(0.05)
    yield intake, pubs
    intake.close()
    pub_node.destroy_node()
    owner.destroy_node()
    rclpy.shutdown(context=context)


def readers() -> dict[str, inputs.SourceReader]:
    return {s.name: inputs.SourceReader(inputs.SourceDecoder(s, FEATURES), max_future_s=0.05)
            for s in (JS, CMD)}


def joint_state(t: float, q: tuple[float, float]) -> JointState:
    msg = JointState()
    msg.header.stamp = cv.sec_to_time(t)
    msg.name = list(JOINTS)
    msg.position = list(q)
    msg.velocity = [0.0, 0.0]
    return msg


def drain(intake: ik.Intake, rd: dict, now: float, spacing: float, settle: float = 0.3):
    """Wait for delivery, then one intake pass; (source, stamp, values) accepted, (source, cause) refused."""
    time.sleep(settle)
    got, refused = [], []
    intake.drain(rd, now, spacing, lambda *a: got.append(a), lambda s, e: refused.append((s, e.cause)))
    return got, refused


def test_queue_depth_holds_one_period_at_the_fastest_rate_within_bounds():
    assert ik.queue_depth(0.02) >= ik.MAX_SENSOR_RATE_HZ * 0.02
    assert ik.queue_depth(0.01) >= ik.MAX_SENSOR_RATE_HZ * 0.01
    assert ik.queue_depth(1e-4) == ik.MIN_DEPTH
    assert ik.queue_depth(10.0) == ik.MAX_DEPTH


def test_same_bin_is_the_spacing_grid():
    assert ik.same_bin(1.0001, 1.0019, 0.002)
    assert not ik.same_bin(1.0019, 1.0021, 0.002)
    assert not ik.same_bin(1.0, 1.0, 0.0)  # no spacing: every sample is kept


def test_every_message_is_checked_and_the_newest_good_one_of_each_bin_is_stored(graph):
    intake, pubs = graph
    rd = readers()
    drain(intake, rd, 100.0, 0.002, settle=0.1)  # empty whatever an earlier test left
    # 40 messages 0.5 ms apart (2 kHz) over 20 ms; every 4th (the newest of its 2 ms bin) is bad, so each
    # bin must fall back to the good message before it; all 10 bad ones must be reported.
    t0 = 10.0
    for i in range(40):
        q = (math.nan, 0.0) if i % 4 == 3 else (float(i), -float(i))
        bin_, k = divmod(i, 4)  # clear of the bin edges, whatever the float rounding
        pubs["js"].publish(joint_state(t0 + 0.002 * bin_ + 0.0002 + 0.0004 * k, q))
    got, refused = drain(intake, rd, t0 + 0.03, 0.002)
    assert refused == [("js", "non_finite")] * 10
    stamps = [s for src, s, _ in got if src == "js"]
    values = [v["q"][0] for src, _, v in got if src == "js"]
    assert values == [float(i) for i in range(2, 40, 4)]  # the last good message of each bin
    assert stamps == sorted(stamps) and len(stamps) == 10
    assert intake.counts()["js"].taken >= 40


def test_a_bad_message_followed_by_a_good_one_in_its_bin_is_still_reported(graph):
    # A driver that sends a bad frame before each good one must show on /diagnostics even though the history
    # stores only the newest message of a bin (reading only that one hid all 200 such frames once).
    intake, pubs = graph
    rd = readers()
    drain(intake, rd, 100.0, 0.002, settle=0.1)
    for i in range(10):
        t = 60.0 + 0.002 * i + 0.0002
        pubs["js"].publish(joint_state(t, (math.nan, 0.0)))
        pubs["js"].publish(joint_state(t + 0.0004, (float(i), 0.0)))
    got, refused = drain(intake, rd, 60.1, 0.002)
    assert refused == [("js", "non_finite")] * 10
    assert [v["q"][0] for src, _, v in got if src == "js"] == [float(i) for i in range(10)]


def test_without_spacing_every_good_message_is_stored_in_order(graph):
    intake, pubs = graph
    rd = readers()
    drain(intake, rd, 100.0, 0.002, settle=0.1)
    for i in range(5):
        pubs["js"].publish(joint_state(20.0 + 0.01 * i, (float(i), 0.0)))
    got, refused = drain(intake, rd, 20.1, 0.0)
    assert refused == []
    assert [v["q"][0] for src, _, v in got if src == "js"] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_receipt_stamps_are_when_the_message_arrived_not_when_it_was_taken(graph):
    intake, pubs = graph
    rd = readers()
    drain(intake, rd, 100.0, 0.002, settle=0.1)
    msg = Twist()
    msg.linear.x = 0.3
    pubs["cmd"].publish(msg)
    got, _ = drain(intake, rd, 50.0, 0.002, settle=0.3)  # it waited ~0.3 s in the queue
    (_, stamp, values), *_ = [g for g in got if g[0] == "cmd"]
    assert values["cmd"][0] == pytest.approx(0.3)
    assert 50.0 - 1.0 < stamp < 50.0 - 0.2


def test_a_stream_faster_than_the_queue_reports_what_it_lost(graph):
    intake, pubs = graph
    rd = readers()
    drain(intake, rd, 100.0, 0.002, settle=0.1)
    lost0 = intake.counts()["js"].lost
    depth = intake.sources["js"].depth
    n = depth + 50
    for i in range(n):
        pubs["js"].publish(joint_state(30.0 + 1e-4 * i, (float(i), 0.0)))
    got, _ = drain(intake, rd, 30.5, 0.0)
    js = [v["q"][0] for src, _, v in got if src == "js"]
    assert js[-1] == float(n - 1)  # the newest is always there
    assert len(js) <= depth
    assert intake.counts()["js"].lost - lost0 == n - len(js)


@pytest.mark.parametrize(("args", "clock"), [([], "/clock"), (["-r", "/clock:=clock"], "/robot1/clock")])
def test_a_hidden_node_follows_the_clock_its_owner_follows(args, clock):
    """One of several simulators: `-r /clock:=clock` in namespace robot1 must move the loop node's clock
    (it takes no --ros-args of its own) along with the owner's, or its sim-time timer never ticks."""
    context = rclpy.Context()
    rclpy.init(args=["x", "--ros-args", "-r", "__ns:=/robot1", *args], context=context)
    try:
        owner = rclpy.create_node("owner", context=context)
        helper = ik.hidden_node(owner, "loop")
        assert owner.resolve_topic_name("/clock") == helper.resolve_topic_name("/clock") == clock
        assert helper.get_fully_qualified_name() == "/robot1/_owner_loop"
        helper.destroy_node()
        owner.destroy_node()
    finally:
        rclpy.shutdown(context=context)
