"""Helpers for tests and benchmarks that run ROS nodes as real processes and talk to them over DDS.

In bench/ because both use it (the hardening harness, bench/robustness.py); tests import it through
pytest.ini's `pythonpath`. Generic on purpose (sim node, controller node, anything with ``--ros-args``):

- ``ros_args(params, remaps)`` builds ``--ros-args -p name:=value ... -r from:=to``.
- ``NodeProcess(cmd, ..., nice=0)`` starts a process with this test's environment (so ROS_DOMAIN_ID and
  ROS_AUTOMATIC_DISCOVERY_RANGE from conftest.py are inherited), logs to a file (no pipe to fill),
  and ``stop()`` sends SIGINT, waits, and returns the exit code (SIGKILL only as a last resort).
  As a context manager it always cleans up, even when the test fails.
- ``console_script(name, module)`` finds the venv's console script, else ``python -m module``.
- ``Probe`` is an rclpy node in its own Context and executor thread: ``subscribe`` records every
  message with its wall receive time, ``wait_for`` blocks until a predicate on the recorded messages
  holds, ``publisher``/``call`` send commands and service requests.
- ``wait_until(pred, timeout)`` polls any condition.
- ``Probe.set_parameters(node, **values)``, ``diagnostic_status(msgs, name)`` (a /diagnostics status as a
  dict), ``rss_mb(pid)`` and ``cpu_seconds(pid)`` (from /proc) for tests that watch a node from outside;
  ``subscribe(..., with_info=True)`` keeps publication sequence numbers to tell DDS losses apart.

Example::

    with NodeProcess(console_script("sim_node", "diffusion_controller.sim.sim_node")
                     + ros_args({"real_time_factor": 0.0})) as proc, Probe() as probe:
        probe.subscribe("/clock", Clock)
        probe.wait_for("/clock", lambda msgs: len(msgs) > 10, timeout=20)
        assert proc.stop() == 0
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def wait_until(pred: Callable[[], bool], timeout: float, period: float = 0.02) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(period)


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_param_text(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)  # always has a '.' so it parses as a double
    return str(value)


def ros_args(params: dict[str, Any] | None = None, remaps: dict[str, str] | None = None) -> list[str]:
    """``--ros-args -p k:=v ... -r a:=b ...`` for a node command line."""
    out = ["--ros-args"]
    for k, v in (params or {}).items():
        out += ["-p", f"{k}:={_param_text(v)}"]
    for a, b in (remaps or {}).items():
        out += ["-r", f"{a}:={b}"]
    return out


def console_script(name: str, module: str) -> list[str]:
    """The installed console script beside this interpreter, else ``python -m module``."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def _try_nice(increment: int) -> None:
    """In a child before exec: change its nice value when permitted (negative needs privileges)."""
    with contextlib.suppress(OSError):
        os.nice(increment)


def diagnostic_status(messages: Iterable[Any], name: str) -> dict[str, Any]:
    """Key-values of the newest DiagnosticStatus called `name` in DiagnosticArray `messages` (oldest
    first), plus `_level` (int) and `_message`; {} when there is none."""
    for msg in reversed(list(messages)):
        for st in msg.status:
            if st.name == name:
                level = st.level[0] if isinstance(st.level, bytes) else int(st.level)
                return {kv.key: kv.value for kv in st.values} | {"_level": level, "_message": st.message}
    return {}


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (VmRSS from /proc; nan when it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/<pid>/stat; nan when it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NodeProcess:
    """A node (or any command) as a child process with the test's ROS environment."""

    def __init__(
        self,
        cmd: Sequence[str],
        env: dict[str, str | None] | None = None,
        cwd: str | None = None,
        nice: int = 0,
    ):
        """`nice` < 0 raises the process's scheduling weight where the system allows it (root or
        CAP_SYS_NICE), as a controller is deployed beside other work; elsewhere it runs at normal priority.
        `env` adds to the test's environment; a None value removes that variable."""
        self.cmd = list(cmd)
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        for name, value in (env or {}).items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        self._log = tempfile.NamedTemporaryFile(prefix="node_", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            env=full_env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: _try_nice(nice)) if nice else None,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait; SIGKILL after ``timeout``. Returns the exit code (negative = signal)."""
        if self.alive:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(FileNotFoundError):  # exiting twice is fine
            os.unlink(self._log.name)


class Probe:
    """A test-side rclpy node with its own context, spinning in a background thread."""

    def __init__(self, name: str = "test_probe"):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = Node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lock = threading.Lock()
        self.messages: dict[str, list[tuple[float, Any]]] = {}
        self.infos: dict[str, list[Any]] = {}
        self._clients: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        with contextlib.suppress(ExternalShutdownException):
            self.executor.spin()

    def subscribe(
        self, topic: str, msg_type: type, qos: QoSProfile = RELIABLE, with_info: bool = False
    ) -> None:
        """Record every message on ``topic`` as (wall receive time, msg); with ``with_info`` also its rmw
        MessageInfo (publication sequence number, source timestamp), see ``received_with_info``."""
        with self.lock:
            self.messages.setdefault(topic, [])
            self.infos.setdefault(topic, [])

        def cb(msg: Any) -> None:
            with self.lock:
                self.messages[topic].append((time.monotonic(), msg))

        def cb_info(msg: Any, info: Any) -> None:
            with self.lock:
                self.messages[topic].append((time.monotonic(), msg))
                self.infos[topic].append(info)

        self.node.create_subscription(msg_type, topic, cb_info if with_info else cb, qos)

    def received_with_info(self, topic: str) -> list[tuple[float, Any, Any]]:
        """(wall receive time, msg, MessageInfo) of a topic subscribed ``with_info``: the publication
        sequence numbers tell a message lost on the way from one never sent."""
        with self.lock:
            msgs, infos = self.messages.get(topic, []), self.infos.get(topic, [])
            return [(t, m, i) for (t, m), i in zip(msgs, infos, strict=False)]

    def received(self, topic: str) -> list[Any]:
        """A copy of the messages received on ``topic`` so far."""
        with self.lock:
            return [m for _, m in self.messages.get(topic, [])]

    def received_timed(self, topic: str) -> list[tuple[float, Any]]:
        with self.lock:
            return list(self.messages.get(topic, []))

    def clear(self, topics: Iterable[str] | None = None) -> None:
        with self.lock:
            for t in list(topics) if topics is not None else list(self.messages):
                self.messages[t] = []
                self.infos[t] = []

    def wait_for(
        self, topic: str, pred: Callable[[list[Any]], bool] | None = None, timeout: float = 10.0
    ) -> bool:
        """Wait until ``pred(messages)`` holds (default: at least one message on ``topic``)."""
        pred = pred or (lambda msgs: len(msgs) > 0)
        return wait_until(lambda: pred(self.received(topic)), timeout)

    def publisher(self, topic: str, msg_type: type, qos: QoSProfile = RELIABLE):
        return self.node.create_publisher(msg_type, topic, qos)

    def wait_for_subscriber(self, pub, timeout: float = 10.0) -> bool:
        """Wait until the publisher is matched (a message sent before that is lost)."""
        return wait_until(lambda: pub.get_subscription_count() > 0, timeout)

    def call(self, srv_type: type, name: str, request: Any, timeout: float = 10.0) -> Any:
        """Call a service and return the response (None on timeout).

        Clients are kept per service name: a fresh client may lose its first request while DDS is still
        matching the reply path, so a client waits a moment after discovering its server (again after the
        server restarted)."""
        client = self._clients.get(name)
        if client is None:
            client = self.node.create_client(srv_type, name)
            self._clients[name] = client
        if not client.service_is_ready():  # new, or the server restarted: match again, then settle
            if not client.wait_for_service(timeout_sec=timeout):
                return None
            time.sleep(0.3)
        future = client.call_async(request)
        wait_until(future.done, timeout)
        return future.result() if future.done() else None

    def set_parameters(self, node: str, timeout: float = 10.0, **values: Any) -> list[Any] | None:
        """Set parameters of `node` (fully qualified name) through its SetParameters service; one
        SetParametersResult per value (None on timeout)."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        req = SetParameters.Request()
        req.parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        res = self.call(SetParameters, f"{node}/set_parameters", req, timeout)
        return None if res is None else list(res.results)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=2.0)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def thread_cpus(pid: int) -> list[tuple[str, int, int]]:
    """(allowed CPU list as /proc writes it, scheduling policy, priority) of each thread of process `pid`."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            tid = int(task.name)
            policy, prio = os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority
        except (OSError, ProcessLookupError):
            continue  # the thread ended meanwhile
        allowed = (line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        out.append((next(allowed).split(":")[1].strip(), policy, prio))
    return out
