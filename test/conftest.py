"""Test-wide setup: keep each test run's DDS traffic on this machine and apart from other runs."""

import os

import pytest

from diffusion_controller.ros import dds

# One DDS domain per pytest process so concurrent runs (developers, CI) never hear each other; domain
# ids 0..101 are valid with Fast DDS' default port mapping.
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
# Discovery on this host only, over UDP on loopback: Fast DDS's shared memory can stop a process's
# reception for 333 ms when another joins (diffusion_controller/ros/dds.py), and it leaves port lock files
# behind when a test kills a node.
dds.one_host_udp(os.environ)

#: Ticks a hardening scenario may miss under pytest (2% of them, at least 2): CI and developer machines are
#: shared, so a tick or two may be lost to other programs; bench/robustness.py holds the node to zero.
MISSED_TICK_BUDGET, MISSED_TICK_FLOOR = 0.02, 2


@pytest.fixture(scope="module")
def hardening_harness(tmp_path_factory):
    """The node under test plus its sensor feeder and probes (bench/hardening/), one per test module."""
    from hardening.harness import Harness
    from hardening.models import Models

    models = Models(tmp_path_factory.mktemp("models"))
    with Harness(
        models, missed_tick_budget=MISSED_TICK_BUDGET, missed_tick_floor=MISSED_TICK_FLOOR
    ) as harness:
        yield harness
        rc = harness.main.stop()
    assert rc == 0, "SIGINT must end the node cleanly (exit code 0)"
