"""Test-wide setup: keep each test run's DDS traffic on this machine and apart from other runs."""

import os

# One DDS domain per pytest process so concurrent runs (developers, CI) never hear each other; domain
# ids 0..101 are valid with Fast DDS' default port mapping.
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
# Fast DDS' shared-memory transport leaves port lock files behind when a test kills a node, and later
# processes then log errors about them; UDP on loopback has no such state.
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "UDPv4")
