"""Batch graphs (issue 25, one policy node for several robots): `export_policy --batch N` makes a fused
graph that runs N histories at once, Policy.predict_batch runs the due robots in one session run, and the
policy node's worker runs each group of due robots as one run, every chunk to its own robot."""

from __future__ import annotations

import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gpu_fakes import Factory, fake_gpu
from tiny_models import tiny_card, tiny_network

from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.core.inference import InferenceRequest, compute_batch
from diffusion_controller.core.runtime import ModelError, Policy
from diffusion_controller.ros.policy_node import PACE, PolicyNode, Worker, pass_plan
from diffusion_controller.training.export import export_onnx, main

PARITY = 1e-5
QUIET = {"log": lambda _m: None}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny network exported at batch 1 and batch 4 (ort_fused), loaded on the CPU."""
    d = tmp_path_factory.mktemp("batch")
    card = tiny_card(steps=2)
    net = tiny_network(card, layers=2, heads=2, width=32, seed=3)
    paths = {b: export_onnx(net, card, d / f"b{b}.onnx", batch=b) for b in (1, 4)}
    return {b: Policy.load(p, provider="cpu", **QUIET) for b, p in paths.items()} | {"paths": paths}


def histories(card: ModelCard, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return card.obs_mean + 2 * card.obs_std * rng.standard_normal((n, card.history, card.obs_dim))


def feed(sess: ort.InferenceSession, card: ModelCard, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for every input of `sess` (obs near the mean, an inpainting mask of 0, 0.5 and 1)."""
    rng = np.random.default_rng(seed)
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    b = shapes["obs_history"][0]
    lo, hi = card.action_min, card.action_max
    return {
        "obs_history": histories(card, b, seed).astype(np.float32),
        "noise": rng.standard_normal(shapes["noise"]).astype(np.float32),
        "prefix": (lo + (hi - lo) * rng.random(shapes["prefix"])).astype(np.float32),
        "prefix_mask": rng.choice([0.0, 0.5, 1.0], shapes["prefix_mask"]).astype(np.float32),
    }


@pytest.mark.parametrize("ops", ["ort_fused", "standard"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_a_batch_graph_is_n_single_runs_in_one(tmp_path, ops, eta):
    card = tiny_card(steps=3, eta=eta, horizon=6, history=3)
    net = tiny_network(card, layers=2, heads=2, width=32, seed=1)
    one = export_onnx(net, card, tmp_path / "b1.onnx", ops=ops)
    three = export_onnx(net, card, tmp_path / "b3.onnx", ops=ops, batch=3)
    assert ModelCard.from_onnx(three).graph.batch == 3 and ModelCard.from_onnx(one).graph.batch == 1
    assert "batch" not in ModelCard.from_onnx(one).to_dict()["graph"]  # a batch-1 card reads as before
    s1, s3 = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (one, three))
    inputs = feed(s3, card, seed=2)
    got = s3.run(None, inputs)[0]
    assert got.shape == (3, card.horizon, card.action_dim)
    rows = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(3)]
    singles = np.concatenate([s1.run(None, row)[0] for row in rows])
    assert np.max(np.abs(got - singles)) <= PARITY
    assert np.ptp(got, axis=0).max() > 1e-3  # the rows are different chunks, not one chunk copied


def test_nodes_per_step_do_not_grow_with_the_batch(tmp_path):
    card = tiny_card(steps=2)
    net = tiny_network(card, layers=2, heads=2, width=32, seed=0)

    def ops(k: int, b: int) -> Counter:
        path = export_onnx(net, card, tmp_path / f"k{k}b{b}.onnx", steps=k, batch=b, verify=False)
        return Counter(n.op_type for n in onnx.load(str(path)).graph.node)

    per_step = {b: sum(ops(2, b).values()) - sum(ops(1, b).values()) for b in (1, 4)}
    assert per_step[4] == per_step[1] > 0, per_step
    four = ops(2, 4)
    assert not {"Shape", "Gather", "Softmax"} & set(four), four  # static shapes, fused attention
    assert four["Concat"] == 1  # once per chunk, as at batch 1


def test_a_denoiser_graph_stays_batch_1(tmp_path, capsys):
    card = tiny_card(steps=2)
    net = tiny_network(card, layers=1, heads=2, width=32)
    with pytest.raises(ValueError, match=r"batch: expected an integer >= 1 \(a denoiser graph: 1\), got 2"):
        export_onnx(net, card, tmp_path / "d.onnx", graph="denoiser", batch=2)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="batch: expected an integer >= 1"):
            export_onnx(net, card, tmp_path / "f.onnx", batch=bad)
    d = export_onnx(net, card, tmp_path / "d.onnx", graph="denoiser").with_suffix(".yaml")
    text = d.read_text().replace("ops: standard", "ops: standard\n  batch: 2")
    with pytest.raises(CardError, match=r"graph.batch: a denoiser graph takes one history \(batch 1\), got"):
        ModelCard.from_yaml_text(text)


def test_export_policy_batch_option(tmp_path, capsys):
    from diffusion_controller.training.checkpoint import save_checkpoint

    card = tiny_card(steps=2)
    ckpt = save_checkpoint(tmp_path / "c.pt", tiny_network(card, layers=1, heads=2, width=32), card)
    assert main([str(ckpt), str(tmp_path / "b2.onnx"), "--batch", "2"]) == 0
    assert "batch 2" in capsys.readouterr().out
    assert ModelCard.from_onnx(tmp_path / "b2.onnx").graph.batch == 2


def test_predict_batch_is_one_run_with_each_robots_own_seed(pair):
    p1, p4 = pair[1], pair[4]
    card = p1.card
    obs = histories(card, 4, seed=1)
    singles = np.stack([p1.predict(obs[i], seed=10 + i) for i in range(4)])
    for n in (1, 3, 4):  # fewer robots than rows: the unused rows are padding
        got = p4.predict_batch(obs[:n], seeds=[10 + i for i in range(n)])
        assert got.shape == (n, card.horizon, card.action_dim) and got.dtype == np.float64
        np.testing.assert_allclose(got, singles[:n], atol=PARITY)
    # a batch-1 model answers the same call by a loop, and a batch-4 model keeps the single call
    np.testing.assert_allclose(p1.predict_batch(obs, seeds=[10, 11, 12, 13]), singles, atol=PARITY)
    np.testing.assert_allclose(p4.predict(obs[2], seed=12), singles[2], atol=PARITY)
    noise = np.random.default_rng(3).standard_normal((2, card.horizon, card.action_dim))
    np.testing.assert_allclose(
        p4.predict_batch(obs[:2], noise=noise), [p1.predict(obs[i], noise=noise[i]) for i in range(2)],
        atol=PARITY,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p, o: p.predict_batch([*o[:4].tolist(), o[0].tolist()]), r"at most 4 per run.*got 5"),
        (lambda p, o: p.predict_batch(o[0]), r"histories: expected shape \(n, 4, 36\) with 1 <= n <= 4"),
        (lambda p, o: p.predict_batch(o[:, :, :-1]), r"expected shape \(n, 4, 36\).*got \(4, 4, 35\)"),
        (lambda p, o: p.predict_batch(o[:0]), r"expected shape .* got \(0, 4, 36\)"),
        (lambda p, o: p.predict_batch([o[0], o[0][:2]]), r"histories: expected shape"),
        (lambda p, o: p.predict_batch(np.where(o > 0, np.nan, o)), r"histories: expected finite values"),
        (lambda p, o: p.predict_batch(o[:2], seeds=[1]), r"seeds: expected 2 seeds"),
        (lambda p, o: p.predict_batch(o[:2], seeds=[1, 2], noise=np.zeros((2, 8, 8))), r"seeds: .*no noise"),
        (lambda p, o: p.predict_batch(o[:2], noise=np.zeros((3, 8, 8))), r"noise: expected shape \(2, 8"),
    ],
)
def test_predict_batch_refuses_what_it_cannot_run(pair, call, match):
    obs = histories(pair[4].card, 4)
    with pytest.raises(ModelError, match=match):
        call(pair[4], obs)


def test_a_graph_whose_batch_differs_from_its_card_is_refused(pair, tmp_path):
    card = ModelCard.from_onnx(pair["paths"][4])
    path = tmp_path / "lies.onnx"
    path.write_bytes(pair["paths"][4].read_bytes())
    card.replace(graph=type(card.graph)(**(vars(card.graph) | {"batch": 1}))).to_onnx(path)
    with pytest.raises(ModelError, match=r"input 'obs_history' has shape \[4, 4, 36\], the card implies"):
        Policy.load(path, provider="cpu", **QUIET)


def test_batch_graph_on_a_captured_cuda_graph_matches_the_cpu(pair, monkeypatch):
    """Fixed device buffers of the whole batch: the capture replays predict and predict_batch alike."""
    uploads = fake_gpu(monkeypatch)
    cpu = pair[4]
    factory = Factory()
    p = Policy.load(pair["paths"][4], provider="cuda", session_factory=factory, **QUIET)
    assert p.provider == "cuda" and p.cuda_graph and p.batch == 4
    obs = histories(cpu.card, 4, seed=5)
    uploads.up.clear()
    for n in (4, 2, 4):
        np.testing.assert_allclose(p.predict_batch(obs[:n], seeds=list(range(n))),
                                   cpu.predict_batch(obs[:n], seeds=list(range(n))), atol=PARITY)  # fmt: skip
    np.testing.assert_allclose(p.predict(obs[1], seed=1), cpu.predict(obs[1], seed=1), atol=PARITY)
    assert {shape[0] for shape, _ in uploads.up} == {4}  # every upload fills the bound batch buffers
    session = factory.sessions[-1]
    assert session.graph and session.threads == {"policy_gpu_tiny_ant"}  # one thread, the captured graph


class FakeNode:
    """What a Worker needs of the policy node: the policy, and where each chunk goes."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.published: list[tuple[str, object]] = []
        self.done = threading.Event()

    def publish(self, robot, result, policy) -> None:
        self.published.append((robot.name, result))
        self.done.set()


class Counting:
    """A policy wrapper that counts model runs (predict and predict_batch calls)."""

    def __init__(self, policy) -> None:
        self.policy, self.card, self.batch = policy, policy.card, policy.batch
        self.calls: list[tuple[str, int]] = []

    def predict(self, obs, **kw):
        self.calls.append(("predict", 1))
        return self.policy.predict(obs, **kw)

    def predict_batch(self, obs, **kw):
        self.calls.append(("predict_batch", len(obs)))
        return self.policy.predict_batch(obs, **kw)


def run_pass(policy, robots: int) -> tuple[FakeNode, list[InferenceRequest]]:
    node = FakeNode(policy)
    worker = Worker(node, "test_pass")
    obs = histories(policy.card, robots, seed=7)
    requests = [InferenceRequest(1, 10.0 + 0.02 * k, 0.0, obs[k], seed=100 + k) for k in range(robots)]
    try:
        worker.submit([(SimpleNamespace(name=f"robot{k + 1}"), r) for k, r in enumerate(requests)])
        deadline = threading.Event()
        for _ in range(500):
            if len(node.published) == robots and not worker.busy:
                break
            deadline.wait(0.01)
    finally:
        worker.stop()
    assert worker.passes == 1 and worker.runs == len(policy.calls)
    return node, requests


@pytest.mark.parametrize(
    ("batch", "robots", "calls"),
    [
        (4, 4, [("predict_batch", 4)]),  # all due together: one run
        (4, 3, [("predict_batch", 3)]),
        (4, 1, [("predict", 1)]),
        (1, 3, [("predict", 1)] * 3),  # a batch-1 model: the old loop of single runs
    ],
)
def test_the_worker_runs_each_group_of_due_robots_once(pair, batch, robots, calls):
    policy = Counting(pair[batch])
    node, requests = run_pass(policy, robots)
    assert policy.calls == calls
    assert [name for name, _ in node.published] == [f"robot{k + 1}" for k in range(robots)]
    for k, (_, result) in enumerate(node.published):  # each robot its own chunk, stamped with its time
        assert result.error is None and result.request is requests[k]
        assert result.request.t_obs == 10.0 + 0.02 * k
        np.testing.assert_allclose(result.actions, pair[1].predict(requests[k].obs_history, seed=100 + k),
                                   atol=PARITY)  # fmt: skip


def test_more_due_robots_than_rows_run_in_groups(tmp_path):
    card = tiny_card(steps=1)
    net = tiny_network(card, layers=1, heads=2, width=32)
    path = export_onnx(net, card, tmp_path / "b2.onnx", batch=2)
    policy = Counting(Policy.load(path, provider="cpu", **QUIET))
    node, _ = run_pass(policy, 5)
    assert policy.calls == [("predict_batch", 2), ("predict_batch", 2), ("predict", 1)]
    assert len({name for name, _ in node.published}) == 5


def test_a_failed_batch_run_is_every_robots_error_and_no_chunk():
    class Broken:
        card = SimpleNamespace(horizon=2, action_joints=("a",))

        def predict_batch(self, obs, seeds):
            raise ModelError("device lost")

    requests = [InferenceRequest(k, float(k), 0.0, np.zeros((1, 1))) for k in range(3)]
    results = compute_batch(Broken(), requests)
    assert [r.request for r in results] == requests
    assert all(r.actions is None and "device lost" in r.error for r in results)
    bad = compute_batch(SimpleNamespace(card=Broken.card, predict_batch=lambda o, seeds: np.ones((3, 2, 2))),
                        requests)  # fmt: skip
    assert all(r.actions is None and "shape (2, 2), expected (2, 1)" in r.error for r in bad)


def test_the_start_line_says_how_due_robots_run():
    assert pass_plan(True, 4, 4) == "one run of a batch-4 graph for up to 4 robots"
    assert pass_plan(True, 2, 5) == "one run of a batch-2 graph for up to 2 robots; 3 runs when all 5 are due"
    assert pass_plan(True, 1, 4) == "a loop of single runs: the model has batch 1"
    assert pass_plan(False, 1, 4) == "a worker per robot"
    assert "computes 4 rows a run" in pass_plan(False, 4, 4)


class PacedRobot:
    """Robot's pacing (its `request` rule on `last_request`) without sensors: observations always advance."""

    def __init__(self, name: str, last_request: float, period: float = 0.02) -> None:
        self.name, self.last_request, self.period = name, last_request, period

    def take(self, now, joints) -> None:
        pass

    def request(self, now, seed, pace=PACE):
        if now - self.last_request < pace * self.period:
            return None
        self.last_request = now
        return InferenceRequest(1, now, now, np.zeros((1, 1)))


class CheckingNode(SimpleNamespace):
    """What PolicyNode._check reads: the clock, the card, the config, the robots and their workers."""

    def now(self) -> float:
        return 1.0


class RecordingWorker:
    busy = False

    def __init__(self) -> None:
        self.submitted: list[list[str]] = []

    def submit(self, group) -> None:
        self.submitted.append([robot.name for robot, _ in group])


@pytest.mark.parametrize(
    ("batch", "since_b", "groups"),
    [
        (True, 0.6, [["a", "b"]]),  # b is more than half a period on: it joins a's run and falls into step
        (True, 0.3, [["a"]]),  # b ran a moment ago: it waits for its own turn
        (False, 0.6, [["a"]]),  # a worker per robot: nobody runs early
    ],
)
def test_robots_a_check_apart_fall_into_step_in_batch_mode(batch, since_b, groups):
    """Controllers start at any phase: without joining, two robots a check apart would stay a check apart
    and never share a run (the failure seen once on a fresh clone: as many model runs as chunks)."""
    a, b = PacedRobot("a", 1.0 - 0.02), PacedRobot("b", 1.0 - since_b * 0.02)
    worker = RecordingWorker()
    workers = {"a": worker, "b": worker if batch else RecordingWorker()}
    node = CheckingNode(card=SimpleNamespace(action_joints=()), cfg=SimpleNamespace(seed=0, batch=batch),
                        robots=[a, b], workers=workers)  # fmt: skip
    PolicyNode._check(node)
    assert worker.submitted == groups
    assert a.last_request == 1.0
    assert (b.last_request == 1.0) == (groups == [["a", "b"]])
