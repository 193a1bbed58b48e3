"""Hardening scenarios: bad input, faults and load against the controller node as a real process.

Shared by test/test_hardening_*.py (one pytest test per scenario) and bench/robustness.py (every scenario,
a table and JSON), so the suite and the report measure the same thing. A scenario is
setup -> inject -> observe -> verdict: it gets a `harness.Harness` and a `harness.Result` it adds its own
checks to. Its modules:

- `models`: the scenario models (tiny policies and files derived from them: NaN, slow, broken);
- `messages`: the ant's sensor streams, their good messages and the bad ones (mutations) a scenario sends;
- `sensors`: the sensor process (SCHED_FIFO where allowed) and its controller; also the wrong-type driver;
- `node`: one controller node process and what a probe records of it, checked against the card;
- `harness`: the harness (probe, sensor process, node processes), results, the verdict every scenario
  gets, and the scenario registry;
- `bad_input`, `faults`, `load`: the scenarios by group; `scenarios`: all of them registered, `names`
  and `run`.

The harness: node processes (config/ant.yaml, tiny random policies made at run time, nice -10 as a
controller is deployed beside other work), a sensor process publishing the ant's four streams (SCHED_FIFO
where allowed: a starved test process must not pass for a node that drops data; it also injects the bad
messages, from the same writer so stamps stay ordered), and a test-side ROS node recording every output
with its publication sequence number (DDS losses on a loaded machine are counted, never mistaken for the
node's doing). Around every scenario, for every node it watched, `Watch.verdict` checks what holds
whatever happened:

- the node process is alive (or exited 0 when the scenario stopped it);
- it kept ticking: no gap in the node-clock tick times of ~/debug/command_timing (missed ticks); a tick
  slot inside a stall that the real-time sensor process suffered too is the machine's, counted apart
  (`count_missed`), since no node ticks while the machine does not run it;
- no unsafe output: every Float64MultiArray command and every JointTrajectory point is finite, inside the
  card's limits and within `max_step_per_tick` of the one before (the first command of a process and the
  first after a clock jump start a new episode, DESIGN.md), and no RUNNING tick executed a stale action
  (action_time < exec_time - period/2).

What the node is expected to do (DESIGN.md, README): reject bad input with one rate-limited log line per
cause and a count on /diagnostics, go to the safe state (hold) when a required stream is stale and come
back by itself, refuse a model swap that cannot work while the old model keeps running, exit 0 on SIGINT
and SIGTERM, and start a new episode when the sim clock jumps back.

bench/ is on the import path of both users (`python bench/x.py` puts it first; pytest.ini's `pythonpath`),
so `import hardening.scenarios` works from either without touching sys.path. This file imports nothing:
the sensor process runs as `python -m hardening.sensors` and must not load the scenarios.
"""
