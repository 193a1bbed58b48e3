"""The node's DDS transport (diffusion_controller/ros/dds.py): UDP unless the user configured Fast DDS.

Unit tests of the decision on an environment, the shipped one-host profile, and the node as a real
process: its participant must have no Fast DDS shared-memory threads when left to itself, and must have
them when the user asks for Fast DDS's default transports (so the check can tell the two apart).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from ros_helpers import NodeProcess, console_script, wait_until

from diffusion_controller.ros import dds

ROOT = Path(__file__).resolve().parents[1]


def test_left_to_itself_the_node_uses_udp_only(tmp_path):
    env = {"ROS_DOMAIN_ID": "3"}
    choice = dds.choose_transport(env, cwd=tmp_path)
    assert env["FASTDDS_BUILTIN_TRANSPORTS"] == "UDPv4"
    assert not choice.warning and "UDP only" in choice.message and dds.ISSUE in choice.message


@pytest.mark.parametrize("name", dds.USER_CONFIG)
def test_a_user_fastdds_configuration_is_kept(tmp_path, name):
    env = {name: "SHM" if name == "FASTDDS_BUILTIN_TRANSPORTS" else "/etc/profile.xml"}
    before = dict(env)
    choice = dds.choose_transport(env, cwd=tmp_path)
    assert env == before and not choice.warning and name in choice.message


def test_a_default_profile_in_the_working_directory_is_kept(tmp_path):
    (tmp_path / dds.DEFAULT_PROFILE_FILE).write_text("<dds/>")
    env: dict[str, str] = {}
    choice = dds.choose_transport(env, cwd=tmp_path)
    assert env == {} and dds.DEFAULT_PROFILE_FILE in choice.message


LOCALHOST_ENVS = [
    {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"},
    {"ROS_AUTOMATIC_DISCOVERY_RANGE": "localhost"},
    {"ROS_LOCALHOST_ONLY": "1"},
]


@pytest.mark.parametrize("env", LOCALHOST_ENVS)
def test_localhost_discovery_gets_a_warning_naming_the_way_out(tmp_path, env):
    before = dict(env)
    choice = dds.choose_transport(env, cwd=tmp_path)
    assert env == before, "rmw_fastrtps adds shared memory for LOCALHOST whatever the node sets"
    assert choice.warning and dds.PROFILE_NAME in choice.message and "SYSTEM_DEFAULT" in choice.message


def test_another_middleware_is_not_touched(tmp_path):
    env = {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert dds.choose_transport(env, cwd=tmp_path) is None
    assert env == {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}


def test_one_host_udp_sets_the_shipped_profile_over_a_shell_localhost():
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "FASTDDS_BUILTIN_TRANSPORTS": "DEFAULT"}
    dds.one_host_udp(env)
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SYSTEM_DEFAULT"
    assert "FASTDDS_BUILTIN_TRANSPORTS" not in env
    assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]) == ROOT / "config" / dds.PROFILE_NAME


def test_the_one_host_profile_is_udp_on_loopback_only():
    root = ET.parse(ROOT / "config" / dds.PROFILE_NAME).getroot()
    ns = {"f": "http://www.eprosima.com"}
    types = [t.text for t in root.iterfind(".//f:transport_descriptor/f:type", ns)]
    assert types == ["UDPv4"]
    participant = root.find(".//f:participant", ns)
    assert participant.get("is_default_profile") == "true"
    assert participant.find("f:rtps/f:useBuiltinTransports", ns).text == "false"
    addresses = {a.text for a in participant.iterfind(".//f:address", ns)}
    assert addresses == {"127.0.0.1"}, "discovery and data must stay on this host"


def _dds_threads(pid: int) -> set[str]:
    names = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.add((task / "comm").read_text().strip())
        except OSError:
            continue
    return {n for n in names if n.startswith("dds.")}


@pytest.mark.parametrize("user_transports", [None, "DEFAULT"])
def test_the_node_process_has_no_shared_memory_threads_unless_asked(user_transports):
    """Discovery OFF (no other participant, no traffic): rmw_fastrtps leaves the transports to Fast DDS,
    as with the ROS default SUBNET; the node starts unconfigured, which is enough to have a participant."""
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "OFF", "FASTDDS_DEFAULT_PROFILES_FILE": None,
           "FASTDDS_BUILTIN_TRANSPORTS": user_transports}  # fmt: skip
    cmd = console_script("controller_node", "diffusion_controller.ros.controller_node")
    args = ["--ros-args", "--params-file", str(ROOT / "config" / "ant.yaml"), "-p", "autostart:=false"]
    with NodeProcess([*cmd, *args], env=env, cwd=str(ROOT)) as proc:
        assert wait_until(lambda: "waiting in 'unconfigured'" in proc.output() or not proc.alive, 60.0)
        assert proc.alive, proc.output()[-2000:]
        threads = _dds_threads(proc.proc.pid)
        log = proc.output()
        assert proc.stop() == 0
    assert any(n.startswith("dds.udp.") for n in threads), threads
    shm = {n for n in threads if n.startswith("dds.shm")}
    if user_transports is None:
        assert not shm, f"the node's participant uses shared memory: {sorted(threads)}"
        assert "DDS: UDP only" in log
    else:
        assert shm, f"Fast DDS's default transports should include shared memory here: {sorted(threads)}"
        assert "DDS: Fast DDS transports as configured (FASTDDS_BUILTIN_TRANSPORTS)" in log


def test_the_suite_runs_without_shared_memory():
    """conftest.py: every process of the suite inherits the one-host UDP profile."""
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SYSTEM_DEFAULT"
    assert Path(os.environ["FASTDDS_DEFAULT_PROFILES_FILE"]).name == dds.PROFILE_NAME


def test_the_receive_threads_of_fast_dds_and_only_they_get_the_real_time_priority(tmp_path):
    """dds_priority: the threads named dds.udp.<port> / dds.shm.<port> (Fast DDS's receive threads) are
    set to SCHED_FIFO; the others (Python's, Fast DDS's event and async threads) are left alone; a refusal
    (no rtprio rights) is reported, not raised."""
    tasks = {101: "python", 102: "dds.udp.7400", 103: "dds.ev.0", 104: "dds.shm.51234", 105: "dds.asyn.0.0"}
    for tid, name in tasks.items():
        (tmp_path / str(tid)).mkdir()
        (tmp_path / str(tid) / "comm").write_text(name + "\n")
    calls = []
    names, why = dds.raise_receive_threads(48, tmp_path, lambda tid, p: calls.append((tid, p)))
    assert why is None and names == ["dds.udp.7400", "dds.shm.51234"]
    assert calls == [(102, 48), (104, 48)]

    def refuse(tid, p):
        raise PermissionError(1, "Operation not permitted")

    names, why = dds.raise_receive_threads(48, tmp_path, refuse)
    assert names == [] and "dds.udp.7400" in why and "not permitted" in why
    (tmp_path / "102" / "comm").write_text("python\n")
    (tmp_path / "104" / "comm").write_text("python\n")
    assert dds.raise_receive_threads(48, tmp_path, lambda tid, p: None) == ([], "no Fast DDS receive thread "
                                                                             "in this process")


def test_cpu_lists_and_pinning_every_thread(tmp_path):
    """ros/process.py: CPU lists as taskset -c takes them, refused with the reason otherwise; pin_threads
    sets each thread of the process and reports a refusal instead of raising."""
    from diffusion_controller.ros import process

    assert process.parse_cpus("") == frozenset()
    assert process.parse_cpus("1") == {1}
    assert process.parse_cpus("0, 2-4") == {0, 2, 3, 4}
    for bad in ("one", "3-1", "-1", "1-"):
        with pytest.raises(ValueError, match="CPU"):
            process.parse_cpus(bad)
    assert process.check_cpus("1", allowed=[0, 1]) == ({1}, None)
    cpus, why = process.check_cpus("2", allowed=[0, 1])
    assert cpus == frozenset() and "[2]" in why
    for tid in (11, 12, 13):
        (tmp_path / str(tid)).mkdir()
    calls = []
    assert process.pin_threads({1}, tmp_path, lambda tid, cpus: calls.append((tid, cpus))) is None
    assert sorted(calls) == [(11, {1}), (12, {1}), (13, {1})]

    def gone_or_refused(tid, cpus):
        if tid == 11:
            raise ProcessLookupError
        raise PermissionError(1, "Operation not permitted")

    why = process.pin_threads({1}, tmp_path, gone_or_refused)
    assert why is not None and "not permitted" in why
